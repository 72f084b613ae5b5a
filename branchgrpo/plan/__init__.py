"""`python -m branchgrpo.plan`: the name users type for `branchgrpo.cli.plan` (an entry point in the top layer, beside
`branchgrpo.cli`; nothing imports it)."""

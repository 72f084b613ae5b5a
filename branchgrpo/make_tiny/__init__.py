"""`python -m branchgrpo.make_tiny KIND DIR`: the name users type for `branchgrpo.cli.make_tiny` (an entry point in the
top layer, beside `branchgrpo.cli`; nothing imports it)."""

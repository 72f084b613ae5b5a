"""Command-line entry points, the top layer: each module parses its arguments and calls into the layers below
(train, preprocess, eval, plan, make_tiny, compare, diversity, pretrain_toy). Every one runs its body through
`branchgrpo.runtime.entry.run_cli`, which turns an input error into one `error:` line and exit code 2."""

"""Benchmarks behind the cost columns of the paper's Table 1.

- `python -m branchgrpo.bench`: rollout and update throughput of a backbone (depth batching, tree vs sequential
  rollouts, micro-batching and activation checkpointing, peak memory, MFU); see branchgrpo/bench/__main__.py.
- `python -m branchgrpo.cli.compare` : every algorithm of Table 1 trained on the same model, prompts and seeds for
  the same number of iterations, tabulated and plotted against wall-clock time; see branchgrpo/cli/compare.py.
"""

"""The planner layer: what a configuration costs before renting GPUs - forward-pass and edge counts (counts), the
memory arithmetic (memory), the activation trace of one training forward (trace) and the per-GPU memory plan built
from a backbone's shipped config on the meta device (gpu_memory). Used by `python -m branchgrpo.plan`, the
benchmarks and the GPU check."""

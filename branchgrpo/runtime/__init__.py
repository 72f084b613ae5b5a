"""The runtime layer: the training loop (trainer) and what it runs on - the policy update (update), checkpoints
(checkpoint), preemption and the stall watchdog, guards (nonfinite, monitor), held-out evaluation (heldout), EMA,
optimiser, parallelism (parallel), outputs, compile statistics, the entry-point harness (entry) and the toy's
pretraining. It imports the units (algorithms, models, rewards, data) and core, never the entry points above it."""

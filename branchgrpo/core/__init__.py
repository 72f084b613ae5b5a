"""The bottom layer: pure math on tensors and integer steps, with no model library (diffusers, transformers) below
it - the rollout data type (graph), plan builders (plans), SDE/ODE steps (sde), the rollout (rollout), advantages,
pruning, losses, keyed noise (seeding) - and the small foundations every layer shares: flag fields (flags), collectives
and progress marks (distributed), state-dict checks (state_dicts), host-to-device copies (transfer) and the
two-sample statistics of diversity checks (diversity)."""

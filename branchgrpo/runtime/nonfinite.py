"""Non-finite rewards: a run whose reward models keep returning NaN or inf stops, with a checkpoint and a message,
instead of training on nothing and logging numbers that mean nothing.

A leaf whose reward is not finite takes no part in advantages, means or the loss (branchgrpo.core.advantages); a few of
them are reported (metrics `nonfinite_rewards`, a warning naming the reward). When more than
`--max_nonfinite_fraction` of an iteration's scored leaves are non-finite for `--max_nonfinite_iterations`
iterations in a row, the guard trips. Its count is checkpointed state, so a resumed run continues it.
"""

from __future__ import annotations


class NonFiniteRewardsError(ValueError):
    """The run stopped because its rewards kept failing (a checkpoint of the last iteration was written)."""


class NonFiniteGuard:
    """Counts consecutive iterations with too many non-finite leaf rewards. `max_iterations` 0: never trips."""

    STATE_OPTIONAL = True  # a checkpoint written before the guard existed resumes with an empty streak
    KEEP = 10  # iterations of the current streak kept for the message

    def __init__(self, max_fraction: float, max_iterations: int):
        self.max_fraction, self.max_iterations = max_fraction, max_iterations
        self.count = 0  # iterations in a row above max_fraction
        self.recent: list[list] = []  # [iteration, fraction] of the last KEEP iterations of the streak
        self.per_reward: dict[str, int] = {}  # non-finite leaves per reward model, last iteration of the streak

    def observe(self, iteration: int, num_nonfinite: int, num_leaves: int, per_reward: dict[str, int]) -> None:
        """One iteration's counts over every rank (so every rank reaches the same decision)."""
        fraction = num_nonfinite / num_leaves if num_leaves else 1.0
        if fraction > self.max_fraction:
            self.count += 1
            self.recent = (self.recent + [[iteration, fraction]])[-self.KEEP:]
            self.per_reward = {name: n for name, n in per_reward.items() if n}
        else:
            self.count, self.recent, self.per_reward = 0, [], {}

    @property
    def tripped(self) -> bool:
        return self.max_iterations > 0 and self.count >= self.max_iterations

    def error(self, checkpoint) -> NonFiniteRewardsError:
        """Why the run stops, once `tripped` (after writing `checkpoint`)."""
        return NonFiniteRewardsError(self.message(checkpoint))

    def message(self, checkpoint) -> str:
        first, last = self.recent[0][0], self.recent[-1][0]
        fractions = ", ".join(f"{100 * f:.0f}%" for _, f in self.recent)
        rewards = ", ".join(f"'{name}' on {n}" for name, n in self.per_reward.items()) or "none named"
        return (f"non-finite rewards: more than {100 * self.max_fraction:g}% of the leaves had a non-finite reward in "
                f"{self.count} iterations in a row (--max_nonfinite_fraction {self.max_fraction:g}, "
                f"--max_nonfinite_iterations {self.max_iterations}; iterations {first}-{last}: {fractions}; "
                f"non-finite at the last one: {rewards} leaves); stopped after writing {checkpoint}. Check the reward "
                "model and its inputs (or a lower --learning_rate), then continue with --resume_from_checkpoint "
                "latest, raising the two flags if such failures are expected")

    def state_dict(self) -> dict:
        return {"count": self.count, "recent": self.recent, "per_reward": self.per_reward}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.recent = int(state["count"]), [list(r) for r in state["recent"]]
        self.per_reward = dict(state.get("per_reward", {}))

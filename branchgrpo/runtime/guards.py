"""Guards: checks that stop a run which no longer makes sense, with a checkpoint and one line saying why.

Every guard implements `Guard`. The trainer holds a list of them and hands each one every `Observation` of the run -
each iteration's metrics and counts, each evaluation's record, the same on every rank (counted over all of them) -
through `observe`. After every iteration it asks each for `tripped`, in one place: if any is, it writes a checkpoint
(keeping the older ones) and raises the first tripped guard's `error(checkpoint)`, a `RunHalted`, which the entry
points print as one `error:` line with exit code 3 (branchgrpo.runtime.entry) - not 2, which means "fix the input".

The guards:
- `NonFiniteGuard` (--max_nonfinite_fraction, --max_nonfinite_iterations): reward models that keep returning NaN or
  inf for finite samples. A leaf whose reward is not finite takes no part in advantages, means or the loss
  (branchgrpo.core.advantages); a few of them are reported (metrics `nonfinite_rewards`, a warning naming the
  reward). A leaf whose sample itself is not finite is the policy's failure, not the reward model's, and is left to
  the divergence guard.
- `DivergenceGuard` (--max_skipped_steps): optimizer steps skipped in a row for a non-finite gradient norm; its
  checkpoint holds the last weights whose samples were finite.
- `HackingMonitor` (branchgrpo.runtime.monitor, --hacking_guard stop): evaluations whose samples drift from the base
  model's in the ways reward hacking does.

Their counts are checkpointed state (the trainer's `states`), so a resumed run continues them.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from branchgrpo.core import distributed
from branchgrpo.runtime.entry import RunHalted
from branchgrpo.runtime.preemption import HostCopy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What one iteration or one evaluation showed, the same on every rank."""

    step: int  # the iteration (0-based), or the step an evaluation ran at
    record: dict  # the iteration's metrics entry, or the evaluation's record
    counts: dict = field(default_factory=dict)  # an iteration's counts over all ranks (branchgrpo.runtime.metrics)
    evaluation: bool = False


@runtime_checkable
class Guard(Protocol):
    """A check that halts the run. `observe` sees every observation (and ignores the kinds it does not watch);
    `tripped` says whether the run must stop now; `error(checkpoint)` is why, once the trainer has written
    `checkpoint`. Guards with counts implement `state_dict` / `load_state_dict` and are in the trainer's `states`."""

    @abstractmethod
    def observe(self, seen: Observation) -> None: ...

    @property
    @abstractmethod
    def tripped(self) -> bool: ...

    @abstractmethod
    def error(self, checkpoint: Path) -> RunHalted: ...


class NonFiniteRewardsError(RunHalted):
    """The run stopped because its rewards kept failing (a checkpoint of the last iteration was written)."""


class NonFiniteGuard(Guard):
    """Counts consecutive iterations in which more than `max_fraction` of the leaves with a finite sample got no
    finite reward; trips at `max_iterations` of them (0: never). Warns (rank 0) about every iteration with leaves
    without a finite reward, naming the reward models and the non-finite samples."""

    STATE_OPTIONAL = True  # a checkpoint written before the guard existed resumes with an empty streak
    KEEP = 10  # iterations of the current streak kept for the message

    def __init__(self, max_fraction: float, max_iterations: int, is_main: bool = True):
        self.max_fraction, self.max_iterations, self.is_main = max_fraction, max_iterations, is_main
        self.count = 0  # iterations in a row above max_fraction
        self.recent: list[list] = []  # [iteration, fraction] of the last KEEP iterations of the streak
        self.per_reward: dict[str, int] = {}  # non-finite leaves per reward model, last iteration of the streak

    def observe(self, seen: Observation) -> None:
        if seen.evaluation:
            return
        c = seen.counts
        self._warn(seen.step, c)
        finite_samples = c["scored"] - c["nonfinite_samples"]
        # an iteration without a finite sample says nothing about the reward models
        fraction = c["reward_failures"] / finite_samples if finite_samples else 0.0
        if fraction > self.max_fraction:
            self.count += 1
            self.recent = (self.recent + [[seen.step, fraction]])[-self.KEEP:]
            self.per_reward = {name: n for name, n in c["per_reward"].items() if n}
        else:
            self.count, self.recent, self.per_reward = 0, [], {}

    def _warn(self, iteration: int, c: dict) -> None:
        if not c["nonfinite_rewards"] or not self.is_main:
            return
        causes = [f"'{name}' non-finite on {n}" for name, n in c["per_reward"].items() if n]
        if c["nonfinite_samples"]:
            causes.append(f"non-finite samples on {c['nonfinite_samples']}")
        log.warning("iteration %d: %d of %d leaves have no finite reward (%s); they are left out of the advantages "
                    "and the metrics", iteration, c["nonfinite_rewards"], c["scored"], ", ".join(causes))

    @property
    def tripped(self) -> bool:
        return self.max_iterations > 0 and self.count >= self.max_iterations

    def error(self, checkpoint: Path) -> NonFiniteRewardsError:
        first, last = self.recent[0][0], self.recent[-1][0]
        fractions = ", ".join(f"{100 * f:.0f}%" for _, f in self.recent)
        rewards = ", ".join(f"'{name}' on {n}" for name, n in self.per_reward.items()) or "none named"
        return NonFiniteRewardsError(
            f"non-finite rewards: more than {100 * self.max_fraction:g}% of the leaves had a non-finite reward in "
            f"{self.count} iterations in a row (--max_nonfinite_fraction {self.max_fraction:g}, "
            f"--max_nonfinite_iterations {self.max_iterations}; iterations {first}-{last}: {fractions}; "
            f"non-finite at the last one: {rewards} leaves); stopped after writing {checkpoint}. Check the reward "
            "model and its inputs, then continue with --resume_from_checkpoint latest, raising the two flags if such "
            "failures are expected")

    def state_dict(self) -> dict:
        return {"count": self.count, "recent": self.recent, "per_reward": self.per_reward}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.recent = int(state["count"]), [list(r) for r in state["recent"]]
        self.per_reward = dict(state.get("per_reward", {}))


class DivergedError(RunHalted):
    """The run stopped because its optimizer steps kept being skipped (a checkpoint was written first)."""


class DivergenceGuard(Guard):
    """Optimizer steps skipped in a row for a non-finite gradient norm (the same count on every rank: the norm is
    all-reduced); trips at `limit` of them (0: never).

    A step can also leave weights that are finite but whose samples are not (a learning rate far too large): that is
    seen only at the next rollout, after which every step is skipped. So the guard keeps, in host memory, the
    trainable state - weights, their optimizer state, the EMA - of the last iteration whose rollout samples were all
    finite, copied before its update (`keep_if_sound`), and puts it back when it trips: the checkpoint then holds the
    last weights that sampled soundly. The LR schedule, data position and RNG stay where the run stopped. The price:
    one copy of this rank's trainable state in CPU memory, refreshed every iteration - so it is kept only where that
    state is small (`keep_copy`: the trainer's choice, LoRA or a small backbone; a full fine-tune of FLUX would copy
    24 GB per GPU every iteration); without it the checkpoint written on tripping holds the weights as they are, and
    the one before it is the last good state. `limit` 0 keeps none."""

    STATE_OPTIONAL = True  # checkpoints written before it existed resume with no streak

    def __init__(self, limit: int, params: list, optimizer: torch.optim.Optimizer, ema=None, keep_copy: bool = True):
        self.limit, self.params, self.optimizer, self.ema = limit, list(params), optimizer, ema
        self.keep_copy = keep_copy
        self.count = 0
        self.first: int | None = None  # the iteration of the streak's first skipped step
        self.last_applied: int | None = None  # the iteration of the last step that was applied
        self.last: int | None = None  # the iteration of the last step, applied or not
        self.sound: tuple[int, HostCopy, dict | None] | None = None  # (iteration, weights, EMA) of the last sound one
        self.restored: int | None = None  # the iteration whose state was put back on tripping

    def keep_if_sound(self, iteration: int, finite_samples: torch.Tensor) -> None:
        """Before the update of `iteration`: if every rank's rollout samples are finite (`finite_samples` bool [L],
        this rank's leaves), the trainable state is sound: keep a copy of it. Collective."""
        if not (self.limit and self.keep_copy):
            return
        bad = distributed.all_reduce_sum(torch.tensor(float((~finite_samples).sum()), dtype=torch.float64))
        if float(bad) == 0:
            ema = copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None
            self.sound = (iteration, HostCopy(self.params, self.optimizer), ema)

    def observe(self, seen: Observation) -> None:
        """The iteration's optimizer steps in order (`counts["applied_steps"]`); on tripping, the last sound state is
        put back, for the checkpoint the trainer writes next."""
        if seen.evaluation:
            return
        for applied in seen.counts["applied_steps"]:
            self.last = seen.step
            if applied:
                self.count, self.first, self.last_applied = 0, None, seen.step
            else:
                self.count += 1
                self.first = seen.step if self.first is None else self.first
        if self.tripped and self.sound is not None and self.restored is None:
            iteration, weights, ema = self.sound
            weights.restore(self.optimizer, hyper_parameters=False)  # the LR stays the schedule's
            if ema is not None:
                self.ema.load_state_dict(ema)
            self.restored = iteration

    @property
    def tripped(self) -> bool:
        return self.limit > 0 and self.count >= self.limit

    def error(self, checkpoint: Path) -> DivergedError:
        if self.restored is not None:
            weights = (f"the weights, optimizer state and EMA as they were before the update of iteration "
                       f"{self.restored}, the last whose rollout samples were all finite")
        elif not self.keep_copy:
            weights = ("the weights as they are (no copy of the last sound state is kept for a full fine-tune of a "
                       "large backbone: the checkpoint before it is the last good state)")
        else:
            weights = ("the weights as they are: no rollout of this run since it started or resumed had only finite "
                       "samples")
        applied = "none" if self.last_applied is None else f"iteration {self.last_applied}"
        return DivergedError(
            f"diverged: {self.count} optimizer steps in a row had a non-finite gradient norm and were skipped "
            f"(iterations {self.first}-{self.last}; --max_skipped_steps {self.limit}; last applied step: {applied}); "
            f"stopped after writing {checkpoint}, which holds {weights}; older checkpoints were kept. Start again "
            "with a lower --learning_rate or --max_grad_norm, or raise --max_skipped_steps if such steps are "
            "expected")

    def state_dict(self) -> dict:
        return {"count": self.count, "first": self.first, "last_applied": self.last_applied}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.first, self.last_applied = int(state["count"]), state["first"], state["last_applied"]

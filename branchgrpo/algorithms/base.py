"""What an algorithm unit is: a rollout plan, an advantage estimator, an edge selector and schedule state, over
the one rollout data type (branchgrpo.core.graph), plus the typed config section that owns its flags.

A unit is a subclass of `Algorithm` registered with `@register_algorithm` (branchgrpo.algorithms). The trainer
calls, every iteration,

    rollout(it, setup, prompt_ids, scorer)  the batch's rollout graph: by default `plan(it)`, the topology of one
                                            prompt's graph, grown for every prompt from the trainer's `setup`
    advantages(graph, scores, ...)          per-node advantages (the unit's `estimate`, clipped)
    select(graph, advantages, it, keys)     bool mask over nodes: the edges trained this iteration
    observe(graph, rewards, prompt_ids, it) adaptive state fed after the rewards; figures for the metrics

and trains with `objective()`: None (the default) is the clipped surrogate over the selected rollout edges
(runtime/update.py `EdgeObjective`); a unit whose training is not a ratio over edges (DiffusionNFT trains on the final
samples) returns its own `TrainingObjective`, which the same PolicyUpdate drives. A unit with `keeps_old_policy`
gets a second copy of the trained weights, theta_old, that samples its rollouts and is moved towards theta after
every iteration with `old_policy_decay(step)` (saved and resumed with the run). The unit saves `state_dict()` in
every checkpoint. Config sections shared by several units (the group size, the sliding
SDE window) are mixins defined here.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.core import distributed, sde
from branchgrpo.core.flags import flag, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph, plan_counts, skeleton_graph
from branchgrpo.core.rollout import RolloutSetup


class AlgorithmConfig:
    """Base of every unit's config section (a dataclass of flags). Subclasses add fields and checks."""

    def validate(self, sampling) -> None:
        """Every check on the section's flags, given the shared sampling section; ValueError naming the flag."""

    def num_leaves(self, sampling) -> int:
        """Rewarded samples per prompt (checked against --max_leaves)."""
        raise NotImplementedError

    def conditions(self) -> dict[str, tuple[bool, str]]:
        """Flags of this section that act only under a condition: name -> (condition holds, the condition in
        words). A flag set to a non-default value whose condition fails is reported as having no effect."""
        return {}

    def selection_summary(self) -> str:
        """The flags that decide which edges are trained, for the error when none is left."""
        return ""


@dataclass
class GroupFlags(AlgorithmConfig):
    """Units whose prompts get a group of G samples (DanceGRPO, MixGRPO) or G members per branch step (G2RPO)."""

    num_generations: int = flag(12, "G: trajectories per prompt (dancegrpo, mixgrpo) or members per step (g2rpo)")

    def num_leaves(self, sampling) -> int:
        return self.num_generations

    def validate(self, sampling) -> None:
        require(self.num_generations >= 2,
                f"--num_generations: group methods need >= 2, got {self.num_generations}")


@dataclass
class WindowFlags(AlgorithmConfig):
    """A window of SDE steps that slides with the TRAINING iteration (MixGRPO; BranchGRPO-Mix)."""

    mix_sde_window_size: int = flag(4, "SDE window size W (MixGRPO, BranchGRPO-Mix)")
    mix_window_interval: int = flag(25, "training iterations between two moves of the SDE window (tau)")
    mix_window_stride: int = flag(1, "steps the SDE window moves each time")
    mix_window_start: int = flag(0, "first position of the SDE window")
    mix_window_max_start: int | None = flag(None, "last window position before rolling back (default T - 1 - W)")

    def window_max_start(self, num_steps: int) -> int:
        if self.mix_window_max_start is not None:
            return self.mix_window_max_start
        # MixGRPO never trains the last two steps (its max_timesteps = N - 2); here the very last one is also
        # deterministic, so the window ends at step T - 3 at the latest
        return max(self.mix_window_start, num_steps - 2 - self.mix_sde_window_size)

    def validate_window(self, num_steps: int) -> None:
        T, W = num_steps, self.mix_sde_window_size
        require(1 <= W <= T - 1, f"--mix_sde_window_size: need 1..{T - 1}, got {W}")
        require(self.mix_window_interval >= 1, f"--mix_window_interval: need >= 1, got {self.mix_window_interval}")
        require(self.mix_window_stride >= 0, f"--mix_window_stride: need >= 0, got {self.mix_window_stride}")
        start, last = self.mix_window_start, self.window_max_start(T)
        require(0 <= start <= last, f"--mix_window_start {start} / --mix_window_max_start {last}: need 0 <= start <= max")
        require(last + W - 1 <= T - 2, f"--mix_window_max_start {last} + --mix_sde_window_size {W} runs past step "
                f"{T - 2} (the last step is deterministic)")

    def window_schedule(self, num_steps: int):
        from branchgrpo.core.pruning import WindowSchedule

        return WindowSchedule(size=self.mix_sde_window_size, interval=self.mix_window_interval,
                              stride=self.mix_window_stride, start=self.mix_window_start,
                              max_start=self.window_max_start(num_steps))


@dataclass
class TimestepFractionFlags(AlgorithmConfig):
    """Units that train a fraction f of each chain's floor(f (T - 1)) SDE steps (DanceGRPO: a random subset;
    Flow-GRPO: the first ones, in order)."""

    timestep_fraction: float = flag(1.0, "fraction f of each chain's SDE steps trained, floor(f (T - 1)) of them "
                                    "(dancegrpo: a random subset; flow_grpo: the first ones)")

    def num_trained_steps(self, num_steps: int) -> int:
        return int(self.timestep_fraction * (num_steps - 1) + 1e-9)

    def validate_fraction(self, num_steps: int) -> None:
        f = self.timestep_fraction
        require(0 < f <= 1, f"--timestep_fraction: need a value in (0, 1], got {f}")
        require(self.num_trained_steps(num_steps) >= 1, f"--timestep_fraction {f} trains no step of {num_steps - 1}")


@dataclass
class GlobalStdFlags(AlgorithmConfig):
    """Flow-GRPO's advantages: each reward minus its prompt group's mean, divided by the std of every reward of the
    iteration (all ranks), or by the group's own std."""

    global_std: bool = flag(True, "flow_grpo, flow_grpo_fast, diffusion_nft: divide by the std of all the iteration's "
                            "rewards (every rank; the reference recipes' default) instead of each prompt group's own")

    def group_advantages(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """Group-mean advantages over the iteration's std (then a collective: every rank calls it), or group
        z-scores."""
        return adv.group_advantages(graph, leaf_rewards, iteration_std(leaf_rewards) if self.global_std else None)


def iteration_std(leaf_rewards: torch.Tensor) -> float:
    """Unbiased std of the finite rewards of every rank (the same number on each; a collective: every rank calls
    it), from all-reduced float64 sums."""
    r = leaf_rewards.to(torch.float64).cpu()
    r = r[torch.isfinite(r)]
    sums = distributed.all_reduce_sum(torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), r.sum()]))
    count, mean = float(sums[0]), float(sums[1]) / max(float(sums[0]), 1.0)
    squares = distributed.all_reduce_sum(((r - mean) ** 2).sum().reshape(1))  # two passes: no cancellation
    return math.sqrt(float(squares[0]) / (count - 1)) if count >= 2 else 0.0


class TrainingObjective(abc.ABC):
    """What the PolicyUpdate (runtime/update.py) minimises in one iteration. The update owns the loop - micro-batches,
    gradient accumulation windows, clipping, optimizer steps, preemption cut points - and hands itself to each call as
    `update`, whose services the objective uses: `update.velocity(embeddings, x, sigma, prompt)` (the current policy,
    fp32; the reference's inside `update.reference()`, theta_old's inside `update.old_policy()`), `update.windows(
    batches, weight)` (pads micro-batches to the same count on every rank and groups them into optimizer steps),
    `update.seed`, `update.rank`, `update.device`, `update.optim_cfg`. `edges` are the rollout's selected edges
    (`runtime.update.select_edges`: child node, parent, clipped advantage, weight, behaviour log-prob)."""

    @abc.abstractmethod
    def prepare(self, update, graph: RolloutGraph, embeddings: dict, edges, iteration: int):
        """Before the loop: (batches, tables, windows) - row indices per micro-batch and their device tables (the
        same number on every rank; empty = padding) and `update.windows`' optimizer-step windows."""

    @abc.abstractmethod
    def loss(self, update, graph: RolloutGraph, embeddings: dict, mb: dict, normaliser: float):
        """(loss to backward: the micro-batch's weighted sum / `normaliser`, statistics to `accumulate` or None for
        padding, which still runs one forward so that every rank's collectives stay in step)."""

    @abc.abstractmethod
    def accumulate(self, acc: dict, out: dict) -> dict:
        """`acc` updated with a micro-batch's statistics (0-d tensors on the device: read back once, at the end)."""

    @abc.abstractmethod
    def figures(self, read: dict) -> dict:
        """The iteration's figures for the metrics from the accumulated statistics read back as floats: at least
        nonfinite_edges, clip_fraction, approx_kl, kl, ratio_min/max, first_ratio_min/max (1 where there is no
        ratio), train_forward_rows (forwards with a backward) and extra_forward_rows (forwards without one)."""


def window_flag_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(WindowFlags))


class Algorithm(abc.ABC):
    """One GRPO variant. Subclasses set `name`, `Config` (their section), `default_kernel` and `presets`, and
    implement `plan` and `estimate`; `select` defaults to every SDE edge."""

    #: the `--algo` value
    name: ClassVar[str]
    #: the dataclass of the unit's own flags (a subclass of AlgorithmConfig, built from `flag(...)` fields)
    Config: ClassVar[type]
    #: the SDE kernel of `--sde_kernel auto`: "dance" (g = eta) or "flow" (g = eta sqrt(sigma / (1 - sigma)))
    default_kernel: ClassVar[str] = "dance"
    #: rows of the method comparison (branchgrpo.bench.compare): id -> (table label, trainer flags); "{interval}"
    #: stands for the sliding-schedule interval of the run
    presets: ClassVar[dict[str, tuple[str, list[str]]]] = {}
    #: its flags in a tiny smoke run of 6 sampling steps (the backbone matrix, branchgrpo.bench.matrix): a few
    #: samples per prompt; (): its defaults
    tiny_flags: ClassVar[tuple[str, ...]] = ()
    #: the run keeps theta_old, a second copy of the trained weights (a copy of the LoRA tensors under LoRA, of this
    #: rank's shards under FSDP2) that samples the rollouts and moves towards theta by `old_policy_decay`
    keeps_old_policy: ClassVar[bool] = False

    def __init__(self, cfg, sampling, *, seed: int = 0, max_train_steps: int = 1):
        cfg.validate(sampling)
        leaves = cfg.num_leaves(sampling)
        require(leaves <= sampling.max_leaves, f"{leaves} leaves per prompt exceed --max_leaves {sampling.max_leaves}")
        self.cfg, self.sampling, self.seed = cfg, sampling, seed
        self.max_train_steps = max_train_steps
        #: everything with state: name -> an object with state_dict()/load_state_dict() (sliding windows, ...), or
        #: None for a slot the configuration leaves empty (saved as null)
        self.schedules: dict[str, object | None] = {}

    @property
    def num_steps(self) -> int:
        return self.sampling.sampling_steps

    @property
    def kernel(self) -> sde.Kernel:
        return self.sampling.kernel(self.default_kernel)

    @property
    def branch_innovation(self) -> float:
        """r of paper Eq. 2 for the plan's noise-sharing split children (1: siblings draw independent noise)."""
        return 1.0

    # --- the three parts -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def plan(self, iteration: int) -> GraphPlan:
        """The topology of one prompt's rollout graph at this training iteration."""

    @abc.abstractmethod
    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """Per-node advantages (float64 [N]; NaN where no finite reward lies below) from one reward per leaf."""

    def advantages(self, graph: RolloutGraph, scores: dict[str, torch.Tensor], weights: dict[str, float],
                   mode: str) -> torch.Tensor:
        """`estimate` over the (weighted) rewards, unclipped: selections rank by these (clipped values tie), and
        the loss clips them (--adv_clip_max, `update.select_edges`)."""
        return adv.combined_advantages(self.estimate, graph, scores, weights, mode)

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        """Bool mask over nodes: the edges (child ends) trained this iteration; a subset of SDE edges for the edge
        objective (a unit with its own objective may select other nodes: DiffusionNFT's final samples)."""
        return graph.stochastic.clone()

    def rollout(self, iteration: int, setup: RolloutSetup, prompt_ids: list[int], scorer=None) -> RolloutGraph:
        """The iteration's rollout graph, grown from `setup` (the batch's velocity, noise keys and schedule;
        branchgrpo.core.rollout): by default `plan(iteration)` for every prompt. `prompt_ids` are the prompts' dataset
        rows; `scorer(latents, prompt index)` gives the training reward of decoded latents, for units that look at
        intermediate rewards (they start a rollout that pauses at its splits)."""
        return setup.start(self.plan(iteration), self.branch_innovation).finish()

    @property
    def prompt_separable(self) -> bool:
        """Whether `rollout` of a batch equals the rollouts of chunks of its prompts side by side (each prompt's graph
        depends on its own plan and noise only): then scoring can overlap the rollout (branchgrpo.runtime.overlap)."""
        return True

    def observe(self, graph: RolloutGraph, leaf_rewards: torch.Tensor, prompt_ids: list[int], iteration: int) -> dict:
        """After the rewards: update adaptive state from the iteration's statistics; returns figures to log."""
        return {}

    def objective(self, loss_cfg) -> TrainingObjective | None:
        """The training objective; None: the clipped surrogate over the selected rollout edges."""
        return None

    def old_policy_decay(self, step: int) -> float:
        """d of theta_old <- d theta_old + (1 - d) theta after `step` training iterations (`keeps_old_policy`)."""
        raise NotImplementedError(f"algorithm '{self.name}' keeps no old policy")

    # --- counts and state ------------------------------------------------------------------------------------
    def counts(self, iteration: int = 0) -> dict:
        """The honest per-prompt cost of iteration `iteration` (branchgrpo.core.graph.plan_counts). Selections that
        rank by reward keep a fixed number of edges whatever the values, so a stand-in ranking gives the counts."""
        plan = self.plan(iteration)
        graph = skeleton_graph(plan)
        stand_in = torch.arange(graph.num_nodes, dtype=torch.float64)
        return plan_counts(plan, self.select(graph, stand_in, iteration))

    def state_dict(self) -> dict:
        return {name: None if s is None else s.state_dict() for name, s in self.schedules.items()}

    def load_state_dict(self, state: dict) -> None:
        saved = {name for name, value in state.items() if value is not None}
        mine = {name for name, s in self.schedules.items() if s is not None}
        if saved != mine:
            raise ValueError(f"resume: the checkpoint's algorithm state ({sorted(saved)}) does not match these flags "
                             f"(algo {self.name}: {sorted(mine)})")
        for name in mine:
            self.schedules[name].load_state_dict(state[name])

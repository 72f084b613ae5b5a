"""BranchGRPO (arXiv:2509.06040): rollouts as a branching tree sharing denoising prefixes (DESIGN section 3), reward
fusion and depth-wise advantages (section 4), width and depth pruning and the hybrid ODE/SDE tree (section 5).

    plan       every node emits K SDE children at each split step (paper Eq. 2 split noise); BranchGRPO-Mix: only
               split steps and a window sliding with the training iteration are SDE
    estimate   fusion over path log-probs (Eq. 3), depth-wise z-scores within each prompt's tree (Eq. 4)
    select     depth pruning (optionally sliding), then width pruning at the last split (Parent-Top1 / Extreme)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from branchgrpo.core import advantages as adv
from branchgrpo.core import distributed
from branchgrpo.algorithms import dynamic as dyn
from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, WindowFlags, window_flag_names
from branchgrpo.core.flags import flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph, plan_counts
from branchgrpo.core.plans import tree_plan
from branchgrpo.core.pruning import DepthPruningSchedule, depth_pruning_mask, extreme_mask, parent_top1_mask

log = logging.getLogger(__name__)
_REPORTED: set[tuple] = set()  # split-point settings already reported (_report_split_points)

_PAPER_TREE = ["--algo", "branchgrpo", "--tree_split_points", "0,3,6,9", "--branch_factor", "2", "--sde_kernel",
               "dance", "--eta", "0.3"]


@dataclass
class BranchGRPOConfig(WindowFlags):
    """The tree, fusion and pruning flags (the window flags act only with --mix_ode_sde_tree)."""

    tree_split_points: str = flag("0,3,6,9", "comma-separated step indices where every node branches")
    tree_split_rounds: int = flag(4, "official fallback when --tree_split_points is empty: splits at k*(T // rounds)")
    branch_factor: int = flag(2, "children per split (K); leaves per prompt = K ** (number of split points)")
    branch_innovation: float = flag(1.0, "paper Eq. 2 r in (0, 1]: siblings share sqrt(1-r^2) of their split noise "
                                    "(r = 1: independent siblings)")
    tree_split_noise_scale: float = flag(1.0, "lambda: split edges' kernel std is lambda * std, in sampling and in "
                                         "every log-prob of the edge (the official code scaled only the sampling)")
    fusion_alpha: float | None = flag(None, "reward fusion temperature (Eq. 3): 0 = mean of the leaves below, "
                                      "1 = behaviour-policy path weighting")
    tree_prob_weighted: bool = flag(False, "official name for --fusion_alpha 1")
    width_pruning_mode: int = flag(0, "0 none, 1 Parent-Top1, 2 Extreme (best and worst leaves)", (0, 1, 2))
    width_pruning_ratio: float = flag(0.5, "Extreme mode: fraction of leaves whose post-split chains are trained")
    depth_pruning: str = flag("", "comma-separated child depths whose edges are not trained, e.g. 15,16,17,18")
    depth_pruning_slide: bool = flag(False, "slide the pruned depths one step every --depth_pruning_slide_interval "
                                     "iterations towards --depth_pruning_stop_depth")
    depth_pruning_slide_interval: int = flag(1, "iterations between two moves of the depth-pruning window")
    depth_pruning_stop_depth: int | None = flag(None, "where the sliding window stops (default: the last split point)")
    pruning_step_ratio: float = flag(1.0, "prune only during the first fraction of --max_train_steps")
    mix_ode_sde_tree: bool = flag(False, "BranchGRPO-Mix: only split steps and a sliding window of SDE steps are "
                                  "stochastic (and trained); the rest are ODE steps")
    # dynamic branching (branchgrpo.algorithms.dynamic; docs/design_notes.md "Dynamic branching"), all off by default
    dynamic_allocation: bool = flag(False, "per-prompt trees (more or fewer splits) shared out by recent reward spread "
                                    "within a budget of rollout forward passes per iteration and rank")
    dynamic_budget_ratio: float = flag(1.0, "allocation budget as a fraction of what the fixed tree spends, in (0, 2]")
    dynamic_max_splits: int | None = flag(None, "largest tree allocation may give (number of splits; default: the "
                                          "fixed tree's + 1, within --max_leaves)")
    dynamic_spread_decay: float = flag(0.5, "weight of a prompt's older spread in its moving average, in [0, 1)")
    adaptive_splits: bool = flag(False, "move split steps toward the steps of largest sibling reward spread")
    adaptive_split_window: int = flag(5, "iterations of statistics behind each move of the split steps")
    adaptive_split_range: str = flag("", "lo,hi: steps the splits may move within (default 0,T-2)")
    adaptive_split_min_spacing: int = flag(2, "least distance between two split steps")
    adaptive_split_margin: float = flag(0.1, "relative spread gain a split needs before it moves one step")
    adaptive_innovation: bool = flag(False, "adjust --branch_innovation r per split toward --innovation_target")
    innovation_target: float = flag(0.25, "target share of the leaf-reward variance that each split's within-parent "
                                    "(sibling) variance should carry, in (0, 1)")
    innovation_gain: float = flag(0.5, "step size of r's multiplicative update")
    innovation_min: float = flag(0.1, "smallest r the adaptation may reach, in (0, 1]")
    guided_expansion: bool = flag(False, "at each split, the nodes whose x0-prediction scores best get K children, the "
                                  "rest --guided_reduced_children (extra decodes and rewards, in the rollout time)")
    guided_top_fraction: float = flag(0.5, "fraction of a prompt's nodes fully expanded at each split, in (0, 1]")
    guided_reduced_children: int = flag(1, "children of the other nodes at a split, 1..K-1")
    guided_importance_weights: bool = flag(True, "fusion weights each leaf by prod 1/children over its ancestors "
                                           "(unbiased node values); off: the plain leaf mean (biased to top nodes)")

    # --- derived values ----------------------------------------------------------------------------------------
    def split_points(self, num_steps: int) -> list[int]:
        """The steps where the tree branches, ascending (the tree branches in step order, whatever the flag's)."""
        if self.tree_split_points.strip():
            return sorted(parse_int_list(self.tree_split_points, "--tree_split_points"))
        stride = max(1, num_steps // max(1, self.tree_split_rounds))
        return [k * stride for k in range(self.tree_split_rounds)]

    @property
    def pruned_depths(self) -> list[int]:
        return parse_int_list(self.depth_pruning, "--depth_pruning") if self.depth_pruning.strip() else []

    @property
    def alpha(self) -> float:
        if self.fusion_alpha is not None:
            return self.fusion_alpha
        return 1.0 if self.tree_prob_weighted else 0.0

    def num_leaves(self, sampling) -> int:
        return self.branch_factor ** len(self.split_points(sampling.sampling_steps))

    # --- checks ------------------------------------------------------------------------------------------------
    def validate(self, sampling) -> None:
        T = sampling.sampling_steps
        if not self.tree_split_points.strip():
            require(self.tree_split_rounds >= 1, "--tree_split_rounds: need >= 1 when --tree_split_points is empty, "
                    f"got {self.tree_split_rounds}")
        points = self.split_points(T)
        self._report_split_points(points, T)
        require(bool(points), "--tree_split_points: BranchGRPO needs at least one split point")
        for p in points:
            require(0 <= p <= T - 2, f"--tree_split_points: {p} is outside 0..{T - 2} "
                    f"(steps of a {T}-step schedule; the last step is deterministic)")
        require(self.branch_factor >= 2, f"--branch_factor: need >= 2, got {self.branch_factor}")
        leaves = self.num_leaves(sampling)
        require(leaves <= sampling.max_leaves, f"--tree_split_points/--branch_factor: {leaves} leaves per prompt "
                f"exceed --max_leaves {sampling.max_leaves} (raise --max_leaves if you mean it)")
        r = self.branch_innovation
        require(0 < r <= 1, f"--branch_innovation: need r in (0, 1], got {r}")
        require(self.tree_split_noise_scale > 0, f"--tree_split_noise_scale: need > 0, got {self.tree_split_noise_scale}")
        if self.tree_prob_weighted and self.fusion_alpha is not None and self.fusion_alpha != 1.0:
            raise ValueError(f"--tree_prob_weighted means --fusion_alpha 1, but --fusion_alpha {self.fusion_alpha} is set")
        ratio = self.width_pruning_ratio
        require(self.width_pruning_mode in (0, 1, 2), f"--width_pruning_mode: 0, 1 or 2, got {self.width_pruning_mode}")
        require(0 < ratio <= 1, f"--width_pruning_ratio: need a value in (0, 1], got {ratio}")
        for d in self.pruned_depths:
            require(1 <= d <= T - 1, f"--depth_pruning: depth {d} is outside 1..{T - 1} (child depths of trainable edges)")
        if self.depth_pruning_slide:
            require(self.depth_pruning_slide_interval >= 1,
                    f"--depth_pruning_slide_interval: need >= 1, got {self.depth_pruning_slide_interval}")
            stop = self.depth_pruning_stop_depth
            if stop is not None:
                require(1 <= stop <= T - 1, f"--depth_pruning_stop_depth: {stop} is outside 1..{T - 1}")
        require(0 < self.pruning_step_ratio <= 1, f"--pruning_step_ratio: need (0, 1], got {self.pruning_step_ratio}")
        if self.mix_ode_sde_tree:
            self.validate_window(T)
        self._validate_dynamic(T, points, sampling.max_leaves)

    def _validate_dynamic(self, T: int, points: list[int], max_leaves: int) -> None:
        dynamic = self.dynamic_allocation or self.guided_expansion or self.adaptive_splits
        require(not (dynamic and self.width_pruning_mode), "--width_pruning_mode: not with --dynamic_allocation, "
                "--adaptive_splits or --guided_expansion (the trees' last splits differ)")
        require(0 < self.dynamic_budget_ratio <= 2, f"--dynamic_budget_ratio: need (0, 2], got {self.dynamic_budget_ratio}")
        m = self.max_splits(points, T)
        if self.dynamic_allocation:
            require(1 <= m and self.branch_factor ** m <= max_leaves, f"--dynamic_max_splits: need 1.."
                    f"{int(math.log(max_leaves, self.branch_factor))} (--max_leaves {max_leaves}), got {m}")
        require(0 <= self.dynamic_spread_decay < 1, f"--dynamic_spread_decay: need [0, 1), got {self.dynamic_spread_decay}")
        require(self.adaptive_split_window >= 1, f"--adaptive_split_window: need >= 1, got {self.adaptive_split_window}")
        lo, hi = self.split_range(T)
        require(0 <= lo <= hi <= T - 2, f"--adaptive_split_range: need 0 <= lo <= hi <= {T - 2}, got {lo},{hi}")
        require(self.adaptive_split_min_spacing >= 1, "--adaptive_split_min_spacing: need >= 1")
        require(self.adaptive_split_margin >= 0, f"--adaptive_split_margin: need >= 0, got {self.adaptive_split_margin}")
        require(0 < self.innovation_target < 1, f"--innovation_target: need (0, 1), got {self.innovation_target}")
        require(self.innovation_gain > 0, f"--innovation_gain: need > 0, got {self.innovation_gain}")
        require(0 < self.innovation_min <= 1, f"--innovation_min: need (0, 1], got {self.innovation_min}")
        require(0 < self.guided_top_fraction <= 1, f"--guided_top_fraction: need (0, 1], got {self.guided_top_fraction}")
        require(1 <= self.guided_reduced_children < self.branch_factor, f"--guided_reduced_children: need 1.."
                f"{self.branch_factor - 1}, got {self.guided_reduced_children}")

    def max_splits(self, points: list[int], T: int) -> int:
        return self.dynamic_max_splits if self.dynamic_max_splits is not None else len(points) + 1

    def split_range(self, T: int) -> tuple[int, int]:
        if not self.adaptive_split_range.strip():
            return 0, T - 2
        lo, hi = parse_int_list(self.adaptive_split_range, "--adaptive_split_range")
        return lo, hi

    def _report_split_points(self, points: list[int], num_steps: int) -> None:
        """Say which split points are used when they are not the flag's text as given: derived from
        --tree_split_rounds (empty flag), or put in ascending order."""
        used = ",".join(map(str, points))
        key = (self.tree_split_points, self.tree_split_rounds, num_steps)
        if key in _REPORTED:  # the unit is validated each time it is built: say it once per process
            return
        _REPORTED.add(key)
        if not self.tree_split_points.strip():
            log.info("--tree_split_points is empty: splitting at steps %s (--tree_split_rounds %d over %d steps)",
                     used, self.tree_split_rounds, num_steps)
        elif parse_int_list(self.tree_split_points, "--tree_split_points") != points:
            log.warning("--tree_split_points '%s' is not in ascending order; the tree splits at steps %s",
                        self.tree_split_points, used)

    def conditions(self) -> dict[str, tuple[bool, str]]:
        return {
            **{name: (self.mix_ode_sde_tree, "--mix_ode_sde_tree") for name in window_flag_names()},
            "width_pruning_ratio": (self.width_pruning_mode == 2, "--width_pruning_mode 2"),
            "depth_pruning_slide": (bool(self.depth_pruning.strip()), "a non-empty --depth_pruning"),
            "depth_pruning_slide_interval": (self.depth_pruning_slide, "--depth_pruning_slide"),
            "depth_pruning_stop_depth": (self.depth_pruning_slide, "--depth_pruning_slide"),
            **{name: (on, flagname) for on, flagname, names in (
                (self.dynamic_allocation, "--dynamic_allocation", ("dynamic_budget_ratio", "dynamic_max_splits",
                                                                   "dynamic_spread_decay")),
                (self.adaptive_splits, "--adaptive_splits", ("adaptive_split_window", "adaptive_split_range",
                                                             "adaptive_split_min_spacing", "adaptive_split_margin")),
                (self.adaptive_innovation, "--adaptive_innovation", ("innovation_target", "innovation_gain",
                                                                     "innovation_min")),
                (self.guided_expansion, "--guided_expansion", ("guided_top_fraction", "guided_reduced_children",
                                                               "guided_importance_weights"))) for name in names},
        }

    def selection_summary(self) -> str:
        return (f"--depth_pruning '{self.depth_pruning}' / --width_pruning_mode {self.width_pruning_mode} / "
                f"--mix_ode_sde_tree {self.mix_ode_sde_tree}")


@register_algorithm
class BranchGRPO(Algorithm):
    name = "branchgrpo"
    Config = BranchGRPOConfig
    default_kernel = "dance"
    presets = {
        "branchgrpo": ("BranchGRPO", _PAPER_TREE),
        "branchgrpo_widpru": ("BranchGRPO-WidPru", [*_PAPER_TREE, "--width_pruning_mode", "1"]),
        "branchgrpo_deppru": ("BranchGRPO-DepPru", [*_PAPER_TREE, "--depth_pruning", "15,16,17,18",
                                                    "--depth_pruning_slide", "--depth_pruning_slide_interval",
                                                    "{interval}", "--depth_pruning_stop_depth", "9"]),
        "branchgrpo_mix": ("BranchGRPO-Mix", [*_PAPER_TREE, "--mix_ode_sde_tree", "--mix_sde_window_size", "4",
                                              "--mix_window_interval", "{interval}"]),
    }

    def __init__(self, cfg: BranchGRPOConfig, sampling, **kwargs):
        super().__init__(cfg, sampling, **kwargs)
        self._fixed_points = cfg.split_points(self.num_steps)
        self.schedules["window"] = cfg.window_schedule(self.num_steps) if cfg.mix_ode_sde_tree else None
        stop = cfg.depth_pruning_stop_depth
        if stop is None and cfg.depth_pruning_slide:
            stop = max(self._fixed_points)  # the official default
        self.depth_schedule = DepthPruningSchedule(
            depths=tuple(cfg.pruned_depths), slide=cfg.depth_pruning_slide, interval=cfg.depth_pruning_slide_interval,
            stop_depth=stop, step_ratio=cfg.pruning_step_ratio, max_train_steps=self.max_train_steps)
        self.schedules["depth_schedule"] = self.depth_schedule
        T, points = self.num_steps, self._fixed_points
        self.schedules["allocation"] = dyn.SpreadAllocation(cfg.dynamic_spread_decay) if cfg.dynamic_allocation else None
        lo, hi = cfg.split_range(T)
        self.schedules["splits"] = dyn.SplitPlacement(points, cfg.adaptive_split_window, lo, hi,
                                                      cfg.adaptive_split_min_spacing, cfg.adaptive_split_margin
                                                      ) if cfg.adaptive_splits else None
        self.schedules["innovation"] = dyn.InnovationControl(cfg.branch_innovation, len(points), cfg.innovation_target,
                                                             cfg.innovation_gain, cfg.innovation_min
                                                             ) if cfg.adaptive_innovation else None

    @property
    def split_points(self) -> list[int]:
        """The current split steps (moved by --adaptive_splits; the flag's otherwise)."""
        placement = self.schedules["splits"]
        return list(placement.points) if placement is not None else self._fixed_points

    @property
    def branch_innovation(self) -> float:
        return self.cfg.branch_innovation

    def _tree(self, iteration: int, points: list[int]) -> GraphPlan:
        window = self.schedules["window"]
        return tree_plan(self.num_steps, points, self.cfg.branch_factor,
                         sde_steps=window.window(iteration) if window else None,
                         split_noise_scale=self.cfg.tree_split_noise_scale)

    def plan(self, iteration: int) -> GraphPlan:
        """The fixed tree at the current split steps; with --guided_expansion, a tree of the node counts it gives
        (which nodes are fully expanded depends on the rewards; how many does not)."""
        c = self.cfg
        if c.guided_expansion:
            window = self.schedules["window"]
            return dyn.guided_plan(self.num_steps, self.split_points, c.branch_factor, c.guided_reduced_children,
                                   c.guided_top_fraction, c.tree_split_noise_scale,
                                   window.window(iteration) if window else None)
        return self._tree(iteration, self.split_points)

    # --- dynamic branching -----------------------------------------------------------------------------------
    def ladder(self) -> tuple[list[list[int]], list[int], int]:
        """Allocation's trees (split lists, smallest first), their rollout forward passes, the fixed tree's rung."""
        points = self.split_points
        ladder = dyn.tree_ladder(self.num_steps, points, self.cfg.max_splits(points, self.num_steps))
        return ladder, dyn.ladder_counts(self.num_steps, ladder, self.cfg.branch_factor), len(points) - 1

    def rollout_budget(self, num_prompts: int) -> int:
        """Rollout forward passes per iteration and rank that --dynamic_allocation may spend."""
        _, costs, default = self.ladder()
        return int(math.floor(self.cfg.dynamic_budget_ratio * num_prompts * costs[default]))

    def prompt_plans(self, iteration: int, prompt_ids: list[int]) -> list[GraphPlan]:
        ladder, costs, default = self.ladder()
        history = self.schedules["allocation"].spread
        rungs = dyn.allocate([history.get(p) for p in prompt_ids], costs, default, self.rollout_budget(len(prompt_ids)))
        return [self._tree(iteration, ladder[r]) for r in rungs]

    def rollout(self, iteration: int, run, prompt_ids: list[int], score=None) -> RolloutGraph:
        c, innovation = self.cfg, self.schedules["innovation"]
        if not (c.dynamic_allocation or c.guided_expansion or innovation is not None):
            return super().rollout(iteration, run, prompt_ids, score)
        plans = self.prompt_plans(iteration, prompt_ids) if c.dynamic_allocation else self._tree(iteration, self.split_points)
        r = innovation.by_child_depth(self.split_points) if innovation is not None else c.branch_innovation

        def expand(nodes, x0, prompt):  # the split nodes' x0-predictions, rewarded
            return dyn.guided_children(score(x0, prompt), prompt, c.guided_top_fraction, c.branch_factor,
                                       c.guided_reduced_children)
        return run(plans, branch_innovation=r, expand=expand if c.guided_expansion else None)

    def observe(self, graph: RolloutGraph, leaf_rewards: torch.Tensor, prompt_ids: list[int], iteration: int) -> dict:
        """Feed the iteration's statistics to the adaptive policies; returns what they log."""
        allocation, splits, innovation = (self.schedules[k] for k in ("allocation", "splits", "innovation"))
        out: dict = {}
        if allocation is not None:
            spreads = distributed.all_gather_cat(dyn.prompt_spreads(graph, leaf_rewards))
            ids = distributed.all_gather_cat(torch.tensor(prompt_ids, dtype=torch.long)).tolist()
            allocation.observe(ids, spreads)
            out["allocation_leaves_per_prompt"] = int(graph.is_leaf.sum()) / graph.num_prompts
        if splits is not None or innovation is not None:
            spread = self._reduced_spread(graph, self._fused(graph, leaf_rewards))
            points = self.split_points  # before a move: the splits the statistics were measured at
            if innovation is not None:
                innovation.observe(points, spread)
                out["innovation_r"] = ",".join(f"{r:.4g}" for r in innovation.r)
            if splits is not None:
                splits.observe(spread)
                out["split_points"] = ",".join(map(str, self.split_points))
        if self.cfg.guided_expansion:
            out["guided_decodes"] = int(torch.isin(graph.step, torch.tensor(self.split_points)).sum())
        if out:
            out["rollout_forward_passes"] = graph.num_forward_passes
        return out

    def _fused(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        weights = dyn.leaf_log_weights(graph) if self._importance_weighted(graph) else None
        return adv.fuse_rewards(graph, leaf_rewards, self.cfg.alpha, weights)

    def _reduced_spread(self, graph: RolloutGraph, values: torch.Tensor) -> dict[int, tuple[float, float]]:
        """`split_spread` summed over ranks (weighted by prompts): the same statistics on every rank."""
        sums = torch.zeros(self.num_steps + 1, 3, dtype=torch.float64)
        for s, (w, ratio, n) in dyn.split_spread(graph, values).items():
            sums[s] = torch.tensor([w * n, ratio * n, n], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums)
        return {s: (float(sums[s, 0] / sums[s, 2]), float(sums[s, 1] / sums[s, 2]))
                for s in range(self.num_steps + 1) if sums[s, 2] > 0}

    def _importance_weighted(self, graph: RolloutGraph) -> bool:
        return self.cfg.guided_expansion and self.cfg.guided_importance_weights and graph.prompt_plans is not None

    def counts(self, iteration: int = 0) -> dict:
        out = super().counts(iteration)
        c, lines = self.cfg, {}
        if c.dynamic_allocation:
            ladder, costs, default = self.ladder()
            lines["dynamic_allocation"] = (
                f"budget {c.dynamic_budget_ratio:g} x {costs[default]} = {c.dynamic_budget_ratio * costs[default]:.6g} "
                "rollout forwards per prompt (averaged over a rank's prompts); trees " + ", ".join(
                    f"[{','.join(map(str, pts))}]: {c.branch_factor ** len(pts)} leaves / {f} forwards"
                    for pts, f in zip(ladder, costs)))
        if c.adaptive_splits:
            lo, hi = c.split_range(self.num_steps)
            lines["adaptive_splits"] = (f"{len(self.split_points)} splits (leaves fixed) within steps {lo}..{hi}, "
                                        f"spacing >= {c.adaptive_split_min_spacing}, moved every "
                                        f"{c.adaptive_split_window} iterations; forwards vary with the placement")
        if c.adaptive_innovation:
            lines["adaptive_innovation"] = (f"r per split in [{c.innovation_min:g}, 1] toward a within-parent variance "
                                            f"share of {c.innovation_target:g}; no change in forward passes")
        if c.guided_expansion:
            full = plan_counts(self._tree(iteration, self.split_points))
            decodes = sum(int((self.plan(iteration).step == s).sum()) for s in self.split_points)
            lines["guided_expansion"] = (f"{out['forward_passes']} rollout forwards (fixed tree: "
                                         f"{full['forward_passes']}), {out['leaves']} leaves, plus {decodes} decodes "
                                         "and reward calls of x0-predictions per prompt")
        if lines:
            out["policies"] = lines
        return out

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        if self._importance_weighted(graph):
            return adv.tree_advantages(graph, leaf_rewards, self.cfg.alpha, dyn.leaf_log_weights(graph))
        return adv.tree_advantages(graph, leaf_rewards, self.cfg.alpha)

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        c = self.cfg
        keep = graph.stochastic.clone()
        keep &= depth_pruning_mask(graph, self.depth_schedule.pruned_depths(iteration))
        if c.width_pruning_mode and self.depth_schedule.active(iteration):
            last_split = max(self.split_points)
            if c.width_pruning_mode == 1:
                keep &= parent_top1_mask(graph, advantages, last_split)
            else:
                keep &= extreme_mask(graph, advantages, last_split, c.width_pruning_ratio)
        return keep

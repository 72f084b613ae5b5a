"""DiffusionNFT (Zheng et al. 2025): online RL on the FORWARD process. theta_old collects final samples with a
deterministic sampler (no CFG); each sample's reward, standardised within its prompt's group (by default with the
standard deviation of all the iteration's rewards), becomes an optimality probability r; training noises the samples
afresh at timesteps of the sampler's grid and pulls the implicit positive velocity towards the good samples and the
implicit negative one towards the bad (branchgrpo.core.nft). No log-prob, no ratio, no rollout edge is trained: the
unit brings its own training objective (`NFTObjective`), which the common PolicyUpdate drives, and keeps theta_old,
a second copy of the trained weights moved softly towards theta after every iteration.

Samplers (`--nft_sampler`): `ode`, G independent Euler ODE chains per prompt (the reference's); `dpm2`, the same
chains by the 2nd-order multistep DPM-Solver++ (as many forwards, a smaller discretisation error); `tree`, the
BranchGRPO tree with its splits as the only stochastic steps (ODE between them) - K^|S| correlated samples for about
(nodes with children) forwards instead of T per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.algorithms import register_algorithm
from branchgrpo.algorithms.base import Algorithm, GlobalStdFlags, GroupFlags, TrainingObjective, iteration_std
from branchgrpo.core import advantages as adv
from branchgrpo.core import nft
from branchgrpo.core.flags import flag, parse_int_list, require
from branchgrpo.core.graph import GraphPlan, RolloutGraph, plan_counts
from branchgrpo.core.plans import group_plan, tree_plan
from branchgrpo.core.rollout import RolloutSetup, multistep_rollout
from branchgrpo.core.seeding import keyed_normal, keyed_permutation, mix_key

_NFT = ["--algo", "diffusion_nft", "--nft_beta", "1.0", "--kl_coef", "1e-4"]


@dataclass
class DiffusionNFTConfig(GroupFlags, GlobalStdFlags):
    nft_sampler: str = flag("ode", "diffusion_nft: sampler of the training data: ode (G Euler chains per prompt), "
                            "dpm2 (G chains, 2nd-order multistep DPM-Solver++) or tree (the BranchGRPO tree of "
                            "--nft_split_points, SDE at the splits, ODE between)", ("ode", "dpm2", "tree"))
    nft_beta: float = flag(1.0, "diffusion_nft: beta of the implicit policies v+- (1.0; 0.1 in the OCR and "
                           "multi-reward recipes)")
    nft_timestep_fraction: float = flag(1.0, "diffusion_nft: fraction of the sampler's T timesteps each sample is "
                                        "trained at (a random subset per sample)")
    nft_decay: str = flag("linear", "diffusion_nft: schedule of d in theta_old <- d theta_old + (1 - d) theta: linear "
                          "min(0.001 step, 0.5), delayed (OCR: 0 for 75 steps, then +0.0075 per step up to 0.999) or "
                          "none (theta_old = theta)", tuple(nft.DECAY_SCHEDULES))
    nft_split_points: str = flag("0,3,6,9", "diffusion_nft --nft_sampler tree: steps where every node branches")
    nft_branch_factor: int = flag(2, "diffusion_nft --nft_sampler tree: children per split (K)")

    def split_points(self) -> list[int]:
        return sorted(parse_int_list(self.nft_split_points, "--nft_split_points"))

    def trained_timesteps(self, num_steps: int) -> int:
        return int(self.nft_timestep_fraction * num_steps + 1e-9)

    def num_leaves(self, sampling) -> int:
        if self.nft_sampler == "tree":
            return self.nft_branch_factor ** len(self.split_points())
        return self.num_generations

    def validate(self, sampling) -> None:
        T = sampling.sampling_steps
        if self.nft_sampler != "tree":
            super().validate(sampling)
            require(not sampling.init_same_noise, f"--init_same_noise with --nft_sampler {self.nft_sampler}: every "
                    "chain would start from the same noise and, deterministic, end at the same sample")
        require(self.nft_beta > 0, f"--nft_beta: need > 0, got {self.nft_beta}")
        f = self.nft_timestep_fraction
        require(0 < f <= 1, f"--nft_timestep_fraction: need a value in (0, 1], got {f}")
        require(self.trained_timesteps(T) >= 1, f"--nft_timestep_fraction {f} trains no timestep of {T}")
        if self.nft_sampler == "tree":
            for p in self.split_points():
                require(0 <= p <= T - 2, f"--nft_split_points: {p} is outside 0..{T - 2} (the last step is "
                        "deterministic)")
            require(self.nft_branch_factor >= 2, f"--nft_branch_factor: need >= 2, got {self.nft_branch_factor}")

    def conditions(self) -> dict[str, tuple[bool, str]]:
        tree = self.nft_sampler == "tree"
        return {"nft_split_points": (tree, "--nft_sampler tree"), "nft_branch_factor": (tree, "--nft_sampler tree"),
                "num_generations": (not tree, "--nft_sampler ode or dpm2")}


@register_algorithm
class DiffusionNFT(Algorithm):
    name = "diffusion_nft"
    Config = DiffusionNFTConfig
    default_kernel = "dance"  # acts only at the tree sampler's splits
    keeps_old_policy = True
    tiny_flags = ("--num_generations", "4")
    presets = {
        "diffusion_nft": ("DiffusionNFT (ODE, G=16)", [*_NFT, "--nft_sampler", "ode", "--num_generations", "16"]),
        "diffusion_nft_tree": ("DiffusionNFT (tree sampler)", [*_NFT, "--nft_sampler", "tree", "--nft_split_points",
                                                               "0,3,6,9", "--nft_branch_factor", "2",
                                                               "--sde_kernel", "dance", "--eta", "0.3"]),
    }

    def plan(self, iteration: int) -> GraphPlan:
        if self.cfg.nft_sampler == "tree":
            return tree_plan(self.num_steps, self.cfg.split_points(), self.cfg.nft_branch_factor, sde_steps=())
        return group_plan(self.num_steps, self.cfg.num_generations, sde_steps=())

    def rollout(self, iteration: int, setup: RolloutSetup, prompt_ids: list[int], scorer=None) -> RolloutGraph:
        if self.cfg.nft_sampler == "dpm2":
            return multistep_rollout(setup, self.plan(iteration))
        return super().rollout(iteration, setup, prompt_ids, scorer)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        """A on the leaves (NaN elsewhere): the reward minus its prompt's mean, over the std of every finite reward
        of the iteration on all ranks (--global_std; a collective) or of the prompt's own."""
        leaves = graph.leaves
        std = iteration_std(leaf_rewards) if self.cfg.global_std else None
        z = adv.standardize(leaf_rewards, graph.prompt[leaves], scale=std)
        out = torch.full((graph.num_nodes,), float("nan"), dtype=torch.float64)
        out[leaves] = z
        return out

    def select(self, graph: RolloutGraph, advantages: torch.Tensor, iteration: int,
               prompt_keys: tuple[int, ...] = ()) -> torch.Tensor:
        """The final samples (leaves), not edges: the objective trains on them."""
        return graph.is_leaf & (graph.group >= 0)

    def objective(self, loss_cfg) -> TrainingObjective:
        return NFTObjective(self.cfg.nft_beta, loss_cfg.adv_clip_max, loss_cfg.kl_coef,
                            self.cfg.trained_timesteps(self.num_steps))

    def old_policy_decay(self, step: int) -> float:
        return nft.old_policy_decay(step, self.cfg.nft_decay)

    def counts(self, iteration: int = 0) -> dict:
        """The plan's rollout counts; "trained edges" are the (sample, timestep) rows, one training forward each."""
        counts = plan_counts(self.plan(iteration))
        k = self.cfg.trained_timesteps(self.num_steps)
        rows = counts["leaves"] * k
        counts.update(trained_edges=rows, trained_edges_per_leaf=k, train_forward_passes=rows,
                      train_forward_passes_per_leaf=k)
        return counts


class NFTObjective(TrainingObjective):
    """DiffusionNFT's loss over (sample, timestep) rows: each selected leaf's sample x0 noised afresh at
    `num_timesteps` timesteps of the rollout's own sigma grid (sigma_0..sigma_{T-1}, a keyed random subset per
    sample); v_old (and the base model's v_ref for the velocity penalty, --kl_coef) computed once per iteration
    before the loop, since theta_old and the base do not move during it."""

    def __init__(self, beta: float, adv_max: float, kl_coef: float, num_timesteps: int):
        self.beta, self.adv_max, self.kl_coef, self.num_timesteps = beta, adv_max, kl_coef, num_timesteps
        self.rows = self.leaves = 0
        self.penalty = False

    def rows_of(self, graph: RolloutGraph, num_samples: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample [R], t [R] fp32): each sample at `num_timesteps` distinct grid points, a keyed permutation's
        first ones."""
        steps = graph.sigmas.numel() - 1
        k = self.num_timesteps
        picks = [keyed_permutation(steps, mix_key(key, "t", i))[:k] for i in range(num_samples)]
        t_index = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
        return torch.arange(num_samples).repeat_interleave(k), graph.sigmas[t_index].to(torch.float32)

    def prepare(self, update, graph: RolloutGraph, embeddings: dict, edges, iteration: int):
        key = mix_key(update.seed, iteration, "nft", update.rank)
        sample, t = self.rows_of(graph, edges.child.numel(), key)
        weight = edges.weight[sample]
        order = keyed_permutation(sample.numel(), mix_key(key, "order"))
        size = update.optim_cfg.train_micro_batch_size
        batches, windows = update.windows([order[i : i + size] for i in range(0, order.numel(), size)], weight)
        r = nft.optimality_probability(edges.advantage.double(), self.adv_max)  # A is clipped to +-A_max already
        x0_all = graph.node_latents(edges.child) if edges.child.numel() else graph.node_latents(graph.leaves[:1])
        prompt = graph.prompt[edges.child]
        tables = []
        for j, idx in enumerate(batches):
            if idx.numel() == 0:  # padding: one zero-weight forward of any sample
                tables.append({"pad": x0_all[:1]})
                continue
            s = sample[idx]
            x0 = x0_all[s.to(x0_all.device)].to(update.device)
            tt = t[idx].to(update.device)
            eps = keyed_normal(tuple(x0.shape), mix_key(key, "eps", j), update.device)
            tables.append({"x0": x0, "t": tt, "x_t": nft.noised(x0, eps, tt), "prompt": prompt[s].to(update.device),
                           "r": r[s].to(update.device), "weight": weight[idx].to(update.device)})
        live = [mb for mb in tables if "x0" in mb]
        self.penalty = self.kl_coef > 0 and update.reference is not None
        with torch.no_grad():
            with update.old_policy():
                for mb in live:
                    mb["v_old"] = update.velocity(embeddings, mb["x_t"], mb["t"], mb["prompt"])
            if self.penalty:
                with update.reference():
                    for mb in live:
                        mb["v_ref"] = update.velocity(embeddings, mb["x_t"], mb["t"], mb["prompt"])
        self.rows, self.leaves = float(sample.numel()), graph.leaves.numel()
        return batches, tables, windows

    def loss(self, update, graph: RolloutGraph, embeddings: dict, mb: dict, normaliser: float):
        if "x0" not in mb:  # padding keeps every rank's collectives in step
            v = update.velocity(embeddings, mb["pad"], torch.ones(1, device=update.device),
                                torch.zeros(1, dtype=torch.long, device=update.device))
            return 0.0 * v.sum(), None
        v = update.velocity(embeddings, mb["x_t"], mb["t"], mb["prompt"])
        per_row, positive, negative = nft.nft_loss(v, mb["v_old"], mb["x_t"], mb["t"], mb["x0"], mb["r"], self.beta,
                                                   self.adv_max)
        weight = mb["weight"].double()
        out = {}
        if self.penalty:
            kl = nft.velocity_penalty(v, mb["v_ref"]).double()
            per_row = per_row + self.kl_coef * kl
            out["kl_sum"] = (kl.detach() * weight).sum()
        finite = torch.isfinite(per_row)
        live = finite & (weight > 0)
        loss = torch.where(live, per_row * weight, torch.zeros_like(per_row)).sum() / normaliser
        live_weight = torch.where(live, weight, torch.zeros_like(weight))
        out.update(num_rows=live_weight.sum(), positive_sum=(positive.detach().nan_to_num() * live_weight).sum(),
                   negative_sum=(negative.detach().nan_to_num() * live_weight).sum(),
                   nonfinite=(~finite & (weight > 0)).sum().double())
        return loss, out

    def accumulate(self, acc: dict, out: dict) -> dict:
        return {k: acc.get(k, 0.0) + v for k, v in out.items()}

    def figures(self, read: dict) -> dict:
        n = max(read.get("num_rows", 0.0), 1.0)
        return {
            "nonfinite_edges": read.get("nonfinite", 0.0),
            "clip_fraction": 0.0, "approx_kl": 0.0,  # no ratio: nothing is clipped
            "kl": read.get("kl_sum", 0.0) / n,
            "ratio_min": 1.0, "ratio_max": 1.0, "first_ratio_min": 1.0, "first_ratio_max": 1.0,
            "train_forward_rows": self.rows,
            "extra_forward_rows": self.rows * (1 + self.penalty),  # v_old, and v_ref with the penalty
            "train_nfe": self.rows / max(self.leaves, 1),  # training forwards per leaf (not edges)
            "nft_loss_positive": read.get("positive_sum", 0.0) / n,
            "nft_loss_negative": read.get("negative_sum", 0.0) / n,
        }

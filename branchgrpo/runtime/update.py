"""The policy update of one iteration: the loop around a training objective - by default (`EdgeObjective`) the
clipped GRPO surrogate (paper Eq. 5) over the selected edges (with `--ratio_norm`, over GRPO-Guard's normalised
log-ratio, the loss reweighted per step); a unit may bring its own (`Algorithm.objective`: DiffusionNFT's loss
on final samples), which the same loop drives. What follows describes the edge objective; the loop's rules
(accumulation, clipping every step, padding, skipped steps, cut points) hold for every objective.

Batch semantics (logged at start-up):
- Edges sharing a parent (split siblings, G2RPO's members) are re-scored from ONE forward of that parent, so they
  always land in the same micro-batch. A micro-batch holds up to `--train_micro_batch_size` distinct parents.
- Parent groups are shuffled (keyed by seed, iteration, rank) and packed into micro-batches; every
  `--gradient_accumulation_steps` micro-batches (0: all of them) make one optimizer step, the loss being the mean
  over the step's edges. Gradients are clipped on EVERY optimizer step, including a shorter last one.
- Every rank runs the same number of micro-batches (shorter ranks pad with zero-weight ones), so DDP/FSDP
  collectives stay in step. A non-finite log-prob, ratio or loss zero-weights its edge on that rank (its log-prob is
  replaced by the old one before the ratio, so no inf reaches the backward; `losses.guard_non_finite`). A NaN in
  the model's output still reaches the gradient; a non-finite gradient norm - the same number on every rank after
  the all-reduce - skips that optimizer step on every rank, and both are counted in the metrics.
- A diverged run does not carry on: the results list which optimizer steps were applied, and the divergence guard
  (branchgrpo.runtime.guards.DivergenceGuard) stops the run after `--max_skipped_steps` skipped ones in a row.
- Preemption (branchgrpo.runtime.preemption): a cut point before every micro-batch; an iteration with several optimizer steps
  first copies the trainable state to host memory, so that a cut after a step can still save the boundary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from branchgrpo.algorithms.base import TrainingObjective
from branchgrpo.core import distributed, sde
from branchgrpo.core.graph import RolloutGraph
from branchgrpo.core.losses import (
    clipped_surrogate,
    guard_non_finite,
    kl_penalty,
    merge_stats,
    normalized_log_ratio,
    policy_stats,
    read_stats,
    step_mean_std,
)
from branchgrpo.models.base import FlowAdapter, gather_cond
from branchgrpo.runtime.parallel import clip_grad_norm, gradient_sync
from branchgrpo.core.seeding import keyed_permutation, mix_key
from branchgrpo.core.transfer import to_device_once

log = logging.getLogger(__name__)


@dataclass
class Edges:
    """The edges trained this iteration, identified by their child nodes (all tensors [E], CPU)."""

    child: torch.Tensor
    parent: torch.Tensor
    advantage: torch.Tensor  # float32, 0 where weight is 0
    weight: torch.Tensor  # float32: 1, or 0 for edges without a finite advantage
    old_log_prob: torch.Tensor  # float32


def select_edges(graph: RolloutGraph, trained: torch.Tensor, advantages: torch.Tensor, clip: float) -> Edges:
    """The edges of mask `trained`, their advantages clipped to +-`clip` (--adv_clip_max) for the loss."""
    child = torch.nonzero(trained).flatten()
    adv = advantages[child].clamp(-clip, clip).to(torch.float32)
    finite = torch.isfinite(adv)
    return Edges(child=child, parent=graph.parent[child], advantage=torch.where(finite, adv, torch.zeros_like(adv)),
                 weight=finite.to(torch.float32), old_log_prob=graph.log_prob[child].clone())


def plan_micro_batches(parents: torch.Tensor, max_parents: int, key: int) -> list[torch.Tensor]:
    """Edge indices per micro-batch: parent groups shuffled, then packed `max_parents` at a time."""
    unique, which = torch.unique(parents, return_inverse=True)
    order = keyed_permutation(unique.numel(), key)
    batches = []
    for start in range(0, unique.numel(), max_parents):
        groups = order[start : start + max_parents]
        batches.append(torch.nonzero(torch.isin(which, groups)).flatten())
    return batches


class PolicyUpdate:
    """The update of one iteration: micro-batches, gradient accumulation, clipping and optimizer steps around a
    training objective - the unit's own (`Algorithm.objective`, e.g. DiffusionNFT's loss on final samples) or, by
    default, the clipped surrogate over the selected rollout edges (`EdgeObjective`). Takes the optimisation and loss
    sections of the config (`optim_cfg`: micro-batching, accumulation, gradient clipping, --recompute_old_log_prob;
    `loss_cfg`: clip range, KL). The objective calls back into it for the forwards (`velocity`, `reference`,
    `old_policy`) and for the micro-batch bookkeeping every rank must agree on (`windows`)."""

    def __init__(self, adapter: FlowAdapter, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, optim_cfg, loss_cfg, seed: int, kernel: sde.Kernel, device: torch.device,
                 autocast: Callable, reference: Callable | None, rank: int, preemption=None,
                 objective: TrainingObjective | None = None, old_policy=None):
        self.adapter, self.model, self.optimizer, self.scheduler = adapter, model, optimizer, scheduler
        self.optim_cfg, self.loss_cfg, self.seed = optim_cfg, loss_cfg, seed
        self.kernel, self.device, self.autocast = kernel, device, autocast
        self.reference = reference  # context manager factory: inside it adapter.velocity is the reference policy
        self.rank = rank
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.preemption = preemption  # branchgrpo.runtime.preemption.Preemption, or None
        self.objective = objective if objective is not None else EdgeObjective(loss_cfg)
        self.old_policy_copy = old_policy  # runtime.ema.EMA holding theta_old, for objectives that use one

    # --- services of the objectives ----------------------------------------------------------------------------
    def velocity(self, embeddings: dict, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The policy's velocity (fp32) for latents `x` at `sigma` [B] of the batch's prompts `prompt` [B]: the
        current weights, or those of `reference()` / `old_policy()` inside them."""
        cond = gather_cond(embeddings, prompt)
        with self.autocast():
            return self.adapter.velocity(x, sigma, cond).float()

    def old_policy(self):
        """Context manager: inside it the model holds theta_old (units with `keeps_old_policy`)."""
        assert self.old_policy_copy is not None, "this objective needs an old-policy copy (Algorithm.keeps_old_policy)"
        return self.old_policy_copy.swapped_in(self.model)

    def windows(self, batches: list[torch.Tensor], weight: torch.Tensor) -> tuple[list[torch.Tensor], list]:
        """`batches` (row indices per micro-batch) padded with empty ones to the same count on every rank, and the
        optimizer steps' windows of micro-batches with the weight each holds (its loss is divided by that)."""
        num_micro = int(distributed.all_reduce_max(torch.tensor(len(batches))).item())
        batches = batches + [torch.zeros(0, dtype=torch.long)] * (num_micro - len(batches))  # zero-weight padding
        accum = self.optim_cfg.gradient_accumulation_steps or max(num_micro, 1)  # nothing at all: no optimizer step
        windows = [range(start, min(start + accum, num_micro)) for start in range(0, num_micro, accum)]
        counts = [float(sum(weight[batches[i]].sum() for i in w)) for w in windows]
        return batches, list(zip(windows, counts))

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self, graph: RolloutGraph, embeddings: dict, edges: Edges, iteration: int) -> dict:
        """Host syncs: none per micro-batch (a preemption check across ranks aside), one per optimizer step (the
        gradient norm decides whether the step is applied), one at the end for the statistics."""
        cfg = self.optim_cfg
        self.model.train()
        batches, tables, windows = self.objective.prepare(self, graph, embeddings, edges, iteration)
        num_micro = len(batches)
        stats, losses, norms, applied = {}, [], [], []
        if self.preemption is not None and len(windows) > 1:
            self.preemption.keep_weights(self.params, self.optimizer)
        for window, weight in windows:
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for i in window:
                if self.preemption is not None:
                    self.preemption.cut_point()
                with gradient_sync(self.model, enabled=i == window[-1]):
                    loss, mb = self.objective.loss(self, graph, embeddings, tables[i], max(weight, 1.0))
                    if loss.requires_grad:  # not when its rows belong to a frozen part only (a Wan2.2 expert left
                        loss.backward()  # out of training); the same on every rank: they run the same parts
                step_loss = step_loss + loss.detach().double()
                if mb:
                    stats = self.objective.accumulate(stats, mb)
            norm = clip_grad_norm(self.params, cfg.max_grad_norm)
            applied.append(bool(torch.isfinite(norm)))
            if applied[-1]:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            norms.append(norm)
        self.model.eval()
        read = read_stats({**stats, **{f"loss{i}": t for i, t in enumerate(losses)}})
        norms = torch.stack(norms).tolist() if norms else []  # host tensors (clip_grad_norm read them back)
        return {
            "loss": sum(read[f"loss{i}"] for i in range(len(losses))) / max(len(losses), 1),
            "grad_norm": sum(norms) / max(len(norms), 1),
            "optimizer_steps": len(applied),
            "skipped_steps": applied.count(False),
            "applied_steps": applied,  # in order, for the divergence guard
            "micro_batches": num_micro,
            **self.objective.figures(read),
        }


class EdgeObjective(TrainingObjective):
    """The clipped GRPO surrogate (paper Eq. 5, + KL) over the selected rollout edges, re-scored under the current
    policy with the rollout's own step function: the objective of every unit that does not bring its own."""

    def __init__(self, loss_cfg):
        self.loss_cfg = loss_cfg

    def layout(self, update: PolicyUpdate, graph: RolloutGraph, edges: Edges,
               batches: list[torch.Tensor]) -> list[dict]:
        """What each micro-batch's forward and loss need on the device - latent rows, sigmas, prompts, each edge's
        parent row, std scales, old log-probs, advantages, weights - laid out on the host and moved in one copy per
        dtype, so that the micro-batch loop itself never waits for a host-to-device copy."""
        sigmas, std_scale = graph.sigmas.float(), graph.std_scale
        tables = []
        for idx in batches:
            if idx.numel() == 0:  # padding: one forward of any stored latent, weight 0
                tables.append({"x_rows": graph.latent_row[edges.parent[:1] if edges.parent.numel() else
                                                          graph.leaves[:1]]})
                continue
            parents, row = torch.unique(edges.parent[idx], return_inverse=True)
            children = edges.child[idx]
            tables.append({"x_rows": graph.latent_row[parents], "sigma_from": sigmas[graph.step[parents]],
                           "prompt": graph.prompt[parents], "row": row, "sigma_to": sigmas[graph.step[children]],
                           "sample_rows": graph.latent_row[children], "std_scale": std_scale[children],
                           "old": edges.old_log_prob[idx], "advantage": edges.advantage[idx],
                           "weight": edges.weight[idx]})
            if self.loss_cfg.ratio_norm:  # GRPO-Guard: the edges' steps (for s_t) and sigma - sigma_next
                parent_sigma = graph.sigmas[graph.step[edges.parent[idx]]]
                tables[-1].update(step=graph.step[children],
                                  dt=(parent_sigma - graph.sigmas[graph.step[children]]).float())
        rows = [t[k] for t in tables for k in ("x_rows", "sample_rows") if k in t]
        assert not rows or bool((torch.cat(rows) >= 0).all()), "latent of a node that was not kept"
        to_device_once(tables, update.device)
        return tables

    def prepare(self, update: PolicyUpdate, graph: RolloutGraph, embeddings: dict, edges: Edges, iteration: int):
        """Host-side, before the loop: the micro-batches (edge indices, padded to the same count on every rank),
        their device tables and the optimizer steps' windows; then, with --recompute_old_log_prob, pi_old re-scored
        by the training forward."""
        key = mix_key(update.seed, iteration, "mb", update.rank)
        batches = plan_micro_batches(edges.parent, update.optim_cfg.train_micro_batch_size, key)
        batches, windows = update.windows(batches, edges.weight)
        tables = self.layout(update, graph, edges, batches)
        # training forwards (distinct parents), and those without a backward: the KL reference's, and
        # --recompute_old_log_prob's (counted for the comparison harness's compute axis)
        self.rows = float(sum(b.numel() and t["x_rows"].numel() for b, t in zip(batches, tables)))
        self.extra_per_row = int(self.loss_cfg.kl_coef > 0 and update.reference is not None) + \
            int(update.optim_cfg.recompute_old_log_prob)
        if update.optim_cfg.recompute_old_log_prob:
            self.recompute_old_log_probs(update, graph, embeddings, edges, tables, batches)
        return batches, tables, windows

    def micro_batch_forward(self, update: PolicyUpdate, graph: RolloutGraph, embeddings: dict,
                            mb: dict) -> sde.StepResult:
        """The micro-batch's edges re-scored under the current policy (inside `update.reference()`: the
        reference's) - one forward per distinct parent; the rollout's own step function given the stored sample
        instead of noise (one code path). Returns the StepResult: log-prob [E], mean, std [E]."""
        x = graph.latents[mb["x_rows"]]
        v = update.velocity(embeddings, x, mb["sigma_from"], mb["prompt"])
        row = mb["row"]
        return sde.sde_step(x[row], v[row], mb["sigma_from"][row], mb["sigma_to"], update.kernel,
                            sample=graph.latents[mb["sample_rows"]], std_scale=mb["std_scale"])

    def recompute_old_log_probs(self, update: PolicyUpdate, graph, embeddings, edges: Edges, tables: list[dict],
                                batches: list[torch.Tensor]) -> None:
        """Score the behaviour log-probs with the training forward itself (--recompute_old_log_prob): its layout,
        train mode and autograd on - compiled blocks have separate inference and training graphs, which round
        differently in bf16 - but no backward (each forward's graph is dropped) and no gradient all-reduce."""
        with torch.enable_grad(), gradient_sync(update.model, enabled=False):
            for mb, idx in zip(tables, batches):
                if idx.numel():
                    old = self.micro_batch_forward(update, graph, embeddings, mb)
                    mb["old"] = old.log_prob.detach().float()
                    if self.loss_cfg.ratio_norm:  # RatioNorm's behaviour means, from the same forward
                        mb["old_mean"] = old.mean.detach()
        live = [(idx, mb["old"]) for mb, idx in zip(tables, batches) if idx.numel()]
        if live:  # the host copy, in one read
            edges.old_log_prob[torch.cat([i for i, _ in live])] = torch.cat([o for _, o in live]).cpu()

    def loss(self, update: PolicyUpdate, graph, embeddings, mb: dict, normaliser: float):
        if "old" not in mb:  # padding: a zero-weight forward keeps the collectives of every rank in step
            v = update.velocity(embeddings, graph.latents[mb["x_rows"]], torch.ones(1, device=update.device),
                                torch.zeros(1, dtype=torch.long, device=update.device))
            return 0.0 * v.sum(), None
        step = self.micro_batch_forward(update, graph, embeddings, mb)
        old, adv, weight = mb["old"], mb["advantage"], mb["weight"]
        log_prob, ok = guard_non_finite(step.log_prob, old)
        if self.loss_cfg.ratio_norm:
            log_prob, old = self._normalized_log_ratio(graph, mb, step), torch.zeros_like(old)
            ok = ok & torch.isfinite(log_prob)
        loss_e, ratio = clipped_surrogate(log_prob, old, adv, self.loss_cfg.clip_range)
        if self.loss_cfg.ratio_norm:  # GRPO-Guard's reweighting across steps: the policy loss over sigma - sigma_next
            loss_e = loss_e / mb["dt"]
        out = {}
        if self.loss_cfg.kl_coef > 0 and update.reference is not None:
            with torch.no_grad(), update.reference():
                reference = self.micro_batch_forward(update, graph, embeddings, mb)
            kl = kl_penalty(step.mean, reference.mean, step.std)
            loss_e = loss_e + self.loss_cfg.kl_coef * kl
            out["kl_sum"] = (kl.detach() * weight).sum().double()
        finite = ok & torch.isfinite(loss_e)
        live = finite & (weight > 0)
        loss = torch.where(live, loss_e * weight, torch.zeros_like(loss_e)).sum() / normaliser
        out["stats"] = policy_stats(ratio.detach(), log_prob.detach(), old, self.loss_cfg.clip_range, live)
        out["nonfinite"] = (~finite & (weight > 0)).sum().double()
        return loss, out

    def _normalized_log_ratio(self, graph: RolloutGraph, mb: dict, step: sde.StepResult) -> torch.Tensor:
        """--ratio_norm: GRPO-Guard's log-ratio of the micro-batch's edges (losses.normalized_log_ratio), against
        the behaviour means the rollout kept (or --recompute_old_log_prob re-scored)."""
        if "old_mean" in mb:
            old_mean = mb["old_mean"]
        else:
            assert graph.means is not None, "--ratio_norm: the rollout kept no means (RolloutSetup keep_means)"
            old_mean = graph.means[mb["sample_rows"]]
        step_std = step_mean_std(step.std, mb["step"], graph.sigmas.numel())
        return normalized_log_ratio(step.mean, old_mean, graph.latents[mb["sample_rows"]], step.std, step_std)

    def accumulate(self, acc: dict, out: dict) -> dict:
        """Sums and extremes so far; the first micro-batch's ratio extremes kept apart (`RatioDrift`)."""
        stats = merge_stats({k: acc[k] for k in _EDGE_STATS} if acc else {}, out.pop("stats"))
        sums = {k: acc.get(k, 0.0) + t for k, t in out.items()}
        first = {"first_ratio_min": acc["first_ratio_min"], "first_ratio_max": acc["first_ratio_max"]} if acc else \
            {"first_ratio_min": stats["ratio_min"], "first_ratio_max": stats["ratio_max"]}
        return {**stats, **sums, **first}

    def figures(self, read: dict) -> dict:
        n = max(read.get("num_edges", 0.0), 1.0)
        return {
            "nonfinite_edges": read.get("nonfinite", 0.0),
            "clip_fraction": read.get("clipped", 0.0) / n,
            "approx_kl": read.get("approx_kl_sum", 0.0) / n,
            "kl": read.get("kl_sum", 0.0) / n,
            "ratio_min": read.get("ratio_min", 1.0),
            "ratio_max": read.get("ratio_max", 1.0),
            "first_ratio_min": read.get("first_ratio_min", 1.0),
            "first_ratio_max": read.get("first_ratio_max", 1.0),
            "train_forward_rows": self.rows,
            "extra_forward_rows": self.rows * self.extra_per_row,
        }


_EDGE_STATS = ("num_edges", "clipped", "approx_kl_sum", "ratio_min", "ratio_max")


def ratio_deviation(ratio_min: float, ratio_max: float) -> float:
    """max |ratio - 1| over ratios in [ratio_min, ratio_max]."""
    return max(abs(ratio_min - 1), abs(ratio_max - 1))


class RatioDrift:
    """The first micro-batch of an iteration trains the weights that rolled out, so its ratio exp(log pi - log
    pi_old) is 1 up to rounding. Rounding of a tenth of --clip_range or more (kernels that differ between the batched
    rollout and the training forward: bf16 on GPUs, --compile's inference and training graphs in bf16) makes the
    clip act on rounding instead of policy change: warned once per run, with the figures and the remedy."""

    FRACTION = 0.1

    def __init__(self, clip_range: float, recompute: bool, enabled: bool = True):
        self.clip_range, self.recompute, self.warned = clip_range, recompute, not enabled  # rank 0 alone warns

    def observe(self, iteration: int, first_ratio_min: float | None, first_ratio_max: float | None) -> None:
        if self.warned or first_ratio_min is None or first_ratio_max is None:
            return
        deviation = ratio_deviation(first_ratio_min, first_ratio_max)
        if not deviation >= self.FRACTION * self.clip_range:  # NaN included (non-finite edges are counted apart)
            return
        self.warned = True
        remedy = ("even with --recompute_old_log_prob: the training forward does not repeat its own results"
                  if self.recompute else "--recompute_old_log_prob re-scores pi_old with the training forward (one "
                  "more forward per micro-batch, no backward), which makes it 1")
        log.warning("iteration %d: the first micro-batch's ratio at theta_old is off 1 by %.3g, %.0f%% of "
                    "--clip_range %g (rollout and training forwards round differently); %s", iteration, deviation,
                    100 * deviation / self.clip_range, self.clip_range, remedy)


def optimizer_steps_per_iteration(num_micro: int, accumulation: int) -> int:
    return math.ceil(num_micro / (accumulation or num_micro)) if num_micro else 0

"""The policy update of one iteration: the clipped GRPO surrogate (paper Eq. 5) over the selected edges.

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

from branchgrpo.core import distributed, sde
from branchgrpo.core.graph import RolloutGraph
from branchgrpo.core.losses import (
    clipped_surrogate,
    guard_non_finite,
    kl_penalty,
    merge_stats,
    policy_stats,
    read_stats,
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
    """The update of one iteration. Takes the optimisation and loss sections of the config (`optim_cfg`:
    micro-batching, accumulation, gradient clipping, --recompute_old_log_prob; `loss_cfg`: clip range, KL)."""

    def __init__(self, adapter: FlowAdapter, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, optim_cfg, loss_cfg, seed: int, kernel: sde.Kernel, device: torch.device,
                 autocast: Callable, reference: Callable | None, rank: int, preemption=None):
        self.adapter, self.model, self.optimizer, self.scheduler = adapter, model, optimizer, scheduler
        self.optim_cfg, self.loss_cfg, self.seed = optim_cfg, loss_cfg, seed
        self.kernel, self.device, self.autocast = kernel, device, autocast
        self.reference = reference  # context manager factory: inside it adapter.velocity is the reference policy
        self.rank = rank
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.preemption = preemption  # branchgrpo.runtime.preemption.Preemption, or None

    def layout(self, graph: RolloutGraph, edges: Edges, batches: list[torch.Tensor]) -> list[dict]:
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
        rows = [t[k] for t in tables for k in ("x_rows", "sample_rows") if k in t]
        assert not rows or bool((torch.cat(rows) >= 0).all()), "latent of a node that was not kept"
        to_device_once(tables, self.device)
        return tables

    def _plan(self, graph: RolloutGraph, edges: Edges, iteration: int):
        """Host-side, before the loop: the micro-batches (edge indices, padded to the same count on every rank),
        their device tables, and the optimizer steps' windows of micro-batches with their edge counts."""
        cfg = self.optim_cfg
        key = mix_key(self.seed, iteration, "mb", self.rank)
        batches = plan_micro_batches(edges.parent, cfg.train_micro_batch_size, key)
        num_micro = int(distributed.all_reduce_max(torch.tensor(len(batches))).item())
        batches += [torch.zeros(0, dtype=torch.long)] * (num_micro - len(batches))  # zero-weight padding
        accum = cfg.gradient_accumulation_steps or max(num_micro, 1)  # no edge at all: no optimizer step
        windows = [range(start, min(start + accum, num_micro)) for start in range(0, num_micro, accum)]
        edge_counts = [float(sum(edges.weight[batches[i]].sum() for i in w)) for w in windows]
        return batches, self.layout(graph, edges, batches), list(zip(windows, edge_counts))

    def micro_batch_forward(self, graph: RolloutGraph, embeddings: dict, mb: dict) -> sde.StepResult:
        """The micro-batch's edges re-scored under the current policy (inside `self.reference()`: the reference's)
        - one forward per distinct parent; the rollout's own step function given the stored sample instead of
        noise (one code path). Returns the StepResult: log-prob [E], mean, std [E]."""
        x = graph.latents[mb["x_rows"]]
        cond = gather_cond(embeddings, mb["prompt"])
        with self.autocast():
            v = self.adapter.velocity(x, mb["sigma_from"], cond)
        row = mb["row"]
        return sde.sde_step(x[row], v.float()[row], mb["sigma_from"][row], mb["sigma_to"], self.kernel,
                            sample=graph.latents[mb["sample_rows"]], std_scale=mb["std_scale"])

    def recompute_old_log_probs(self, graph, embeddings, edges: Edges, tables: list[dict],
                                batches: list[torch.Tensor]) -> None:
        """Score the behaviour log-probs with the training forward itself (--recompute_old_log_prob): its layout,
        train mode and autograd on - compiled blocks have separate inference and training graphs, which round
        differently in bf16 - but no backward (each forward's graph is dropped) and no gradient all-reduce."""
        with torch.enable_grad(), gradient_sync(self.model, enabled=False):
            for mb, idx in zip(tables, batches):
                if idx.numel():
                    mb["old"] = self.micro_batch_forward(graph, embeddings, mb).log_prob.detach().float()
        live = [(idx, mb["old"]) for mb, idx in zip(tables, batches) if idx.numel()]
        if live:  # the host copy, in one read
            edges.old_log_prob[torch.cat([i for i, _ in live])] = torch.cat([o for _, o in live]).cpu()

    def run(self, graph: RolloutGraph, embeddings: dict, edges: Edges, iteration: int) -> dict:
        """Host syncs: none per micro-batch (a preemption check across ranks aside), one per optimizer step (the
        gradient norm decides whether the step is applied), one at the end for the statistics."""
        cfg = self.optim_cfg
        batches, tables, windows = self._plan(graph, edges, iteration)
        num_micro = len(batches)
        self.model.train()
        if cfg.recompute_old_log_prob:
            self.recompute_old_log_probs(graph, embeddings, edges, tables, batches)
        stats, sums, losses, norms, first_ratio, applied = {}, {}, [], [], None, []
        if self.preemption is not None and len(windows) > 1:
            self.preemption.keep_weights(self.params, self.optimizer)
        for window, num_edges in windows:
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for i in window:
                if self.preemption is not None:
                    self.preemption.cut_point()
                with gradient_sync(self.model, enabled=i == window[-1]):
                    loss, mb = self._micro_batch_loss(graph, embeddings, tables[i], max(num_edges, 1.0))
                    if loss.requires_grad:  # not when its edges belong to a frozen part only (a Wan2.2 expert
                        loss.backward()  # left out of training); the same on every rank: they run the same parts
                step_loss = step_loss + loss.detach().double()
                if mb:
                    stats = merge_stats(stats, mb.pop("stats"))
                    sums = {k: sums.get(k, 0.0) + t for k, t in mb.items()}
                    if first_ratio is None:
                        first_ratio = {"first_ratio_min": stats["ratio_min"], "first_ratio_max": stats["ratio_max"]}
            norm = clip_grad_norm(self.params, cfg.max_grad_norm)
            applied.append(bool(torch.isfinite(norm)))
            if applied[-1]:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            norms.append(norm)
        self.model.eval()
        read = read_stats({**stats, **sums, **(first_ratio or {}), **{f"loss{i}": t for i, t in enumerate(losses)}})
        norms = torch.stack(norms).tolist() if norms else []  # host tensors (clip_grad_norm read them back)
        n = max(read.get("num_edges", 0.0), 1.0)
        return {
            "loss": sum(read[f"loss{i}"] for i in range(len(losses))) / max(len(losses), 1),
            "grad_norm": sum(norms) / max(len(norms), 1),
            "optimizer_steps": len(applied),
            "skipped_steps": applied.count(False),
            "applied_steps": applied,  # in order, for the divergence guard
            "micro_batches": num_micro,
            "nonfinite_edges": read.get("nonfinite", 0.0),
            "clip_fraction": read.get("clipped", 0.0) / n,
            "approx_kl": read.get("approx_kl_sum", 0.0) / n,
            "kl": read.get("kl_sum", 0.0) / n,
            "ratio_min": read.get("ratio_min", 1.0),
            "ratio_max": read.get("ratio_max", 1.0),
            "first_ratio_min": read.get("first_ratio_min", 1.0),
            "first_ratio_max": read.get("first_ratio_max", 1.0),
        }

    def _micro_batch_loss(self, graph, embeddings, mb: dict, normaliser: float):
        if "old" not in mb:  # padding: a zero-weight forward keeps the collectives of every rank in step
            cond = gather_cond(embeddings, torch.zeros(1, dtype=torch.long, device=self.device))
            with self.autocast():
                v = self.adapter.velocity(graph.latents[mb["x_rows"]], torch.ones(1, device=self.device), cond)
            return 0.0 * v.float().sum(), None
        step = self.micro_batch_forward(graph, embeddings, mb)
        old, adv, weight = mb["old"], mb["advantage"], mb["weight"]
        log_prob, ok = guard_non_finite(step.log_prob, old)
        loss_e, ratio = clipped_surrogate(log_prob, old, adv, self.loss_cfg.clip_range)
        out = {}
        if self.loss_cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad(), self.reference():
                reference = self.micro_batch_forward(graph, embeddings, mb)
            kl = kl_penalty(step.mean, reference.mean, step.std)
            loss_e = loss_e + self.loss_cfg.kl_coef * kl
            out["kl_sum"] = (kl.detach() * weight).sum().double()
        finite = ok & torch.isfinite(loss_e)
        live = finite & (weight > 0)
        loss = torch.where(live, loss_e * weight, torch.zeros_like(loss_e)).sum() / normaliser
        out["stats"] = policy_stats(ratio.detach(), log_prob.detach(), old, self.loss_cfg.clip_range, live)
        out["nonfinite"] = (~finite & (weight > 0)).sum().double()
        return loss, out


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

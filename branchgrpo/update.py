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
- A diverged run does not carry on: `SkippedSteps` counts skipped optimizer steps in a row (across iterations), and at
  `--max_skipped_steps` the trainer stops with a checkpoint and `DivergedError` (exit 2).
- Preemption (branchgrpo.preemption): a cut point before every micro-batch; an iteration with several optimizer steps
  first copies the trainable state to host memory, so that a cut after a step can still save the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from branchgrpo import distributed, sde
from branchgrpo.graph import RolloutGraph
from branchgrpo.losses import clipped_surrogate, guard_non_finite, kl_penalty, merge_stats, policy_stats
from branchgrpo.models.base import FlowAdapter, gather_cond
from branchgrpo.parallel import clip_grad_norm, gradient_sync
from branchgrpo.seeding import keyed_permutation, mix_key


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
        self.preemption = preemption  # branchgrpo.preemption.Preemption, or None
        self.skipped = SkippedSteps(optim_cfg.max_skipped_steps)

    def _rescore(self, x, v, sigma_from, sigma_to, row, graph: RolloutGraph, children) -> sde.StepResult:
        """The stored transitions into `children` re-scored under velocity `v` of their parents (rows `row` of
        x / v): the rollout's own step function, given the sample instead of noise (one code path)."""
        return sde.sde_step(x[row], v.float()[row], sigma_from[row], sigma_to, self.kernel,
                            sample=graph.node_latents(children).to(self.device),
                            std_scale=graph.std_scale[children].to(self.device))

    def micro_batch_forward(self, graph: RolloutGraph, embeddings: dict, edges: Edges, idx: torch.Tensor):
        """The edges `idx` re-scored under the current policy (StepResult: log-prob [E], mean, std [E]), one forward
        per distinct parent, and what the KL term needs to score the reference the same way."""
        parents, row = torch.unique(edges.parent[idx], return_inverse=True)
        x = graph.node_latents(parents).to(self.device)
        sigma_from = graph.sigmas.float()[graph.step[parents]].to(self.device)
        cond = gather_cond(embeddings, graph.prompt[parents].to(self.device))
        with self.autocast():
            v = self.adapter.velocity(x, sigma_from, cond)
        children = edges.child[idx]
        row = row.to(self.device)
        sigma_to = graph.sigmas.float()[graph.step[children]].to(self.device)
        return self._rescore(x, v, sigma_from, sigma_to, row, graph, children), (x, sigma_from, cond, row, sigma_to)

    @torch.no_grad()
    def recompute_old_log_probs(self, graph, embeddings, edges: Edges, batches: list[torch.Tensor]) -> None:
        """Score the behaviour log-probs with the training forward's layout (--recompute_old_log_prob)."""
        for idx in batches:
            step, _ = self.micro_batch_forward(graph, embeddings, edges, idx)
            edges.old_log_prob[idx] = step.log_prob.float().cpu()

    def run(self, graph: RolloutGraph, embeddings: dict, edges: Edges, iteration: int) -> dict:
        cfg = self.optim_cfg
        key = mix_key(self.seed, iteration, "mb", self.rank)
        batches = plan_micro_batches(edges.parent, cfg.train_micro_batch_size, key)
        num_micro = int(distributed.all_reduce_max(torch.tensor(len(batches))).item())
        batches += [torch.zeros(0, dtype=torch.long)] * (num_micro - len(batches))  # zero-weight padding
        if cfg.recompute_old_log_prob:
            self.recompute_old_log_probs(graph, embeddings, edges, [b for b in batches if b.numel()])
        accum = cfg.gradient_accumulation_steps or max(num_micro, 1)  # no edge at all: no optimizer step
        stats, losses, norms, first_ratio = {}, [], [], None
        skipped = nonfinite = steps = kl_sum = 0.0
        if self.preemption is not None and optimizer_steps_per_iteration(num_micro, accum) > 1:
            self.preemption.keep_weights(self.params, self.optimizer)
        self.model.train()
        for start in range(0, num_micro, accum):
            window = batches[start : start + accum]
            num_edges = float(sum(edges.weight[b].sum() for b in window))
            step_loss = 0.0
            for j, idx in enumerate(window):
                if self.preemption is not None:
                    self.preemption.cut_point()
                with gradient_sync(self.model, enabled=j == len(window) - 1):
                    loss, mb = self._micro_batch_loss(graph, embeddings, edges, idx, max(num_edges, 1.0))
                    loss.backward()
                step_loss += float(loss.detach())
                if mb:
                    stats = merge_stats(stats, mb["stats"])
                    nonfinite += mb["nonfinite"]
                    kl_sum += mb["kl_sum"]
                    if first_ratio is None:
                        first_ratio = (mb["stats"]["ratio_min"], mb["stats"]["ratio_max"])
            norm = clip_grad_norm(self.params, cfg.max_grad_norm)
            finite = bool(torch.isfinite(norm))
            if finite:
                self.optimizer.step()
            else:
                skipped += 1
            self.skipped.observe(iteration, finite)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            norms.append(float(norm))
            steps += 1
        self.model.eval()
        n = max(stats.get("num_edges", 0.0), 1.0)
        first_ratio = first_ratio or (1.0, 1.0)
        return {
            "loss": sum(losses) / max(len(losses), 1),
            "grad_norm": sum(norms) / max(len(norms), 1),
            "optimizer_steps": steps,
            "skipped_steps": skipped,
            "micro_batches": num_micro,
            "nonfinite_edges": nonfinite,
            "clip_fraction": stats.get("clipped", 0.0) / n,
            "approx_kl": stats.get("approx_kl_sum", 0.0) / n,
            "kl": kl_sum / n,
            "ratio_min": stats.get("ratio_min", 1.0),
            "ratio_max": stats.get("ratio_max", 1.0),
            "first_ratio_min": first_ratio[0],
            "first_ratio_max": first_ratio[1],
        }

    def _micro_batch_loss(self, graph, embeddings, edges: Edges, idx: torch.Tensor, normaliser: float):
        if idx.numel() == 0:  # padding: a zero-weight forward keeps the collectives of every rank in step
            dummy = graph.node_latents(edges.parent[:1] if edges.parent.numel() else graph.leaves[:1]).to(self.device)
            cond = gather_cond(embeddings, torch.zeros(1, dtype=torch.long, device=self.device))
            with self.autocast():
                v = self.adapter.velocity(dummy, torch.ones(1, device=self.device), cond)
            return 0.0 * v.float().sum(), None
        step, (x, sigma_from, cond, row, sigma_to) = self.micro_batch_forward(graph, embeddings, edges, idx)
        old = edges.old_log_prob[idx].to(self.device)
        adv = edges.advantage[idx].to(self.device)
        weight = edges.weight[idx].to(self.device)
        log_prob, ok = guard_non_finite(step.log_prob, old)
        loss_e, ratio = clipped_surrogate(log_prob, old, adv, self.loss_cfg.clip_range)
        kl_sum = 0.0
        if self.loss_cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad(), self.reference(), self.autocast():
                v_ref = self.adapter.velocity(x, sigma_from, cond)
            reference = self._rescore(x, v_ref, sigma_from, sigma_to, row, graph, edges.child[idx])
            kl = kl_penalty(step.mean, reference.mean, step.std)
            loss_e = loss_e + self.loss_cfg.kl_coef * kl
            kl_sum = float((kl.detach() * weight).sum())
        finite = ok & torch.isfinite(loss_e)
        live = finite & (weight > 0)
        loss = torch.where(live, loss_e * weight, torch.zeros_like(loss_e)).sum() / normaliser
        stats = policy_stats(ratio[live].detach(), log_prob[live].detach(), old[live], self.loss_cfg.clip_range)
        return loss, {"stats": stats, "nonfinite": float((~finite & (weight > 0)).sum()), "kl_sum": kl_sum}


class DivergedError(ValueError):
    """The run stopped because its optimizer steps kept being skipped (a checkpoint was written first)."""


class SkippedSteps:
    """Optimizer steps skipped in a row for a non-finite gradient norm (the same count on every rank: the norm is
    all-reduced). `limit` 0: never trips. Checkpointed, so a resumed run continues the count."""

    STATE_OPTIONAL = True  # checkpoints written before it existed resume with no streak

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.first: int | None = None  # the iteration of the streak's first skipped step
        self.last_applied: int | None = None  # the iteration of the last step that was applied
        self.last: int | None = None  # the iteration of the last step, applied or not

    def observe(self, iteration: int, applied: bool) -> None:
        self.last = iteration
        if applied:
            self.count, self.first, self.last_applied = 0, None, iteration
        else:
            self.count += 1
            self.first = iteration if self.first is None else self.first

    @property
    def tripped(self) -> bool:
        return self.limit > 0 and self.count >= self.limit

    def error(self, checkpoint) -> DivergedError:
        """Why the run stops, once `tripped` (after writing `checkpoint`)."""
        return DivergedError(self.message(checkpoint))

    def message(self, checkpoint) -> str:
        applied = ("before this run's first step" if self.last_applied is None else
                   f"of the last applied step (iteration {self.last_applied})")
        return (f"diverged: {self.count} optimizer steps in a row had a non-finite gradient norm and were skipped "
                f"(iterations {self.first}-{self.last}; --max_skipped_steps {self.limit}); stopped after writing "
                f"{checkpoint}, whose weights are those {applied} - skipped steps change nothing but the LR schedule; "
                "older checkpoints were kept. Start again with a lower --learning_rate or --max_grad_norm, or raise "
                "--max_skipped_steps if such steps are expected")

    def state_dict(self) -> dict:
        return {"count": self.count, "first": self.first, "last_applied": self.last_applied}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.first, self.last_applied = int(state["count"]), state["first"], state["last_applied"]


def optimizer_steps_per_iteration(num_micro: int, accumulation: int) -> int:
    return math.ceil(num_micro / (accumulation or num_micro)) if num_micro else 0

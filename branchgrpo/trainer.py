"""The training loop shared by every algorithm and backbone:

    prompts -> rollout graph (depth-batched) -> leaf rewards -> advantages -> edge selection -> clipped update
            -> EMA -> log / evaluate / checkpoint

The algorithm (algorithms.py) supplies the graph's plan, the advantage estimator and the edge selector; the
backbone (models/) supplies velocity and decode; nothing here knows which of them it drives.
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from branchgrpo import distributed, sde
from branchgrpo.algorithms import Algorithm
from branchgrpo.build import build_lr_scheduler, build_optimizer, prepare_model, using_module
from branchgrpo.checkpoint import CheckpointManager, rng_state, set_rng_state
from branchgrpo.data.embeddings import EmbeddingStore
from branchgrpo.data.prompts import PromptSampler
from branchgrpo.ema import EMA
from branchgrpo.evaluation import Evaluator, decode_in_chunks
from branchgrpo.graph import RolloutGraph, plan_counts, skeleton_graph
from branchgrpo.models.base import check_embedding_keys, gather_cond
from branchgrpo.models.lora import adapter_weights
from branchgrpo.models.registry import load_adapter, schedule_mu
from branchgrpo.outputs import MetricsLog, plot_rewards, save_grid, save_videos
from branchgrpo.parallel import full_state_dict
from branchgrpo.rewards.base import build_reward_set, parse_reward_options
from branchgrpo.rollout import NoiseKeys, run_rollout
from branchgrpo.train_config import TrainConfig
from branchgrpo.update import PolicyUpdate, optimizer_steps_per_iteration, select_edges

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = distributed.init_distributed(cfg.device)
        self.device = self.info.device
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic == "on" or (cfg.deterministic == "auto" and self.device.type == "cpu"):
            # e.g. the backward of an index gather accumulates in thread order on CPU unless asked not to
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        self.output_dir = Path(cfg.output_dir)
        self.algo = Algorithm(cfg, seed=cfg.seed)
        self.store = EmbeddingStore(cfg.data_json_path)
        if self.store.model != cfg.model:
            raise ValueError(f"--data_json_path: {cfg.data_json_path} holds {self.store.model} embeddings, "
                             f"but --model is {cfg.model}")
        eval_store = EmbeddingStore(cfg.eval_data_json_path) if cfg.eval_data_json_path else self.store
        # reward models first: a missing checkpoint must fail before the backbone is loaded
        options = parse_reward_options(cfg.reward_options)
        self.rewards = build_reward_set(cfg.reward, cfg.reward_combine, self.device,
                                        _reward_options(cfg.reward, options, cfg.reward_model_dir))
        self.adapter = load_adapter(cfg, self.device)
        check_embedding_keys(self.adapter, list(self.store.keys) + list(self.store.extras), cfg.data_json_path)
        native = self.adapter.native_shift
        if native is not None and cfg.time_shift == "static" and abs(native - cfg.shift) > 1e-6 and self.info.is_main:
            log.warning("--shift %g differs from the static shift %g of the checkpoint's scheduler; sampling uses "
                        "--shift", cfg.shift, native)
        self.sigmas = sde.make_sigmas(cfg.sampling_steps, cfg.shift, schedule_mu(cfg, self.adapter))
        self.kernel = self.algo.kernel
        self.prepared = prepare_model(self.adapter, cfg, self.info)
        self.optimizer = build_optimizer(self.prepared.model, cfg)
        self.sizes = self._derived_sizes()
        self.scheduler = build_lr_scheduler(self.optimizer, cfg, cfg.max_train_steps * self.sizes["optimizer_steps"])
        self.ema = EMA(self.prepared.model, cfg.ema_decay) if cfg.use_ema else None
        self.sampler = PromptSampler(self.store, cfg.train_batch_size, self.info.rank, self.info.world_size,
                                     cfg.seed_for_data)
        self.evaluator = Evaluator(eval_store, cfg, self.info.rank, self.info.world_size)
        self.updater = PolicyUpdate(self.adapter, self.prepared.model, self.optimizer, self.scheduler, cfg,
                                    self.kernel, self.device, self.prepared.autocast, self.prepared.reference,
                                    self.info.rank)
        self.checkpoints = CheckpointManager(self.output_dir, self.info.rank, self.info.world_size,
                                             cfg.checkpoints_total_limit, trainable_only=cfg.use_lora)
        self.step, self.evals, self.wall_before = 0, [], 0.0
        if cfg.resume_from_checkpoint:
            self._resume(self.checkpoints.resolve(cfg.resume_from_checkpoint))
        self.metrics = None
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(vars(cfg), indent=1))
            self.metrics = MetricsLog(self.output_dir, cfg.report_to, cfg.run_name or self.output_dir.name, vars(cfg),
                                      cfg.wandb_project, resume_step=self.step if cfg.resume_from_checkpoint else None)
            if cfg.resume_from_checkpoint:  # evaluations after the checkpoint belong to the lost attempt
                (self.output_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.evals))
            self._log_sizes()
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # ---------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        start = time.time() - self.wall_before
        if self.step == 0:
            self._evaluate(0)
        bar = tqdm(range(self.step, cfg.max_train_steps), initial=self.step, total=cfg.max_train_steps,
                   disable=not self.info.is_main, desc=f"{cfg.algo}", dynamic_ncols=True)
        for it in bar:
            entry = self.iteration(it)
            self.step = it + 1
            if self.metrics:
                self.metrics.log(entry)
                bar.set_postfix(reward=f"{entry['reward_mean']:.4f}", loss=f"{entry['loss']:.3g}")
            # the final evaluation too runs here, before the checkpoint of the last step, so that it is part of it
            if (cfg.validation_steps and self.step % cfg.validation_steps == 0) or self.step == cfg.max_train_steps:
                self._evaluate(self.step)
            stop = bool(distributed.all_reduce_max(torch.tensor(int(self._stop))).item())
            if stop or (cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0):
                self.save(time.time() - start)
            if stop:
                log.warning("SIGTERM: checkpoint written at step %d; exiting", self.step)
                return {"stopped_at": self.step}
        if not self.evals or self.evals[-1]["step"] != self.step:
            self._evaluate(self.step)
        wall = time.time() - start
        if cfg.checkpointing_steps == 0 or self.step % cfg.checkpointing_steps:
            self.save(wall)
        return self._finish(wall)

    def iteration(self, it: int) -> dict:
        """One round of the paper's Algorithm: rollout, rewards, advantages, selection, update."""
        t0 = time.time()
        batch = self.sampler.next_batch()
        embeddings = self._embeddings(batch.embeddings)
        graph = self.rollout(embeddings, batch.keys, it)
        t1 = time.time()
        scores = self.score(graph, batch.texts)
        t2 = time.time()
        advantages = self.algo.advantages(graph, scores, self.rewards.weights, self.rewards.mode)
        trained = self.algo.select(graph, advantages, it, batch.keys)
        edges = select_edges(graph, trained, advantages)
        update = self.updater.run(graph, embeddings, edges, it)
        if self.ema is not None and (it + 1) % self.cfg.ema_update_interval == 0:
            self.ema.update(self.prepared.model)
        t3 = time.time()
        self._maybe_save_rollout(graph, it)
        return self._entry(it, graph, scores, trained, update, (t0, t1, t2, t3))

    def rollout(self, embeddings: dict, prompt_keys: tuple[int, ...], it: int) -> RolloutGraph:
        cfg = self.cfg
        shared = self.info.rank if cfg.init_same_noise else None
        noise = NoiseKeys(cfg.seed, it, prompt_keys, shared_root_key=shared)
        with using_module(self.adapter, self.prepared.bare):
            return run_rollout(self.algo.plan(it), self._velocity(embeddings), self.sigmas, self.kernel, noise,
                               self.adapter.latent_shape, self.device, cfg.rollout_batch_size, cfg.branch_innovation)

    @torch.no_grad()
    def score(self, graph: RolloutGraph, texts: list[str]) -> dict[str, torch.Tensor]:
        leaves = graph.leaves
        media = decode_in_chunks(self.adapter, graph.node_latents(leaves), self.cfg.reward_batch_size)
        prompts = [texts[int(p)] for p in graph.prompt[leaves]]
        out: dict[str, list] = {}
        for start in range(0, media.shape[0], self.cfg.reward_batch_size):
            part = self.rewards.score(media[start : start + self.cfg.reward_batch_size],
                                      prompts[start : start + self.cfg.reward_batch_size])
            for name, value in part.items():
                out.setdefault(name, []).append(value)
        self._last_media = media
        return {name: torch.cat(parts) for name, parts in out.items()}

    # ---------------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------------
    def _velocity(self, embeddings: dict):
        autocast = self.prepared.autocast

        def velocity(x, sigma, prompt):
            with autocast():
                return self.adapter.velocity(x, sigma, gather_cond(embeddings, prompt)).float()

        return velocity

    def _embeddings(self, per_prompt: dict) -> dict:
        n = next(iter(per_prompt.values())).shape[0]
        out = {k: v.to(self.device) for k, v in per_prompt.items()}
        out.update({k: v.to(self.device).unsqueeze(0).expand(n, *v.shape) for k, v in self.store.extras.items()})
        return out

    def _derived_sizes(self) -> dict:
        cfg = self.cfg
        plan = self.algo.plan(0)
        graph = skeleton_graph(plan)
        trained = self.algo.select(graph, torch.arange(graph.num_nodes, dtype=torch.float64), 0)
        counts = plan_counts(plan, trained)
        parents_per_rank = counts["train_forward_passes"] * cfg.train_batch_size
        micro = -(-parents_per_rank // cfg.train_micro_batch_size)
        return dict(counts, prompts_per_rank=cfg.train_batch_size, world_size=self.info.world_size,
                    micro_batches=micro, optimizer_steps=optimizer_steps_per_iteration(micro,
                                                                                       cfg.gradient_accumulation_steps))

    def _log_sizes(self) -> None:
        s, cfg = self.sizes, self.cfg
        B = cfg.train_batch_size
        log.info(
            "%s on %s, %d process(es), parallel=%s | per prompt: %d leaves, %d rollout forwards (%.4g per leaf), "
            "%d trainable edges, %d trained at iteration 0 (%.4g per leaf) | per rank and iteration: %d prompts, "
            "%d leaves, %d rollout forwards, %d trained edges from %d training forwards in %d micro-batches of <= %d, "
            "%d optimizer step(s) (gradient_accumulation_steps=%d) | total optimizer steps: %d",
            cfg.algo, cfg.model, s["world_size"], self.prepared.mode, s["leaves"], s["forward_passes"],
            s["forward_passes_per_leaf"], s["trainable_edges"], s["trained_edges"], s["trained_edges_per_leaf"], B,
            B * s["leaves"], B * s["forward_passes"], B * s["trained_edges"], B * s["train_forward_passes"],
            s["micro_batches"], cfg.train_micro_batch_size, s["optimizer_steps"], cfg.gradient_accumulation_steps,
            cfg.max_train_steps * s["optimizer_steps"],
        )
        (self.output_dir / "sizes.json").write_text(json.dumps(s, indent=1))

    def _entry(self, it, graph, scores, trained, update, times) -> dict:
        t0, t1, t2, t3 = times
        leaves = graph.leaves
        scored = graph.group[leaves] >= 0
        total = self.rewards.weighted_sum(scores)
        finite = torch.isfinite(total) & scored
        gathered = distributed.all_gather_cat(torch.where(finite, total, torch.zeros_like(total)).double())
        mask = distributed.all_gather_cat(finite.double())
        n = mask.sum().clamp(min=1)
        mean = float((gathered * mask).sum() / n)
        std = float((((gathered - mean) * mask) ** 2).sum().div((n - 1).clamp(min=1)).sqrt())
        num_leaves = int(scored.sum())
        entry = {
            "step": it,
            "reward_mean": mean,
            "reward_std": std,
            "loss": update["loss"],
            "rollout_nfe": graph.num_forward_passes / leaves.numel(),
            "train_nfe": int(trained.sum()) / leaves.numel(),
            "iter_time_s": t3 - t0,
            "rollout_time_s": t1 - t0,
            "reward_time_s": t2 - t1,
            "train_time_s": t3 - t2,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": update["grad_norm"],
        }
        entry.update({k: v for k, v in update.items() if k not in ("loss", "grad_norm")})
        entry.update(self._over_ranks(update, int((~torch.isfinite(total) & scored).sum())))
        entry.update({f"reward_{name}": float(v[scored].nanmean()) for name, v in scores.items() if len(scores) > 1})
        entry["trained_edges"] = int(trained.sum())
        entry["leaves"] = num_leaves
        entry["peak_memory_mb"] = _peak_memory_mb(self.device)
        return entry

    def _over_ranks(self, update: dict, nonfinite_rewards: int) -> dict:
        """The update's rank-local figures as whole-iteration ones (identical on every rank): means over ranks of
        the loss, clip fraction and KL estimates, sums of the non-finite counts, extremes of the ratios. The
        gradient norm needs nothing: it is computed from the all-reduced gradients."""
        means, sums = ("loss", "clip_fraction", "approx_kl", "kl"), ("nonfinite_edges",)
        values = torch.tensor([update[k] for k in means + sums] + [nonfinite_rewards], dtype=torch.float64)
        values = distributed.all_reduce_sum(values).tolist()
        out = {k: v / self.info.world_size for k, v in zip(means, values)}
        out.update({k: v for k, v in zip(sums, values[len(means):])}, nonfinite_rewards=int(values[-1]))
        extremes = torch.tensor([-update["ratio_min"], update["ratio_max"], -update["first_ratio_min"],
                                 update["first_ratio_max"]], dtype=torch.float64)
        lo, hi, first_lo, first_hi = distributed.all_reduce_max(extremes).tolist()
        out.update(ratio_min=-lo, ratio_max=hi, first_ratio_min=-first_lo, first_ratio_max=first_hi)
        return out

    def _evaluate(self, step: int) -> None:
        model = self.prepared.model
        ctx = self.ema.swapped_in(model) if self.ema is not None else _null()
        with ctx, using_module(self.adapter, self.prepared.bare):
            result = self.evaluator.run(self._velocity, self.adapter, self.rewards, self.sigmas,
                                        self.kernel, self.device, self.store.extras)
        record = {"step": step, "eval_reward": result.reward, **{f"eval_{k}": v for k, v in result.per_reward.items()}}
        self.evals.append(record)
        if self.info.is_main:
            log.info("eval at step %d: reward %.4f over %d held-out samples", step, result.reward, result.num_samples)
            with open(self.output_dir / "eval.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self._save_media(result.media, result.labels, self.output_dir / "samples" / f"eval_step{step:06d}")

    def _save_media(self, media: torch.Tensor, labels: list[str], stem: Path) -> None:
        per = self.cfg.eval_samples_per_prompt
        if media.dim() == 5:  # video: a grid of middle frames plus the clips
            save_videos(media[:4], stem.parent, stem.name, fps=self.adapter.video_fps)
            media = media[:, :, media.shape[2] // 2]
        save_grid(media, stem.with_suffix(".png"), columns=per, labels=labels[::per],
                  scale=max(1, 64 // media.shape[-1]))

    def _maybe_save_rollout(self, graph: RolloutGraph, it: int) -> None:
        every = self.cfg.save_rollout_samples
        if not (every and self.info.is_main and it % every == 0):
            return
        first = graph.prompt[graph.leaves] == 0
        media = self._last_media[first][:16]
        stem = self.output_dir / "samples" / f"rollout_step{it:06d}"
        if media.dim() == 5:
            save_videos(media[:4], stem.parent, stem.name, fps=self.adapter.video_fps)
        else:
            save_grid(media, stem.with_suffix(".png"), columns=min(8, media.shape[0]), scale=max(1, 64 // media.shape[-1]))

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------------------------
    def save(self, wall_time: float) -> Path:
        trainer_state = {
            "scheduler": self.scheduler.state_dict(),
            "algorithm": self.algo.state_dict(),
            "sampler": self.sampler.state_dict(),
            "evals": self.evals,
            "wall_time_s": wall_time,
            "config": vars(self.cfg),
        }
        rank_state = {"rng": rng_state(), "ema": self.ema.state_dict() if self.ema else None}
        return self.checkpoints.save(self.step, self.prepared.model, self.optimizer, trainer_state, rank_state,
                                     self._export)

    def _export(self, folder: Path) -> None:
        """The user-facing weights (and EMA): gathered on every rank, written by rank 0."""
        self._write_weights(folder / "model", full_state_dict(self.prepared.model))
        if self.ema is not None:
            with self.ema.swapped_in(self.prepared.model):
                # written inside the swap: on CPU the gathered state dict aliases the parameters, which the swap
                # restores to the trained weights on exit (the EMA export was a copy of model/)
                self._write_weights(folder / "ema", full_state_dict(self.prepared.model))

    def _write_weights(self, folder: Path, state: dict) -> None:
        if not self.info.is_main:
            return
        if self.cfg.use_lora:  # the adapter alone, named as peft saves it (wrapper prefixes already stripped)
            self.adapter.export_lora(str(folder), adapter_weights(state))
        else:
            self.adapter.export(str(folder), state)

    def _resume(self, path: Path) -> None:
        state = self.checkpoints.read_trainer_state(path)
        check_resume_config(state["config"], vars(self.cfg), path)
        state, rank_state = self.checkpoints.load(path, self.prepared.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.algo.load_state_dict(state["algorithm"])
        self.sampler.load_state_dict(state["sampler"])
        self.evals = state["evals"]
        self.wall_before = state["wall_time_s"]
        self.step = state["step"]
        set_rng_state(rank_state["rng"])
        if self.ema is not None:
            if rank_state["ema"] is None:
                raise ValueError(f"--resume_from_checkpoint: {path} has no EMA state but --use_ema is set")
            self.ema.load_state_dict(rank_state["ema"])
        log.info("resumed from %s at step %d", path, self.step)

    def _finish(self, wall: float) -> dict:
        summary = {
            "algo": self.cfg.algo,
            "model": self.cfg.model,
            "iterations": self.step,
            "eval_reward_before": self.evals[0]["eval_reward"],
            "eval_reward_after": self.evals[-1]["eval_reward"],
            "eval_samples": self.evaluator.num_samples,
            "eval_sampler": self.cfg.eval_sampler,
            "reward_max": _reward_max(self.rewards),
            "wall_time_s": wall,
            "world_size": self.info.world_size,
            "sizes": self.sizes,
        }
        if self.info.is_main:
            entries = self.metrics.entries
            for key in ("iter_time_s", "rollout_time_s", "reward_time_s", "train_time_s", "peak_memory_mb"):
                values = [e[key] for e in entries]
                summary[f"mean_{key}" if key != "peak_memory_mb" else key] = (
                    (sum(values) / len(values) if key != "peak_memory_mb" else max(values)) if values else None
                )
            summary["first_ratio_max_abs_dev"] = max((max(abs(e["first_ratio_min"] - 1), abs(e["first_ratio_max"] - 1))
                                                      for e in entries), default=0.0)
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            plot_rewards(entries, self.evals, self.output_dir / "reward_curve.png", summary["reward_max"])
            self.metrics.close()
            log.info("done: eval reward %.4f -> %.4f (max %s) in %.0f s", summary["eval_reward_before"],
                     summary["eval_reward_after"], summary["reward_max"], wall)
        return summary

    def _on_sigterm(self, signum, frame) -> None:
        """First SIGTERM: finish the iteration, checkpoint, exit. A second one (torchrun stopping a group after
        another rank failed, or an impatient user): leave now."""
        if self._stop:
            raise SystemExit(143)
        self._stop = True


# Flags that may differ between a run and its resumption; any other change is refused (it would silently train a
# different experiment from the checkpoint's state).
RESUMABLE_CHANGES = {
    "max_train_steps", "resume_from_checkpoint", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "validation_steps", "save_rollout_samples", "report_to", "wandb_project", "run_name", "device", "config",
}


def check_resume_config(saved: dict, current: dict, path: Path) -> None:
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        detail = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"--resume_from_checkpoint {path}: flags differ from the checkpoint's run ({detail}); "
                         "resume with the original flags")


def _reward_options(spec: str, options: dict, model_dir: str) -> dict:
    """Default checkpoint locations under --reward_model_dir, overridable per reward by --reward_options."""
    from branchgrpo.rewards.base import parse_reward_spec

    defaults = {
        "hps": {"checkpoint": f"{model_dir}/HPS_v2.1_compressed.pt"},
        "pickscore": {"model_path": f"{model_dir}/PickScore_v1",
                      "processor_path": f"{model_dir}/CLIP-ViT-H-14-laion2B-s32B-b79K"},
        "clip": {"model_path": f"{model_dir}/clip-vit-large-patch14"},
        "imagereward": {"checkpoint": f"{model_dir}/ImageReward/ImageReward.pt"},
        "videoalign": {"checkpoint": f"{model_dir}/VideoReward"},
    }
    out = {}
    for name in parse_reward_spec(spec):
        out[name] = {**defaults.get(name, {}), **options.get(name, {})}
    return out


def _reward_max(rewards) -> float | None:
    maxima = [getattr(m, "reward_max", None) for m in rewards.models.values()]
    if any(m is None for m in maxima):
        return None
    return sum(rewards.weights[n] * getattr(m, "reward_max") for n, m in rewards.models.items())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

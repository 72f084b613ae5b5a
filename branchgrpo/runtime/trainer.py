"""The training loop shared by every algorithm and backbone:

    prompts -> rollout graph (depth-batched) -> leaf rewards -> advantages -> edge selection -> clipped update
            -> EMA -> log / evaluate / checkpoint

The algorithm unit (branchgrpo.algorithms) supplies the graph's plan, the advantage estimator and the edge selector;
the backbone spec (branchgrpo.models) loads the adapter that supplies velocity and decode; nothing here knows which
of them it drives. Components get their own config section.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from branchgrpo.core import distributed, sde
from branchgrpo.runtime.checkpoint import CheckpointManager, GlobalRNG
from branchgrpo.config import TrainConfig, changed_flags, check_resume_config
from branchgrpo.data.embeddings import EmbeddingStore, with_extras
from branchgrpo.data.prompts import PromptSampler
from branchgrpo.runtime.ema import EMA
from branchgrpo.runtime.entry import RunHalted
from branchgrpo.runtime.guards import DivergenceGuard, NonFiniteGuard, Observation
from branchgrpo.runtime.heldout import Evaluator
from branchgrpo.runtime.metrics import IterationResults, finite_samples, iteration_metrics
from branchgrpo.runtime.monitor import HackingMonitor
from branchgrpo.core.graph import RolloutGraph
from branchgrpo.models.base import check_embedding_keys, decode_media, velocity_fn
from branchgrpo.models.lora import adapter_weights
from branchgrpo.runtime.optim import build_lr_scheduler, build_optimizer
from branchgrpo.runtime.overlap import LeafScorer, overlap_chunks, rollout_while_scoring
from branchgrpo.runtime.outputs import (
    EvalLog,
    MetricsLog,
    Stopwatch,
    json_safe,
    plot_rewards,
    prepare_output_dir,
    save_media,
    start_without_checkpoint,
    write_atomically,
)
from branchgrpo.runtime.parallel import configure_torch, full_state_dict, prepare_model, using_module
from branchgrpo.runtime.preemption import Preempted, Preemption
from branchgrpo.rewards.base import (RewardUnavailable, build_reward_set, decode_and_score, parse_reward_options,
                                    score_latents)
from branchgrpo.core.rollout import NoiseKeys, RolloutSetup
from branchgrpo.runtime.update import PolicyUpdate, RatioDrift, optimizer_steps_per_iteration, ratio_deviation, select_edges
from branchgrpo.runtime.watchdog import Watchdog

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = distributed.init_distributed(cfg.parallel.device, cfg.parallel.collective_timeout_s)
        # stop signals from here on (branchgrpo.runtime.preemption)
        self.preempt = Preemption(cfg.checkpoint.preempt_save_deadline_s, self.info.world_size, self.info.rank)
        self.preempt.install()
        self.device = self.info.device
        configure_torch(cfg.parallel, self.device)
        self.output_dir = Path(cfg.run.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir, self.info.rank, self.info.world_size,
                                             cfg.checkpoint.checkpoints_total_limit, trainable_only=cfg.model.use_lora)
        resume_path = self._check_before_loading()
        resuming = resume_path is not None
        self.algo = cfg.build_algorithm()
        self.spec = cfg.model.spec
        self.store = EmbeddingStore(cfg.data.data_json_path)
        if self.store.model != cfg.model.model:
            raise ValueError(f"--data_json_path: {cfg.data.data_json_path} holds {self.store.model} embeddings, "
                             f"but --model is {cfg.model.model}")
        eval_store = EmbeddingStore(cfg.data.eval_data_json_path, "--eval_data_json_path") \
            if cfg.data.eval_data_json_path else self.store
        # reward models first: a missing checkpoint must fail before the backbone is loaded
        r = cfg.reward
        self.rewards = build_reward_set(r.reward, r.reward_combine, self.device, parse_reward_options(r.reward_options),
                                        model_dir=r.reward_model_dir)
        for store in dict.fromkeys((self.store, eval_store)):  # e.g. the OCR reward's quoted targets
            self.rewards.check_prompts([p["text"] for p in store.prompts], str(store.index_path))
        self.overlap_chunks = overlap_chunks(r.overlap_scoring, r.overlap_chunks, self.rewards.out_of_process,
                                             self.algo.prompt_separable, self.info.is_main)
        self.scoring_pool = ThreadPoolExecutor(1, thread_name_prefix="score") if self.overlap_chunks else None
        self.adapter = self.spec.load(cfg.model, self.device, cfg.parallel.master_dtype)
        check_embedding_keys(self.adapter, list(self.store.keys) + list(self.store.extras), cfg.data.data_json_path)
        self._warn_shift()
        dynamic = cfg.sampling.time_shift == "dynamic"
        self.sigmas = sde.make_sigmas(cfg.sampling.sampling_steps, cfg.sampling.shift,
                                      self.adapter.mu() if dynamic else None,
                                      self.adapter.shift_terminal if dynamic else None)
        self.kernel = self.algo.kernel
        self.prepared = prepare_model(self.adapter, cfg.model, cfg.parallel, self.spec.default_parallel,
                                      cfg.loss.kl_coef > 0, self.info)
        self.optimizer = build_optimizer(self.prepared.model, cfg.optim)
        self.sizes = self._derived_sizes()
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim,
                                            cfg.optim.max_train_steps * self.sizes["optimizer_steps"])
        self.ema = EMA(self.prepared.model, cfg.optim.ema_decay, cfg.optim.ema_device) if cfg.optim.use_ema else None
        # theta_old of a unit that keeps one (DiffusionNFT): a copy of the trained tensors beside them (this rank's
        # shards under FSDP2, the adapter's under LoRA) that samples the rollouts and moves towards theta
        self.old_policy = EMA(self.prepared.model, 0.0, "device") if self.algo.keeps_old_policy else None
        data_seed = cfg.run.seed if cfg.data.sampler_seed is None else cfg.data.sampler_seed
        self.sampler = PromptSampler(self.store, cfg.data.train_batch_size, self.info.rank, self.info.world_size,
                                     data_seed)
        self.evaluator = Evaluator(eval_store, cfg.eval, cfg.sampling.sampling_steps, cfg.sampling.rollout_batch_size,
                                   r.reward_batch_size, self.info.rank, self.info.world_size)
        self.updater = PolicyUpdate(self.adapter, self.prepared.model, self.optimizer, self.scheduler, cfg.optim,
                                    cfg.loss, cfg.run.seed, self.kernel, self.device, self.prepared.autocast,
                                    self.prepared.reference, self.info.rank, self.preempt,
                                    objective=self.algo.objective(cfg.loss), old_policy=self.old_policy)
        self.evals = EvalLog(self.output_dir / "eval.jsonl" if self.info.is_main else None)
        self.clock = Stopwatch()
        self.nonfinite = NonFiniteGuard(r.max_nonfinite_fraction, r.max_nonfinite_iterations, self.info.is_main)
        self.divergence = DivergenceGuard(cfg.optim.max_skipped_steps, self.updater.params, self.optimizer, self.ema,
                                          keep_copy=cfg.model.use_lora or not self.spec.is_large)
        self.monitor = HackingMonitor(cfg.eval, self.device, self.info.is_main, media=self.spec.media)
        self.guards = [self.nonfinite, self.divergence, self.monitor]  # branchgrpo.runtime.guards; the first raises
        self.drift = RatioDrift(cfg.loss.clip_range, cfg.optim.recompute_old_log_prob, self.info.is_main)
        # everything with state, as the checkpoint manager saves and restores it
        self.states = {"scheduler": self.scheduler, "algorithm": self.algo, "sampler": self.sampler,
                       "evals": self.evals, "wall_time_s": self.clock, "nonfinite": self.nonfinite,
                       "monitor": self.monitor, "skipped_steps": self.divergence, "preemption": self.preempt}
        self.rank_states = {"rng": GlobalRNG(), "ema": self.ema, "old_policy": self.old_policy}
        # what an iteration changes before its update ends, put back when a stop signal cuts it short (the EMA and
        # the non-finite counts change after the update; the wall clock keeps counting)
        self.boundary = dict({k: v for k, v in self.states.items() if k not in ("wall_time_s", "preemption")},
                             rng=self.rank_states["rng"])
        self.step = 0
        if resume_path is not None:
            self._resume(resume_path)
        self.metrics = None
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.output_dir / "config.json", json.dumps(cfg.flags, indent=1))
            lg = cfg.logging
            self.metrics = MetricsLog(self.output_dir, lg.report_to, lg.run_name or self.output_dir.name, cfg.flags,
                                      lg.wandb_project, resume_step=self.step if resuming else None)
            if resuming:
                self.evals.rewrite()
            self._log_sizes()

    def _check_before_loading(self) -> Path | None:
        """What can fail without a model fails before one is loaded, in one line: the output folder (a file, not
        writable, or holding an earlier run), and the checkpoint to resume (incomplete, damaged, other flags).
        Returns the verified checkpoint folder, or None."""
        cfg, resuming = self.cfg, self.cfg.checkpoint.resume_from_checkpoint
        prepare_output_dir(self.output_dir, bool(resuming), cfg.run.overwrite_output_dir, self.info.is_main)
        distributed.barrier()  # an overwritten run is gone on every rank before any of them writes
        if not resuming:
            return None
        path = self.checkpoints.resolve(resuming)
        if path is None:  # 'latest' before any checkpoint (a requeued job stopped early): the same command starts over
            start_without_checkpoint(self.output_dir, lambda flags: changed_flags(flags, cfg), self.info.is_main)
            distributed.barrier()
            return None
        check_resume_config(self.checkpoints.read_trainer_state(path)["config"], cfg, path)
        return path

    # ---------------------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        self.clock.start()
        self.preempt.arm()
        distributed.mark("training", self.step)
        self.watchdog = Watchdog.for_run(self.info, self.cfg.parallel.collective_timeout_s)  # several ranks: stalls
        try:
            return self._train()
        except Preempted:  # a stop signal's deadline passed inside an iteration or evaluation: save the boundary
            self.preempt.restore(self.optimizer)
            return self._stop(self.preempt.pending_evaluation is not None or self.step > self.checkpoints.saved_step)
        except RewardUnavailable as err:  # a reward server is gone: the checkpoint of the last boundary, one line
            self.preempt.restore(self.optimizer)
            saved = self.save(prune=False) if self.step > self.checkpoints.saved_step else None
            raise RunHalted(f"{err}; stopped after {self.step} iterations"
                            f"{f', after writing {saved}' if saved else ''}; continue with --resume_from_checkpoint "
                            "latest once the reward is back") from None
        except RuntimeError as err:  # a collective timed out after this rank stalled: one line, where and who
            raise err if self.watchdog is None else self.watchdog.explain(err)
        finally:
            self.preempt.uninstall()
            if self.watchdog is not None:
                self.watchdog.stop()

    def _train(self) -> dict:
        cfg = self.cfg
        total = cfg.optim.max_train_steps
        if self.step == 0 or self.preempt.pending_evaluation is not None:
            self._evaluate(self.step)
        bar = tqdm(range(self.step, total), initial=self.step, total=total, disable=not self.info.is_main,
                   desc=cfg.run.algo, dynamic_ncols=True)
        for it in bar:
            self.preempt.capture(self.boundary)
            entry = self.iteration(it)
            self.step = it + 1
            if self.metrics:
                self.metrics.log(entry)
                bar.set_postfix(reward=_fmt(entry["reward_mean"], ".4f"), loss=_fmt(entry["loss"], ".3g"))
            # the final evaluation too runs here, before the checkpoint of the last step, so that it is part of it
            every = cfg.eval.validation_steps
            if (every and self.step % every == 0) or self.step == total:
                self._evaluate(self.step)
            stop = self.preempt.stop_agreed() and self.step < total  # at the last step: finish instead
            # each the same on every rank: counted over all of them (rewards gathered, gradient norms all-reduced,
            # the monitor on gathered features)
            halted = [guard for guard in self.guards if guard.tripped]
            every = cfg.checkpoint.checkpointing_steps
            if stop or halted or (every and self.step % every == 0):
                saved = self.save(prune=not halted)  # a halted run keeps the older checkpoints
            if halted:
                self._plot()
                raise halted[0].error(saved)
            if stop:
                return self._stop(save=False)
        if not self.evals.records or self.evals.records[-1]["step"] != self.step:
            self._evaluate(self.step)
        self.clock.stop()  # the last checkpoint and the summary report the same training time
        every = cfg.checkpoint.checkpointing_steps
        if every == 0 or self.step % every:
            self.save()
        return self._finish(self.clock.elapsed())

    def iteration(self, it: int) -> dict:
        """One round of the paper's Algorithm: rollout, rewards, advantages, selection, update."""
        t0 = time.time()
        distributed.mark("iteration start", it)
        batch = self.sampler.next_batch()
        embeddings = with_extras(batch.embeddings, self.store.extras, self.device)
        graph, t1, (scores, media) = self.rollout_and_score(embeddings, batch, it)
        t2 = time.time()
        finite = finite_samples(graph)
        self.divergence.keep_if_sound(it, finite)  # the trainable state that sampled finitely, before it changes
        advantages = self.algo.advantages(graph, scores, self.rewards.weights, self.rewards.mode)
        trained = self.algo.select(graph, advantages, it, batch.keys)
        figures = self.algo.observe(graph, self.rewards.weighted_sum(scores), batch.indices, it)  # adaptive policies
        edges = select_edges(graph, trained, advantages, self.cfg.loss.adv_clip_max)
        update = self.updater.run(graph, embeddings, edges, it)
        self.prepared.log_compiles()  # --compile: how many graphs so far, when that changed
        if self.ema is not None and (it + 1) % self.cfg.optim.ema_update_interval == 0:
            self.ema.update(self.prepared.model)
        if self.old_policy is not None:
            self.old_policy.update(self.prepared.model, self.algo.old_policy_decay(it + 1))
        t3 = time.time()
        self._maybe_save_rollout(graph, media, it)
        results = IterationResults(it, graph, scores, self.rewards.weighted_sum(scores), finite, trained, update,
                                   float(edges.weight.sum()), (t0, t1, t2, t3), self.scheduler.get_last_lr()[0],
                                   _peak_memory_mb(self.device))
        metrics = iteration_metrics(results, self.info.world_size)
        self._observe(Observation(it, metrics.entry, metrics.counts))
        self.drift.observe(it, metrics.entry["first_ratio_min"], metrics.entry["first_ratio_max"])
        return metrics.entry | figures

    def _observe(self, seen: Observation) -> None:
        for guard in self.guards:
            guard.observe(seen)

    def rollout(self, embeddings: dict, batch, it: int, prompts: slice = slice(None)) -> RolloutGraph:
        """The rollout graph of the batch's `prompts` (all, or a chunk of them: overlapped scoring)."""
        s, r = self.cfg.sampling, self.cfg.reward
        keys, first = batch.keys[prompts], prompts.start or 0
        noise = NoiseKeys(self.cfg.run.seed, it, keys, shared_root_key=self.info.rank if s.init_same_noise else None)
        prompt_of = None if len(keys) == len(batch.keys) else torch.arange(first, first + len(keys), device=self.device)
        setup = RolloutSetup(self._velocity(embeddings, prompt_of), self.sigmas, self.kernel, noise,
                             self.adapter.latent_shape, self.device, s.rollout_batch_size,
                             keep_means=self.cfg.loss.ratio_norm)
        # reward-guided expansion scores x0-predictions at its splits
        score = partial(score_latents, partial(decode_media, self.adapter), self.rewards, batch.texts,
                        r.reward_batch_size, batch.embeddings, decode_keys=self.adapter.decode_keys)

        def scorer(latents: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
            return score(latents, prompt_index + first)

        sampler = self.old_policy.swapped_in(self.prepared.model) if self.old_policy is not None \
            else contextlib.nullcontext()  # theta_old collects the data of a unit that keeps one
        with using_module(self.adapter, self.prepared.bare), sampler:
            return self.algo.rollout(it, setup, batch.indices[prompts], scorer)

    def rollout_and_score(self, embeddings: dict, batch, it: int):
        """(graph, the time its rollout ended, (scores, media)): the leaves scored after the rollout, or while the next
        chunk of prompts rolls out (--overlap_scoring). A reward that cannot score on one rank (its server is gone)
        stops the iteration on every rank, so that all of them write the checkpoint together."""
        failure, result = None, None
        try:
            if self.overlap_chunks:
                result = self.rollout_while_scoring(embeddings, batch, it)
            else:
                graph = self.rollout(embeddings, batch, it)
                result = graph, time.time(), self.score(graph, batch.texts, batch.embeddings)
        except RewardUnavailable as err:
            failure = err
        if distributed.all_reduce_max(torch.tensor(int(failure is not None))).item():  # collective
            raise failure or RewardUnavailable("a reward failed on another rank; see its error line")
        return result

    def _leaf_inputs(self, graph: RolloutGraph, texts: list[str], per_prompt: dict | None, first: int = 0):
        """(latents, prompts, conditions) of the graph's leaves, whose prompts are rows `first + graph.prompt`."""
        leaves = graph.leaves
        index = graph.prompt[leaves] + first
        # e.g. I2V's first frame for a reward, TI2V's given frame for the decoder; mostly {}
        conditions = self.rewards.conditions(per_prompt, index, also=self.adapter.decode_keys)
        return graph.node_latents(leaves), [texts[int(p)] for p in index], conditions

    @torch.no_grad()
    def score(self, graph: RolloutGraph, texts: list[str],
              per_prompt: dict | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The leaves' rewards ({reward: float32 [leaves]}) and their decoded media."""
        # a cut point per chunk
        decode = self.preempt.guarded(partial(decode_media, self.adapter), "decode and reward chunk")
        latents, prompts, conditions = self._leaf_inputs(graph, texts, per_prompt)
        return decode_and_score(decode, latents, prompts, self.rewards, self.cfg.reward.reward_batch_size, conditions)

    @torch.no_grad()
    def rollout_while_scoring(self, embeddings: dict, batch, it: int):
        """(graph, time its rollout ended, (scores, media)): the rollout in chunks of prompts, each chunk's leaves
        decoded and scored on a worker thread while the next chunk rolls out (branchgrpo.runtime.overlap). The stop
        signals' cut points stay on this thread (the rollout's forwards): with several ranks a cut point is a
        collective, which the worker's calls would interleave with this thread's."""

        def score_batch(latents, prompts, conditions):
            return decode_and_score(partial(decode_media, self.adapter), latents, prompts, self.rewards, len(prompts),
                                    conditions)

        return rollout_while_scoring(len(batch.keys), self.overlap_chunks, partial(self.rollout, embeddings, batch, it),
                                     partial(self._leaf_inputs, texts=batch.texts, per_prompt=batch.embeddings),
                                     LeafScorer(self.scoring_pool, score_batch, self.cfg.reward.reward_batch_size))

    # ---------------------------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------------------------
    def _velocity(self, embeddings: dict, prompt_of: torch.Tensor | None = None):
        """The velocity of rollouts and evaluations, with a cut point for stop signals before each call."""
        return self.preempt.guarded(velocity_fn(self.adapter, embeddings, self.prepared.autocast, prompt_of),
                                    "forward")

    def _warn_shift(self) -> None:
        native, s = self.adapter.native_shift, self.cfg.sampling
        if native is not None and s.time_shift == "static" and abs(native - s.shift) > 1e-6 and self.info.is_main:
            log.warning("--shift %g differs from the static shift %g of the checkpoint's scheduler; sampling uses "
                        "--shift", s.shift, native)

    def _derived_sizes(self) -> dict:
        counts = self.algo.counts(0)
        prompts = self.cfg.data.train_batch_size
        micro = -(-counts["train_forward_passes"] * prompts // self.cfg.optim.train_micro_batch_size)
        steps = optimizer_steps_per_iteration(micro, self.cfg.optim.gradient_accumulation_steps)
        return dict(counts, prompts_per_rank=prompts, world_size=self.info.world_size, micro_batches=micro,
                    optimizer_steps=steps)

    def _log_sizes(self) -> None:
        s, cfg = self.sizes, self.cfg
        B = cfg.data.train_batch_size
        log.info(
            "%s on %s, %d process(es), parallel=%s | per prompt: %d leaves, %d rollout forwards (%.4g per leaf), "
            "%d trainable edges, %d trained at iteration 0 (%.4g per leaf) | per rank and iteration: %d prompts, "
            "%d leaves, %d rollout forwards, %d trained edges from %d training forwards in %d micro-batches of <= %d, "
            "%d optimizer step(s) (gradient_accumulation_steps=%d) | total optimizer steps: %d",
            cfg.run.algo, cfg.model.model, s["world_size"], self.prepared.mode, s["leaves"], s["forward_passes"],
            s["forward_passes_per_leaf"], s["trainable_edges"], s["trained_edges"], s["trained_edges_per_leaf"], B,
            B * s["leaves"], B * s["forward_passes"], B * s["trained_edges"], B * s["train_forward_passes"],
            s["micro_batches"], cfg.optim.train_micro_batch_size, s["optimizer_steps"],
            cfg.optim.gradient_accumulation_steps, cfg.optim.max_train_steps * s["optimizer_steps"],
        )
        (self.output_dir / "sizes.json").write_text(json.dumps(s, indent=1))

    def _evaluate(self, step: int) -> None:
        model = self.prepared.model
        ema = self.ema.swapped_in(model) if self.ema is not None else contextlib.nullcontext()
        self.preempt.capture(self.boundary)
        self.preempt.pending_evaluation = step  # what a checkpoint says if a stop signal cuts this evaluation
        with ema, using_module(self.adapter, self.prepared.bare):
            result = self.evaluator.run(self._velocity, self.adapter, self.rewards, self.sigmas, self.kernel,
                                        self.device, self.store.extras)
        self.preempt.pending_evaluation = None
        record = {"step": step, "eval_reward": result.reward,
                  **{f"eval_{k}": v for k, v in result.per_reward.items()}, "eval_nonfinite": result.num_nonfinite}
        record.update(self.monitor.measure(step, result.media, self.evaluator.sample_ids, self.evaluator.is_pad,
                                           self.cfg.eval.eval_samples_per_prompt))
        self._observe(Observation(step, record, evaluation=True))
        self.evals.append(record)
        if self.info.is_main:
            log.info("eval at step %d: reward %s over %d held-out samples", step, _fmt(result.reward, ".4f"),
                     result.num_samples)
            if self.monitor.enabled:
                log.info("reward-hacking monitor at step %d: %s (%.3f s)", step, self.monitor.summary(record),
                         self.monitor.last_cost_s)
            if self.metrics:
                self.metrics.log_scalars(record)
            if result.num_nonfinite:
                log.warning("eval at step %d: %d of %d held-out samples have no finite reward; %s", step,
                            result.num_nonfinite, result.num_samples,
                            "the mean is over the others" if result.reward is not None else "there is no mean")
            self._save_media(result.media, result.labels, self.output_dir / "samples" / f"eval_step{step:06d}")

    def _save_media(self, media: torch.Tensor, labels: list[str], stem: Path) -> None:
        per = self.cfg.eval.eval_samples_per_prompt
        save_media(media, stem, self.spec.media, columns=per, labels=labels[::per], fps=self.adapter.video_fps)

    def _plot(self) -> None:
        """reward_curve.png (the monitor's values beside the reward) and the end of the loggers, on rank 0."""
        if self.info.is_main:
            plot_rewards(self.metrics.entries, self.evals.records, self.output_dir / "reward_curve.png",
                         self.rewards.reward_max, self.monitor.thresholds())
            self.metrics.close()

    def _maybe_save_rollout(self, graph: RolloutGraph, media: torch.Tensor, it: int) -> None:
        every = self.cfg.logging.save_rollout_samples
        if not (every and self.info.is_main and it % every == 0):
            return
        first = graph.prompt[graph.leaves] == 0
        media = media[first][:16]
        stem = self.output_dir / "samples" / f"rollout_step{it:06d}"
        save_media(media, stem, self.spec.media, columns=min(8, media.shape[0]), fps=self.adapter.video_fps)

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------------------------
    def save(self, prune: bool = True) -> Path:
        distributed.mark("checkpoint")
        return self.checkpoints.save(self.step, self.prepared.model, self.optimizer, self.states, self.rank_states,
                                     self.cfg.flags, self._export, prune=prune)

    def _stop(self, save: bool) -> dict:
        """After a stop signal: the checkpoint of the last boundary (unless written already, or nothing is trained
        yet), then a clean exit."""
        if save and self.step > 0:
            self.save()
        if self.metrics:
            self.metrics.close()
        log.warning("%s: %s; exiting (continue with --resume_from_checkpoint latest)", self.preempt.signal_name,
                    self.preempt.describe(self.step))
        return {"stopped_at": self.step}

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
        if self.cfg.model.use_lora:  # the adapter alone, named as peft saves it (wrapper prefixes already stripped)
            self.adapter.export_lora(str(folder), adapter_weights(state))
        else:
            self.adapter.export(str(folder), state)

    def _resume(self, path: Path) -> None:
        self.step = self.checkpoints.load(path, self.prepared.model, self.optimizer, self.states, self.rank_states)
        log.info("resumed from %s at step %d", path, self.step)

    def _finish(self, wall: float) -> dict:
        summary = {
            "algo": self.cfg.run.algo,
            "model": self.cfg.model.model,
            "iterations": self.step,
            "eval_reward_before": self.evals.records[0]["eval_reward"],
            "eval_reward_after": self.evals.records[-1]["eval_reward"],
            "eval_samples": self.evaluator.num_samples,
            "eval_sampler": self.cfg.eval.eval_sampler,
            "reward_max": self.rewards.reward_max,
            "wall_time_s": wall,
            "world_size": self.info.world_size,
            "sizes": self.sizes,
        }
        if self.info.is_main:
            entries = self.metrics.entries
            for key in ("iter_time_s", "rollout_time_s", "reward_time_s", "train_time_s"):
                values = [e[key] for e in entries]
                summary[f"mean_{key}"] = sum(values) / len(values) if values else None
            summary["peak_memory_mb"] = max((e["peak_memory_mb"] for e in entries), default=None)
            summary["first_ratio_max_abs_dev"] = max((ratio_deviation(e["first_ratio_min"], e["first_ratio_max"])
                                                      for e in entries if e["first_ratio_min"] is not None),
                                                     default=0.0)
            (self.output_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
            self._plot()
            log.info("done: eval reward %s -> %s (max %s) in %.0f s", _fmt(summary["eval_reward_before"], ".4f"),
                     _fmt(summary["eval_reward_after"], ".4f"), summary["reward_max"], wall)
        return summary


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

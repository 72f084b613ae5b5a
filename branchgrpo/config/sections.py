"""The config sections every run has, one dataclass each; their fields are flags under the official names.

Each section owns its flags' one-line docs and defaults, its checks (`validate`, before anything is loaded), the
flags that act only under a condition (`conditions`), and which of its flags may change when a run is resumed
(`RESUMABLE`). Components take the section they need (torchtitan style), never the whole run config. The
algorithm's own section comes from its unit (branchgrpo.algorithms); see branchgrpo.config.train for assembly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from branchgrpo.core.distributed import check_device_name
from branchgrpo.core.flags import flag, flag_fields, require, require_path

log = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def require_positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(isinstance(value, (int, float)) and value > 0, f"--{name}: need a positive number, got {value}")


def require_non_negative(section, *names: str) -> None:
    for name in names:
        require(getattr(section, name) >= 0, f"--{name}: need >= 0, got {getattr(section, name)}")


class Section:
    """Defaults of the per-section hooks."""

    #: flags that may differ between a run and its resumption (any other change is refused)
    RESUMABLE: ClassVar[frozenset[str]] = frozenset()

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        """name -> (the flag acts in this run, the condition in words)."""
        return {}


@dataclass
class RunConfig(Section):
    """Which algorithm, the root seed, and where everything is written."""

    algo: str = flag("branchgrpo", "algorithm (a registered unit: branchgrpo, dancegrpo, mixgrpo, g2rpo, ...)")
    seed: int = flag(42, "seed of every keyed random draw (rollout noise, shuffles, timestep subsets)")
    output_dir: str = flag("outputs/run", "metrics, grids, plots, summary and checkpoints go here")
    overwrite_output_dir: bool = flag(False, "start over in an --output_dir that holds an earlier run: delete its run "
                                      "files (metrics, evaluations, samples, checkpoints, ...; other files stay)")

    RESUMABLE = frozenset({"output_dir", "overwrite_output_dir"})

    def validate(self) -> None:
        require_path(self.output_dir, "--output_dir")


@dataclass
class SamplingConfig(Section):
    """The sigma schedule, the SDE kernel and how rollouts are batched: shared by every algorithm."""

    sampling_steps: int = flag(20, "denoising steps T of every rollout (the tree depth)")
    shift: float = flag(3.0, "static SD3 time shift of the sigma schedule (1 = none)")
    time_shift: str = flag("static", "sigma schedule warp: static (--shift) or dynamic (FLUX's resolution-dependent "
                           "mu)", ("static", "dynamic"))
    sde_kernel: str = flag("auto", "transition kernel: dance (g = eta), flow (g = eta sqrt(sigma/(1-sigma))) or cps "
                           "(coefficients-preserving, std = sigma_next sin(eta pi/2)); auto = the algorithm's own "
                           "(dance for branchgrpo/dancegrpo, flow for the others)", ("auto", "dance", "flow", "cps"))
    eta: float | None = flag(None, "SDE noise level; default 0.3 for the dance kernel, 0.7 for flow, 0.8 for cps")
    cps_log_prob: str = flag("gaussian", "cps: log-prob scale - gaussian (element-averaged density, like the other "
                             "kernels) or reference (the peers' -mean((x'-mean)^2): log-ratios 2 std^2 times ours, so "
                             "their --clip_range is used as is; docs/design_notes.md)", ("gaussian", "reference"))
    init_same_noise: bool = flag(False, "every rollout root of a rank starts from the same initial noise")
    rollout_batch_size: int = flag(32, "latents per velocity call in the rollout (nodes of one depth are batched)")
    max_leaves: int = flag(4096, "refuse graphs with more leaves per prompt than this (raise it knowingly)")
    ignore_last: bool = flag(True, "official flag; always true here: the last step is deterministic, never trained")

    def kernel_kind(self, default: str) -> str:
        return default if self.sde_kernel == "auto" else self.sde_kernel

    def eta_value(self, default_kernel: str) -> float:
        if self.eta is not None:
            return self.eta
        return {"dance": 0.3, "flow": 0.7, "cps": 0.8}[self.kernel_kind(default_kernel)]

    def kernel(self, default_kernel: str):
        from branchgrpo.core import sde

        return sde.Kernel(self.kernel_kind(default_kernel), self.eta_value(default_kernel), self.cps_log_prob)

    def validate(self, algo: str, default_kernel: str) -> None:
        T, eta = self.sampling_steps, self.eta_value(default_kernel)
        require(T >= 2, f"--sampling_steps: need an integer >= 2, got {T}")
        require(self.shift > 0 and math.isfinite(self.shift), f"--shift: need a positive number, got {self.shift}")
        require(eta >= 0 and math.isfinite(eta), f"--eta: need a number >= 0, got {eta}")
        require(self.ignore_last, "--no-ignore_last: the last step (to sigma = 0) is deterministic here (x0 "
                "prediction), so there is no last-step transition to train")
        require(eta > 0, f"--eta 0 makes every step deterministic: nothing to explore or train (algo {algo})")
        require_positive(self, "rollout_batch_size")
        self.kernel(default_kernel)  # the kernel's own checks (cps: eta <= 1; --cps_log_prob reference: cps only)


@dataclass
class LossConfig(Section):
    """The clipped surrogate (paper Eq. 5), advantage clipping and the KL to the reference policy."""

    clip_range: float = flag(1e-3, "PPO clip epsilon of the ratio")
    adv_clip_max: float = flag(5.0, "advantages are clipped to +-this")
    kl_coef: float = flag(0.0, "beta of the closed-form KL to the reference (frozen base; LoRA: adapter disabled); "
                          "diffusion_nft: of its velocity penalty mean ||v_theta - v_ref||^2")
    ratio_norm: bool = flag(False, "GRPO-Guard RatioNorm: each step's log-ratio re-centred and rescaled to std_t "
                            "[log r + mean((mu - mu_old)^2) / (2 std_t^2)] (= mean(eps (mu - mu_old))), and the "
                            "policy loss divided by the step's sigma - sigma_next; keeps the rollout's means")

    def validate(self) -> None:
        require(self.clip_range > 0, f"--clip_range: need > 0, got {self.clip_range}")
        require(self.adv_clip_max > 0, f"--adv_clip_max: need > 0, got {self.adv_clip_max}")
        require(self.kl_coef >= 0, f"--kl_coef: need >= 0, got {self.kl_coef}")


@dataclass
class RewardConfig(Section):
    """Which reward models, with which weights, read from where."""

    reward: str = flag("toy", "reward models and weights, e.g. hps=1.0,clip=0.5")
    reward_combine: str = flag("sum", "multi-reward: sum = weighted raw rewards, advantage = weighted advantages",
                               ("sum", "advantage"))
    reward_model_dir: str = flag("hps_ckpt", "folder holding reward checkpoints (see hps_ckpt/README.md)")
    reward_options: str = flag("", "JSON {reward: {option: value}} passed to the reward factories")
    reward_batch_size: int = flag(16, "leaves decoded and scored per call")
    overlap_scoring: str = flag("auto", "decode and score finished chunks of prompts while the next chunk is rolled "
                                "out (same rewards); auto = on when a reward is scored by another process (remote)",
                                ("auto", "on", "off"))
    overlap_chunks: int = flag(4, "when scoring overlaps the rollout: the batch's prompts are rolled out in this many "
                               "chunks (at most one per prompt)")
    max_nonfinite_fraction: float = flag(0.5, "an iteration with more than this fraction of leaves with a finite "
                                         "sample but no finite reward counts towards --max_nonfinite_iterations")
    max_nonfinite_iterations: int = flag(3, "stop (with a checkpoint) after this many such iterations in a row "
                                         "(0 = never)")

    RESUMABLE = frozenset({"max_nonfinite_fraction", "max_nonfinite_iterations", "overlap_scoring",
                           "overlap_chunks"})  # the overlap changes no result

    def validate(self) -> None:
        from branchgrpo.rewards.base import check_reward_flags, parse_reward_options, parse_reward_spec

        require_positive(self, "reward_batch_size")
        require_positive(self, "overlap_chunks")
        require(0 <= self.max_nonfinite_fraction <= 1,
                f"--max_nonfinite_fraction: need a fraction in [0, 1], got {self.max_nonfinite_fraction}")
        require_non_negative(self, "max_nonfinite_iterations")
        require_path(self.reward_model_dir, "--reward_model_dir")
        check_reward_flags(parse_reward_spec(self.reward), parse_reward_options(self.reward_options))


@dataclass
class ModelConfig(Section):
    """The backbone (a registered spec: branchgrpo.models), its checkpoint and LoRA; the backbone's own flags
    (generation size, guidance, ...) are its section, `backbone`, declared in its module."""

    model: str = flag("toy", "backbone: the name of a registered spec (branchgrpo/models/; an unknown one is refused "
                      "with the list)")
    pretrained_model_name_or_path: str | None = flag(None, "local checkpoint folder (diffusers layout for flux/wan); "
                                                     "toy: default = the checkpoint shipped in the package")
    use_lora: bool = flag(False, "train LoRA adapters (peft) instead of the full model")
    lora_rank: int = flag(32, "LoRA rank")
    lora_alpha: float = flag(64.0, "LoRA alpha")
    lora_target_modules: str = flag("", "comma-separated module names (default: the backbone's attention projections)")
    #: the selected backbone's section (its spec's `Config`: not a flag itself); None: its defaults
    backbone: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = self.spec.Config()

    @classmethod
    def for_backbone(cls, model: str, pretrained_model_name_or_path: str | None = None, **flags) -> "ModelConfig":
        """The section of `--model model` with the flags given for its backbone (sizes not given: the backbone's
        own) - for the evaluation and benchmark CLIs, which refuse a flag the backbone does not take."""
        from branchgrpo.models import get_backbone

        section = get_backbone(model).Config
        own = [f.name for f in flag_fields(section)]
        for name in flags:
            require(name in own, f"--{name}: does not apply to --model {model} (its flags: "
                    f"{', '.join('--' + f for f in own) or 'none'})")
        return cls(model=model, pretrained_model_name_or_path=pretrained_model_name_or_path, backbone=section(**flags))

    @property
    def spec(self):
        from branchgrpo.models import get_backbone

        return get_backbone(self.model)

    @property
    def lora_targets(self) -> list[str] | None:
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()] or None

    def validate(self) -> None:
        spec = self.spec
        self.backbone.validate()
        if self.use_lora:
            require_positive(self, "lora_rank", "lora_alpha")
        if spec.needs_pretrained:
            require(self.pretrained_model_name_or_path is not None,
                    f"--pretrained_model_name_or_path: required for --model {self.model} (a local folder)")
        path = self.pretrained_model_name_or_path
        if path is not None and not Path(require_path(path, "--pretrained_model_name_or_path")).exists():
            from branchgrpo.models.spec import hub_id_hint

            raise FileNotFoundError(f"--pretrained_model_name_or_path: {path} does not exist"
                                    f"{hub_id_hint(path, f'data/{self.model}')}")
        spec.check_files(self)  # sizes against the checkpoint's configs, before any weight is read

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        out = {name: (self.use_lora, "--use_lora") for name in ("lora_rank", "lora_alpha", "lora_target_modules")}
        return {**out, **self.backbone.conditions()}


@dataclass
class DataConfig(Section):
    """The preprocessed prompt embeddings and how many prompts each rank takes per iteration."""

    data_json_path: str | None = flag(None, "index.json of the training prompt embeddings (written by preprocessing)")
    eval_data_json_path: str | None = flag(None, "index.json of held-out prompts for evaluation and sample grids "
                                           "(default: the first --num_eval_prompts training prompts)")
    train_batch_size: int = flag(2, "prompts per rank per iteration (one tree or one group of G each)")
    sampler_seed: int | None = flag(None, "seed of the prompt order (default: --seed)")

    def validate(self) -> None:
        require_positive(self, "train_batch_size")
        for name in ("data_json_path", "eval_data_json_path"):
            path = getattr(self, name)
            if path is not None and not Path(require_path(path, f"--{name}")).exists():
                raise FileNotFoundError(f"--{name}: {path} does not exist; run the preprocess script first")
        require(self.data_json_path is not None,
                "--data_json_path: required (the index.json written by scripts/preprocess/*.sh)")


@dataclass
class OptimConfig(Section):
    """Iterations, the optimizer and its schedule, micro-batching of the update, and the EMA of the weights."""

    max_train_steps: int = flag(300, "training iterations (rollout + update rounds)")
    learning_rate: float = flag(1e-5, "AdamW learning rate")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    lr_scheduler: str = flag("constant_with_warmup", "learning-rate schedule over optimizer steps", LR_SCHEDULERS)
    lr_warmup_steps: int = flag(0, "linear warmup, in optimizer steps")
    lr_num_cycles: float = flag(1.0, "cosine_with_restarts: number of cycles")
    lr_power: float = flag(1.0, "polynomial: decay power")
    max_grad_norm: float = flag(1.0, "gradient clipping on every optimizer step (<= 0: off)")
    train_micro_batch_size: int = flag(8, "distinct parent latents per training forward; sibling edges share it")
    gradient_accumulation_steps: int = flag(0, "micro-batches per optimizer step; 0 = one step per iteration")
    recompute_old_log_prob: bool = flag(False, "re-score the behaviour log-probs with the training forward before "
                                        "the update (one more forward per micro-batch, no backward; makes the "
                                        "first ratio 1 where rollout and training kernels differ: bf16 on GPU, "
                                        "--compile in bf16)")
    use_ema: bool = flag(False, "keep an EMA of the trained weights on the CPU (evaluated and exported beside them)")
    ema_device: str = flag("cpu", "where the EMA lives: cpu (fp32 host copy of this rank's shards) | device (fp32 "
                           "tensors beside this rank's shards on the GPU: no host copy per update)", ("cpu", "device"))
    ema_decay: float = flag(0.995, "EMA decay per update")
    ema_update_interval: int = flag(1, "iterations between EMA updates")
    max_skipped_steps: int = flag(5, "stop (exit 3) after this many optimizer steps in a row skipped for a "
                                  "non-finite gradient norm, with a checkpoint of the last weights whose rollout was "
                                  "finite (LoRA and small backbones; a full fine-tune of a large one keeps no host "
                                  "copy: the checkpoint before is the last good one) (0 = never)")

    RESUMABLE = frozenset({"max_train_steps", "max_skipped_steps", "ema_device"})  # EMA checkpoints: CPU tensors

    def validate(self) -> None:
        require(self.max_train_steps >= 1, f"--max_train_steps: need >= 1, got {self.max_train_steps}")
        require_positive(self, "train_micro_batch_size", "learning_rate", "ema_update_interval")
        require(self.gradient_accumulation_steps >= 0, "--gradient_accumulation_steps: need >= 0 (0 = once per "
                f"iteration), got {self.gradient_accumulation_steps}")
        require_non_negative(self, "lr_warmup_steps", "max_skipped_steps", "weight_decay")
        require(0 < self.ema_decay < 1, f"--ema_decay: need a value in (0, 1), got {self.ema_decay}")
        for name in ("adam_beta1", "adam_beta2"):  # what AdamW would refuse after the model is loaded
            require(0 <= getattr(self, name) < 1, f"--{name}: need a value in [0, 1), got {getattr(self, name)}")
        require_positive(self, "adam_epsilon", "lr_num_cycles", "lr_power")

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        out = {name: (self.use_ema, "--use_ema") for name in ("ema_decay", "ema_update_interval", "ema_device")}
        schedule = self.lr_scheduler
        out.update(lr_warmup_steps=(schedule != "constant", "--lr_scheduler other than constant"),
                   lr_num_cycles=(schedule == "cosine_with_restarts", "--lr_scheduler cosine_with_restarts"),
                   lr_power=(schedule == "polynomial", "--lr_scheduler polynomial"))
        return out


@dataclass
class ParallelConfig(Section):
    """Devices, process-level parallelism (FSDP2 / DDP), activation checkpointing and precision."""

    device: str = flag("auto", "auto (CUDA if present) | cpu | cuda (each rank its local rank's GPU) | cuda:N (one "
                       "process)")
    deterministic: str = flag("auto", "deterministic kernels: auto (on for CPU, where they cost little and make "
                              "resumed runs bitwise equal; off on CUDA) | on | off", ("auto", "on", "off"))
    num_threads: int = flag(0, "CPU threads per process for torch (0: torch's default; the toy runs fastest with 1-2)")
    parallel: str = flag("auto", "auto: the backbone's own (fsdp for flux/wan, ddp for toy) with >1 process",
                         ("auto", "none", "ddp", "fsdp"))
    gradient_checkpointing: bool = flag(False, "activation checkpointing of the backbone's blocks")
    selective_checkpointing: float = flag(1.0, "fraction of blocks checkpointed (from the first)")
    compile: bool = flag(False, "torch.compile each block (after checkpointing, before FSDP2; batch size dynamic)")
    mixed_precision: str = flag("auto", "auto: bf16 on CUDA, fp32 on CPU", ("auto", "bf16", "fp32"))
    master_weight_type: str = flag("fp32", "dtype of the trained weights and optimizer state", ("fp32", "bf16"))
    allow_tf32: bool = flag(True, "TF32 matmuls on CUDA")
    use_cpu_offload: bool = flag(False, "FSDP2: keep parameters and optimizer state on the CPU")
    reduce_dtype: str = flag("fp32", "FSDP2: dtype of the gradient reduce-scatter (bf16 halves its traffic and "
                             "buffers, and rounds the summed gradients)", ("fp32", "bf16"))
    collective_timeout_s: float = flag(600.0, "a collective waits this long for the other ranks, then the run stops "
                                       "with an error; a rank without progress for a quarter of it logs where it "
                                       "waits and which rank is behind")

    # reduce_dtype, compile: change no saved state (checkpoints of runs before the flags existed resume too)
    RESUMABLE = frozenset({"device", "collective_timeout_s", "reduce_dtype", "compile"})

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.master_weight_type == "bf16" else torch.float32

    @property
    def gradient_reduce_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.reduce_dtype == "bf16" else torch.float32

    def compute_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 autocast (explicit, or auto on CUDA), else None (fp32)."""
        if self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None

    def deterministic_on(self, device: torch.device) -> bool:
        return self.deterministic == "on" or (self.deterministic == "auto" and device.type == "cpu")

    def validate(self) -> None:
        check_device_name(self.device)  # whether the GPU is there is checked when the run starts (not by `plan`)
        require_positive(self, "collective_timeout_s")
        require(self.num_threads >= 0, f"--num_threads: need >= 0 (0: torch's default), got {self.num_threads}")
        require(0 <= self.selective_checkpointing <= 1,
                f"--selective_checkpointing: need a fraction in [0, 1], got {self.selective_checkpointing}")

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        sharded = self.parallel == "fsdp" or (self.parallel == "auto" and run.model.spec.default_parallel == "fsdp")
        return {"selective_checkpointing": (self.gradient_checkpointing, "--gradient_checkpointing"),
                "use_cpu_offload": (sharded, "FSDP (--parallel fsdp, or auto with a backbone that shards)"),
                "reduce_dtype": (sharded, "FSDP (--parallel fsdp, or auto with a backbone that shards)")}


@dataclass
class CheckpointConfig(Section):
    checkpointing_steps: int = flag(50, "save a checkpoint every N iterations (and at the end)")
    checkpoints_total_limit: int = flag(3, "keep the newest N checkpoints (0 = all)")
    resume_from_checkpoint: str | None = flag(None, "'latest' (a run without a checkpoint yet starts fresh, so a "
                                              "requeued job repeats its command) or a checkpoint folder")
    preempt_save_deadline_s: float = flag(20.0, "after SIGTERM/SIGINT: finish the iteration if it can be done within "
                                          "this many seconds, else save the state of the last iteration boundary; "
                                          "keep it (plus the save) below the grace before SIGKILL (-1: always "
                                          "finish the iteration)")

    RESUMABLE = frozenset({"checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                           "preempt_save_deadline_s"})

    def validate(self) -> None:
        require_non_negative(self, "checkpointing_steps", "checkpoints_total_limit")
        require(self.preempt_save_deadline_s >= 0 or self.preempt_save_deadline_s == -1,
                f"--preempt_save_deadline_s: need seconds >= 0, or -1, got {self.preempt_save_deadline_s}")
        path = self.resume_from_checkpoint
        if path not in (None, "latest") and not Path(require_path(path, "--resume_from_checkpoint")).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint folder")


@dataclass
class EvalConfig(Section):
    """The held-out evaluation during training: fixed prompts, seeds and sampler."""

    validation_steps: int = flag(25, "evaluate held-out prompts and write a sample grid every N iterations")
    num_eval_prompts: int = flag(16, "held-out prompts per evaluation")
    eval_samples_per_prompt: int = flag(4, "seeds per held-out prompt")
    eval_sampler: str = flag("ode", "evaluation sampler: ode (deterministic) or sde (the training kernel)",
                             ("ode", "sde"))
    eval_seed: int = flag(1234, "seed of the evaluation noise (the same at every evaluation)")
    # the reward-hacking monitor (branchgrpo.runtime.monitor): every evaluation against the step-0 samples
    hacking_guard: str = flag("warn", "reward-hacking monitor at every evaluation, against the base model's (step 0) "
                              "samples: off, warn (a warning when a threshold is crossed), stop (also checkpoint and "
                              "stop)", ("off", "warn", "stop"))
    hacking_features: str = flag("pixels", "features of the monitor's KID/MMD^2 and diversity: pixels (no weights), "
                                 "clip or inception (--hacking_feature_weights)", ("pixels", "clip", "inception"))
    hacking_feature_weights: str | None = flag(None, "local weights file: an open_clip checkpoint (clip) or "
                                               "torchvision's inception_v3_google-0cc3c7bd.pth (inception)")
    hacking_clip_arch: str = flag("ViT-H-14", "open_clip architecture of --hacking_feature_weights (clip)")
    hacking_hf_band: float = flag(0.5, "top frequency band of the artefact score, as a fraction of the frequency "
                                  "range (max-norm radius above 1 - band)")
    hacking_max_hf_ratio: float = flag(2.0, "alarm when the high-frequency share exceeds this multiple of the base "
                                       "model's (0 = not checked)")
    hacking_min_diversity_ratio: float = flag(0.5, "alarm when within-prompt diversity falls below this fraction of "
                                              "the base model's (0 = not checked)")
    hacking_max_kid: float = flag(0.0, "alarm when KID to the base model's samples exceeds this (0 = not checked)")
    hacking_permutations: int = flag(1000, "permutations of the MMD^2 test against the base samples (0 = no p-value)")

    # the monitor's reference (step-0 features) is checkpointed with the settings it needs: it checks them itself
    RESUMABLE = frozenset({"validation_steps", "hacking_guard", "hacking_features", "hacking_feature_weights",
                           "hacking_clip_arch", "hacking_hf_band", "hacking_max_hf_ratio",
                           "hacking_min_diversity_ratio", "hacking_max_kid", "hacking_permutations"})

    def validate(self) -> None:
        require_positive(self, "num_eval_prompts", "eval_samples_per_prompt")
        require_non_negative(self, "validation_steps", "hacking_max_kid", "hacking_permutations")
        require(0 < self.hacking_hf_band <= 1,
                f"--hacking_hf_band: need a fraction in (0, 1], got {self.hacking_hf_band}")
        require(self.hacking_max_hf_ratio == 0 or self.hacking_max_hf_ratio > 1,
                f"--hacking_max_hf_ratio: need a ratio > 1 (or 0 = not checked), got {self.hacking_max_hf_ratio}")
        require(0 <= self.hacking_min_diversity_ratio < 1, "--hacking_min_diversity_ratio: need a fraction in [0, 1) "
                f"(0 = not checked), got {self.hacking_min_diversity_ratio}")
        if self.hacking_guard != "off":  # the weights file read at the first evaluation: checked before any model
            from branchgrpo.rewards.features import check_extractor_files

            check_extractor_files(self.hacking_features, self.hacking_feature_weights, self.hacking_clip_arch,
                                  self.feature_flags)

    @property
    def feature_flags(self):
        """The monitor's feature flags, as the feature extractor's messages name them."""
        from branchgrpo.rewards.features import FeatureFlags

        return FeatureFlags("--hacking_features", "--hacking_feature_weights", "--hacking_feature_weights",
                            "--hacking_clip_arch", "--hacking_clip_arch")

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        on = self.hacking_guard != "off"
        out = {name: (on, "--hacking_guard warn or stop") for name in (
            "hacking_features", "hacking_hf_band", "hacking_max_hf_ratio", "hacking_min_diversity_ratio",
            "hacking_max_kid", "hacking_permutations")}
        out["hacking_feature_weights"] = (on and self.hacking_features != "pixels", "--hacking_features clip or "
                                          "inception")
        out["hacking_clip_arch"] = (on and self.hacking_features == "clip", "--hacking_features clip")
        return out


@dataclass
class LoggingConfig(Section):
    save_rollout_samples: int = flag(0, "every N iterations write a few rollout leaves (PNG grid; MP4/GIF for video)")
    report_to: str = flag("tensorboard", "comma list of tensorboard, wandb, none")
    wandb_project: str = flag("branchgrpo", "wandb project (with --report_to wandb)")
    run_name: str | None = flag(None, "run name for loggers (default: output_dir's name)")

    RESUMABLE = frozenset({"save_rollout_samples", "report_to", "wandb_project", "run_name"})

    @property
    def loggers(self) -> set[str]:
        return {x.strip() for x in self.report_to.split(",")}

    def validate(self) -> None:
        require_non_negative(self, "save_rollout_samples")
        unknown = self.loggers - {"tensorboard", "wandb", "none", ""}
        require(not unknown, f"--report_to: unknown logger(s) {sorted(unknown)}; use tensorboard, wandb or none")

    def conditions(self, run) -> dict[str, tuple[bool, str]]:
        return {"wandb_project": ("wandb" in self.report_to, "--report_to wandb")}

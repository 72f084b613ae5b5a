"""Training configuration: the algorithm flags (config.AlgoConfig) plus model, data, optimisation, parallelism,
checkpointing and logging. Official BranchGRPO / DanceGRPO flags that still mean something keep their names; those
that mean nothing here are refused with the reason (see OFFICIAL_FLAGS), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from branchgrpo.config import AlgoConfig, _f, add_dataclass_args, build_config, load_yaml, validate_algo
from branchgrpo.rewards.base import parse_reward_options

log = logging.getLogger(__name__)

MODELS = ("toy", "flux", "wan")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig(AlgoConfig):
    # --- model and data
    model: str = _f("toy", "backbone adapter", MODELS)
    pretrained_model_name_or_path: str | None = _f(None, "local checkpoint folder (diffusers layout for flux/wan); "
                                                   "toy: default = the checkpoint shipped in the package")
    data_json_path: str | None = _f(None, "index.json of the training prompt embeddings (written by preprocessing)")
    eval_data_json_path: str | None = _f(None, "index.json of held-out prompts for evaluation and sample grids "
                                         "(default: the first --num_eval_prompts training prompts)")
    output_dir: str = _f("outputs/run", "metrics, grids, plots, summary and checkpoints go here")
    h: int | None = _f(None, "image height in pixels (flux, wan)")
    w: int | None = _f(None, "image width in pixels (flux, wan)")
    num_frames: int | None = _f(None, "video frames, 4k + 1 (wan)")
    guidance_scale: float | None = _f(None, "flux: distilled guidance (3.5); wan: classifier-free guidance (5.0)")
    reward_model_dir: str = _f("hps_ckpt", "folder holding reward checkpoints (see hps_ckpt/README.md)")
    reward_options: str = _f("", "JSON {reward: {option: value}} passed to the reward factories")
    # --- optimisation
    seed: int = _f(42, "seed of every keyed random draw (rollout noise, shuffles, timestep subsets)")
    sampler_seed: int | None = _f(None, "seed of the prompt order (default: --seed)")
    train_batch_size: int = _f(2, "prompts per rank per iteration (one tree or one group of G each)")
    rollout_batch_size: int = _f(32, "latents per velocity call in the rollout (nodes of one depth are batched)")
    train_micro_batch_size: int = _f(8, "distinct parent latents per training forward; sibling edges share it")
    gradient_accumulation_steps: int = _f(0, "micro-batches per optimizer step; 0 = one step per iteration")
    reward_batch_size: int = _f(16, "leaves decoded and scored per call")
    learning_rate: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("constant_with_warmup", "learning-rate schedule over optimizer steps", LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "linear warmup, in optimizer steps")
    lr_num_cycles: float = _f(1.0, "cosine_with_restarts: number of cycles")
    lr_power: float = _f(1.0, "polynomial: decay power")
    max_grad_norm: float = _f(1.0, "gradient clipping on every optimizer step (<= 0: off)")
    recompute_old_log_prob: bool = _f(False, "re-score the behaviour log-probs with the training forward before the "
                                      "update (costs one no-grad forward per trained edge; makes the first ratio 1 "
                                      "where rollout and training kernels differ, e.g. bf16 on GPU)")
    # --- parallelism and precision
    device: str = _f("auto", "auto (CUDA if present) | cpu | cuda")
    deterministic: str = _f("auto", "deterministic kernels: auto (on for CPU, where they cost little and make resumed "
                            "runs bitwise equal; off on CUDA) | on | off", ("auto", "on", "off"))
    num_threads: int = _f(0, "CPU threads per process for torch (0: torch's default; the toy runs fastest with 1-2)")
    parallel: str = _f("auto", "auto: fsdp for flux/wan, ddp for toy (with >1 process)", ("auto", "none", "ddp", "fsdp"))
    gradient_checkpointing: bool = _f(False, "activation checkpointing of the backbone's blocks")
    selective_checkpointing: float = _f(1.0, "fraction of blocks checkpointed (from the first)")
    mixed_precision: str = _f("auto", "auto: bf16 on CUDA, fp32 on CPU", ("auto", "bf16", "fp32"))
    master_weight_type: str = _f("fp32", "dtype of the trained weights and optimizer state", ("fp32", "bf16"))
    allow_tf32: bool = _f(True, "TF32 matmuls on CUDA")
    use_cpu_offload: bool = _f(False, "FSDP2: keep parameters and optimizer state on the CPU")
    # --- LoRA, EMA
    use_lora: bool = _f(False, "train LoRA adapters (peft) instead of the full model")
    lora_rank: int = _f(32, "LoRA rank")
    lora_alpha: float = _f(64.0, "LoRA alpha")
    lora_target_modules: str = _f("", "comma-separated module names (default: the backbone's attention projections)")
    use_ema: bool = _f(False, "keep an EMA of the trained weights on the CPU (evaluated and exported beside them)")
    ema_decay: float = _f(0.995, "EMA decay per update")
    ema_update_interval: int = _f(1, "iterations between EMA updates")
    # --- checkpoints, evaluation, logging
    checkpointing_steps: int = _f(50, "save a checkpoint every N iterations (and at the end)")
    checkpoints_total_limit: int = _f(3, "keep the newest N checkpoints (0 = all)")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder")
    validation_steps: int = _f(25, "evaluate held-out prompts and write a sample grid every N iterations")
    num_eval_prompts: int = _f(16, "held-out prompts per evaluation")
    eval_samples_per_prompt: int = _f(4, "seeds per held-out prompt")
    eval_sampler: str = _f("ode", "evaluation sampler: ode (deterministic) or sde (the training kernel)", ("ode", "sde"))
    eval_seed: int = _f(1234, "seed of the evaluation noise (the same at every evaluation)")
    save_rollout_samples: int = _f(0, "every N iterations write a few rollout leaves (PNG grid; MP4/GIF for video)")
    report_to: str = _f("tensorboard", "comma list of tensorboard, wandb, none")
    wandb_project: str = _f("branchgrpo", "wandb project (with --report_to wandb)")
    run_name: str | None = _f(None, "run name for loggers (default: output_dir's name)")

    @property
    def seed_for_data(self) -> int:
        return self.seed if self.sampler_seed is None else self.sampler_seed


# Official flags: name -> (nargs, action). "rename:x" maps to a flag of ours; "reward:x" adds a reward; "noop" is
# accepted because it describes what we always do; "reject:why" refuses with the reason.
OFFICIAL_FLAGS = {
    "use_hpsv2": (0, "reward:hps"),
    "use_pickscore": (0, "reward:pickscore"),
    "use_group": (0, "reject:per-prompt groups are how every algorithm here forms advantages already (the official "
                     "flag was broken); use --algo dancegrpo for DanceGRPO's grouping"),
    "sp_size": (1, "reject-unless:1:sequence parallelism is not implemented; use FSDP (--parallel fsdp)"),
    "train_sp_batch_size": (1, "reject-unless:1:sequence parallelism is not implemented"),
    "cfg": (1, "reject-unless:0.0:the official --cfg is a text-dropout probability for SFT, meaningless in RL; "
               "classifier-free guidance is --guidance_scale (wan)"),
    "fsdp_sharding_startegy": (1, "rename:parallel"),
    "dataloader_num_workers": (1, "noop:embeddings are memory-mapped and read in-process"),
    "num_latent_t": (1, "reject-unless:1:use --num_frames for video"),
    "t": (1, "reject-unless:1:use --num_frames for video"),
    "vae_model_path": (1, "reject:the VAE is read from --pretrained_model_name_or_path/vae"),
    "dit_model_name_or_path": (1, "reject:the transformer is read from --pretrained_model_name_or_path/transformer"),
    "cache_dir": (1, "reject:nothing is downloaded, so there is no cache"),
    "logging_dir": (1, "reject:logs go to --output_dir"),
    "precondition_outputs": (0, "reject:the velocity parameterisation is fixed by the backbone"),
    "loss_coef": (1, "reject-unless:1.0:scale the learning rate instead"),
    "ema_start_step": (1, "reject:EMA starts at the first iteration"),
}


def _apply_official(values: dict, official: dict) -> None:
    for name, raw in official.items():
        _, action = OFFICIAL_FLAGS[name]
        kind, _, arg = action.partition(":")
        if kind == "reward":
            current = values.get("reward")
            values["reward"] = arg if current in (None, "toy") else f"{current},{arg}"
        elif kind == "rename":
            values[arg] = {"full": "fsdp", "none": "ddp"}.get(raw, raw)
            if values[arg] not in ("fsdp", "ddp"):
                raise ValueError(f"--fsdp_sharding_startegy {raw}: only 'full' (FSDP2) and 'none' (DDP) are supported")
        elif kind == "noop":
            log.warning("--%s has no effect here: %s", name, arg)
        elif kind == "reject-unless":
            expected, _, why = arg.partition(":")
            if str(raw) not in (expected, expected.rstrip("0").rstrip(".")) and float(raw) != float(expected):
                raise ValueError(f"--{name} {raw}: {why}")
        else:
            raise ValueError(f"--{name}: not supported: {arg}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchgrpo-train", description="Train with BranchGRPO and relatives.")
    parser.add_argument("--config", default=None, help="YAML file of flag values (CLI flags override it)")
    add_dataclass_args(parser, TrainConfig, "training")
    group = parser.add_argument_group("official flags (compatibility)")
    for name, (nargs, action) in OFFICIAL_FLAGS.items():
        kwargs = {"default": argparse.SUPPRESS, "help": action.split(":", 1)[-1][:80]}
        if nargs == 0:
            group.add_argument(f"--{name}", action="store_true", **kwargs)
        else:
            group.add_argument(f"--{name}", **kwargs)
    return parser


def parse_train_config(argv=None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    values = load_yaml(ns.config) if ns.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    official = {k: values.pop(k) for k in list(values) if k in OFFICIAL_FLAGS}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    official.update({k: v for k, v in vars(ns).items() if k in OFFICIAL_FLAGS})
    _apply_official(values, official)
    cfg = build_config(TrainConfig, values, source=ns.config or "arguments")
    validate_train(cfg)
    return cfg


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"--{name}: need a positive number, got {value}")


def validate_train(cfg: TrainConfig) -> None:
    """All flag checks that need no model: run before anything is loaded."""
    validate_algo(cfg)
    _positive(cfg, "train_batch_size", "rollout_batch_size", "train_micro_batch_size", "reward_batch_size",
              "learning_rate", "num_eval_prompts", "eval_samples_per_prompt", "ema_update_interval")
    if cfg.gradient_accumulation_steps < 0:
        raise ValueError(f"--gradient_accumulation_steps: need >= 0 (0 = once per iteration), got "
                         f"{cfg.gradient_accumulation_steps}")
    for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "checkpoints_total_limit",
                 "save_rollout_samples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name}: need >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.selective_checkpointing <= 1:
        raise ValueError(f"--selective_checkpointing: need a fraction in [0, 1], got {cfg.selective_checkpointing}")
    if not 0 < cfg.ema_decay < 1:
        raise ValueError(f"--ema_decay: need a value in (0, 1), got {cfg.ema_decay}")
    if cfg.use_lora:
        _positive(cfg, "lora_rank", "lora_alpha")
    if cfg.kl_coef > 0 and cfg.model != "toy" and not cfg.use_lora:
        log.warning("--kl_coef with a full fine-tune keeps a frozen copy of the backbone (twice the weights)")
    parse_reward_options(cfg.reward_options)
    for name in ("report_to",):
        unknown = set(x.strip() for x in cfg.report_to.split(",")) - {"tensorboard", "wandb", "none", ""}
        if unknown:
            raise ValueError(f"--{name}: unknown logger(s) {sorted(unknown)}; use tensorboard, wandb or none")
    for flag in ("h", "w"):
        size = getattr(cfg, flag)
        if size is not None and (size <= 0 or size % 16):
            raise ValueError(f"--{flag}: {size} is not a positive multiple of 16 (FLUX/Wan latents are 2x2-packed "
                             "8x-downsampled images)")
    if cfg.num_frames is not None and (cfg.num_frames < 1 or (cfg.num_frames - 1) % 4):
        raise ValueError(f"--num_frames: {cfg.num_frames} is not of the form 4k + 1 (Wan's VAE compresses time 4x)")
    if cfg.model != "toy" and cfg.pretrained_model_name_or_path is None:
        raise ValueError(f"--pretrained_model_name_or_path: required for --model {cfg.model} (a local folder)")
    for flag in ("pretrained_model_name_or_path",):
        path = getattr(cfg, flag)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag}: {path} does not exist")
    for flag in ("data_json_path", "eval_data_json_path"):
        path = getattr(cfg, flag)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag}: {path} does not exist; run the preprocess script first")
    if cfg.data_json_path is None:
        raise ValueError("--data_json_path: required (the index.json written by scripts/preprocess/*.sh)")
    if cfg.resume_from_checkpoint not in (None, "latest") and not Path(cfg.resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: {cfg.resume_from_checkpoint} is not a checkpoint folder")
    _check_something_is_trained(cfg)
    unused = inapplicable_flags(cfg)
    if unused:
        log.warning("these flags have no effect in this configuration: %s", "; ".join(unused))


# (width_pruning_ratio and the depth_pruning_slide* flags have narrower conditions of their own below)
_TREE_FLAGS = ("tree_split_points", "tree_split_rounds", "branch_factor", "branch_innovation",
               "tree_split_noise_scale", "fusion_alpha", "tree_prob_weighted", "width_pruning_mode", "depth_pruning",
               "pruning_step_ratio", "mix_ode_sde_tree")
_WINDOW_FLAGS = ("mix_sde_window_size", "mix_window_interval", "mix_window_stride", "mix_window_start",
                 "mix_window_max_start")
# flag -> (when it has an effect, what that condition is, in words)
_APPLIES = {
    **{f: (lambda c: c.algo == "branchgrpo", "--algo branchgrpo") for f in _TREE_FLAGS},
    **{f: (lambda c: c.algo == "mixgrpo" or (c.algo == "branchgrpo" and c.mix_ode_sde_tree),
           "--algo mixgrpo or --mix_ode_sde_tree") for f in _WINDOW_FLAGS},
    "num_generations": (lambda c: c.algo != "branchgrpo", "--algo dancegrpo, mixgrpo or g2rpo"),
    "timestep_fraction": (lambda c: c.algo == "dancegrpo", "--algo dancegrpo"),
    "g2rpo_steps": (lambda c: c.algo == "g2rpo", "--algo g2rpo"),
    "g2rpo_granularities": (lambda c: c.algo == "g2rpo", "--algo g2rpo"),
    "width_pruning_ratio": (lambda c: c.algo == "branchgrpo" and c.width_pruning_mode == 2, "--width_pruning_mode 2"),
    "depth_pruning_slide": (lambda c: bool(c.depth_pruning.strip()), "a non-empty --depth_pruning"),
    "depth_pruning_slide_interval": (lambda c: c.depth_pruning_slide, "--depth_pruning_slide"),
    "depth_pruning_stop_depth": (lambda c: c.depth_pruning_slide, "--depth_pruning_slide"),
    **{f: (lambda c: c.use_lora, "--use_lora") for f in ("lora_rank", "lora_alpha", "lora_target_modules")},
    **{f: (lambda c: c.use_ema, "--use_ema") for f in ("ema_decay", "ema_update_interval")},
    **{f: (lambda c: c.model != "toy", "--model flux or wan") for f in ("h", "w", "guidance_scale")},
    "num_frames": (lambda c: c.model == "wan", "--model wan"),
    "selective_checkpointing": (lambda c: c.gradient_checkpointing, "--gradient_checkpointing"),
    "use_cpu_offload": (lambda c: c.parallel == "fsdp" or (c.parallel == "auto" and c.model != "toy"),
                        "FSDP (--parallel fsdp, the default for flux and wan)"),
    "wandb_project": (lambda c: "wandb" in c.report_to, "--report_to wandb"),
}


def inapplicable_flags(cfg: TrainConfig) -> list[str]:
    """Flags set to a non-default value that have no effect with the rest of the configuration, with the
    condition under which they would act: warned about at start-up, never silently ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [f"--{name} (acts only with {why})" for name, (applies, why) in _APPLIES.items()
            if getattr(cfg, name) != defaults[name] and not applies(cfg)]


def _check_something_is_trained(cfg: TrainConfig) -> None:
    """Pruning and windows may together exclude every edge (e.g. --depth_pruning over all depths): refuse that
    up front, naming the flags, instead of running rollouts that train nothing."""
    from branchgrpo.plan import count  # plan imports this module

    if count(cfg, 0)["trained_edges"] == 0:
        raise ValueError(f"--depth_pruning '{cfg.depth_pruning}' / --width_pruning_mode {cfg.width_pruning_mode} / "
                         f"--mix_ode_sde_tree {cfg.mix_ode_sde_tree}: no edge is left to train at iteration 0")

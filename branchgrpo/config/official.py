"""The official BranchGRPO / DanceGRPO flags that are not flags of ours: accepted where they still mean something
(renamed, or describing what we always do), refused with the reason otherwise - never silently ignored."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

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


def apply_official(values: dict, official: dict) -> None:
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


def add_official_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("official flags (compatibility)")
    for name, (nargs, action) in OFFICIAL_FLAGS.items():
        kwargs = {"default": argparse.SUPPRESS, "help": action.split(":", 1)[-1][:80]}
        if nargs == 0:
            group.add_argument(f"--{name}", action="store_true", **kwargs)
        else:
            group.add_argument(f"--{name}", **kwargs)

"""Helpers for the trainer tests: toy embeddings on disk, small, fast training runs on the shipped toy model, and the
trainer's rollout as the backbone parity tests run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def make_toy_embeddings(folder: Path) -> tuple[Path, Path]:
    """Train and eval prompt embeddings of the toy, written by the real preprocess step."""
    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.models.toy import build_prompt_encoder
    from branchgrpo.toy.data import eval_prompts_path, train_prompts_path

    encode = build_prompt_encoder(None, "cpu")
    train = run_preprocess(train_prompts_path(), folder / "train", "toy", encode, shard_size=64)
    evals = run_preprocess(eval_prompts_path(), folder / "eval", "toy", encode, shard_size=64)
    return train, evals


def fast_args(emb: tuple[Path, Path], out: Path, **overrides) -> list[str]:
    """A small configuration: 6 steps, splits 0 and 2 (4 leaves), 2 prompts, a few seconds per run."""
    values = {
        "model": "toy", "algo": "branchgrpo", "device": "cpu", "data_json_path": str(emb[0]),
        "eval_data_json_path": str(emb[1]), "output_dir": str(out), "reward": "toy",
        "sampling_steps": 6, "tree_split_points": "0,2", "train_batch_size": 2, "max_train_steps": 2,
        "learning_rate": 1e-3, "rollout_batch_size": 64, "train_micro_batch_size": 8,
        "num_eval_prompts": 2, "eval_samples_per_prompt": 2, "validation_steps": 0, "checkpointing_steps": 0,
        "report_to": "none", "num_generations": 3, "seed": 3,
    }
    values.update(overrides)
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f"--{key}")
        elif value is False:
            args.append(f"--no-{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def train(args: list[str]) -> dict:
    from branchgrpo.config import parse_train_config
    from branchgrpo.runtime.trainer import Trainer

    return Trainer(parse_train_config(args)).train()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()),
           "-m", "branchgrpo.cli.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def exported_weights(out: Path, step: int | None = None, which: str = "model") -> dict[str, torch.Tensor]:
    root = out / "checkpoints"
    name = (root / "latest").read_text().strip() if step is None else f"checkpoint-{step}"
    folder = root / name / which
    files = list(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out_sd = {}
    for f in files:
        out_sd.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out_sd


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


TIMING_KEYS = ("iter_time_s", "rollout_time_s", "reward_time_s", "train_time_s", "peak_memory_mb")


def without_timings(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in entries]


def processes_naming(text: str) -> list[int]:
    """Live (not zombie) processes other than this one whose command line contains `text`. torchrun starts its
    ranks in sessions of their own, so killing torchrun's process group does not reach them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if state != "Z" and text.encode() in cmd:
            found.append(int(entry.name))
    return found


def ode_chains(adapter, cond: dict, sigmas: torch.Tensor, num_prompts: int, seed: int = 0,
               batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's rollout code at eta = 0 (what the backbones' parity tests compare with their pipelines): one ODE
    chain per prompt of `cond` on `sigmas`, the initial noise keyed by (seed, prompt), through the trainer's velocity
    closure. Returns (initial noise, final latents), one row per prompt."""
    from branchgrpo.core import plans, sde
    from branchgrpo.core.rollout import NoiseKeys, run_rollout
    from branchgrpo.models.base import velocity_fn

    sizes = {} if batch_size is None else {"batch_size": batch_size}
    with torch.no_grad():
        graph = run_rollout(plans.group_plan(len(sigmas) - 1, 1, sde_steps=[]), velocity_fn(adapter, cond), sigmas,
                            sde.Kernel("dance", 0.3), NoiseKeys(seed, 0, tuple(range(num_prompts))),
                            adapter.latent_shape, "cpu", keep_all_latents=True, **sizes)
    return graph.node_latents(torch.nonzero(graph.parent < 0).flatten()), graph.node_latents(graph.leaves)

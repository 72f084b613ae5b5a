"""Tiny random checkpoints in the real folder layouts, built offline from configs with fixed seeds: the fixtures of
the tests and of CPU smoke runs (`python -m branchgrpo.make_tiny KIND DIR`).

Backbones write theirs through their spec (`FixtureSupport.tiny` names the writer, e.g.
`branchgrpo.testing.flux_tiny:make_tiny_flux`); rewards through `TINY_REWARDS` below. Nothing here is imported by
training or evaluation code.
"""

from __future__ import annotations

import importlib

# reward kind -> "module:function(out_dir, seed)"; imported on use, so that one kind's dependencies never block another.
TINY_REWARDS = {
    "hps": "branchgrpo.testing.clip_tiny:make_tiny_hps",
    "clip": "branchgrpo.testing.clip_tiny:make_tiny_clip",
    "pickscore": "branchgrpo.testing.clip_tiny:make_tiny_pickscore",
    "imagereward": "branchgrpo.testing.imagereward_tiny:make_tiny_imagereward",
    "videoalign": "branchgrpo.testing.videoalign_tiny:make_tiny_videoalign",
    "geneval": "branchgrpo.testing.geneval_tiny:make_tiny_geneval",
}

# reward kind -> "module:function(out_dir)": the reward options a run needs to score with the tiny checkpoint written
# to out_dir; a kind not listed needs none (its files sit under --reward_model_dir by their released names)
TINY_REWARD_OPTIONS = {
    "hps": "branchgrpo.testing.clip_tiny:tiny_hps_options",
}


def tiny_reward_options(kind: str, out_dir) -> dict:
    """The options of reward `kind` for its tiny checkpoint in `out_dir` (a --reward_options entry)."""
    if kind not in TINY_REWARD_OPTIONS:
        return {}
    module, _, func = TINY_REWARD_OPTIONS[kind].partition(":")
    return getattr(importlib.import_module(module), func)(str(out_dir))


def call_writer(target: str, out_dir: str, seed: int = 0):
    """Run the writer "module:function" as function(out_dir, seed=seed)."""
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(out_dir, seed=seed)

"""Scoring that overlaps the rollout (branchgrpo.runtime.overlap): chunks of prompts rolled out alone and joined give
the batch's graph bitwise, leaves are scored in the batches sequential scoring uses, and a training run with the
overlap on equals the one with it off."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from branchgrpo.core import plans, sde
from branchgrpo.core.graph import concat_graphs
from branchgrpo.core.rollout import NoiseKeys, RolloutSetup
from branchgrpo.runtime.overlap import LeafScorer, overlap_chunks
from trainer_utils import exported_weights, fast_args, make_toy_embeddings, train

KERNEL = sde.Kernel("dance", 0.3)
KEYS = (11, 52, 7, 30, 99)


def _velocity(first: int = 0):
    """An analytic velocity that depends on the prompt (so a wrong prompt offset shows)."""

    def velocity(x, sigma, prompt):
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        target = (prompt + first).float().reshape(-1, *([1] * (x.dim() - 1))) / 4
        return (x - target) * (1 - s) - target

    return velocity


def _rollout(plan, keys, first=0):
    setup = RolloutSetup(_velocity(first), sde.make_sigmas(8, 3.0), KERNEL, NoiseKeys(5, 2, keys), (2, 3),
                         batch_size=4, keep_means=True)  # the kernel means too (--ratio_norm)
    return setup.start(plan, 0.5).finish()


@pytest.mark.parametrize("per_prompt", [False, True])
def test_chunks_rolled_out_alone_join_into_the_batch_graph(per_prompt):
    small, big = plans.tree_plan(8, [1, 4], 2), plans.tree_plan(8, [0, 2, 5], 2)
    plan = [small, big, small, big, big] if per_prompt else big
    whole = _rollout(plan, KEYS)
    chunks = [slice(0, 2), slice(2, 4), slice(4, 5)]
    joined = concat_graphs([_rollout(plan[c] if per_prompt else plan, KEYS[c], c.start) for c in chunks])
    for name in ("parent", "step", "depth", "kind", "prompt", "group", "log_prob", "std", "is_leaf", "std_scale"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    kept = torch.nonzero(whole.latent_row >= 0).flatten()
    assert torch.equal(torch.nonzero(joined.latent_row >= 0).flatten(), kept)
    assert torch.equal(joined.node_latents(kept), whole.node_latents(kept))
    assert torch.equal(joined.means[joined.latent_row[kept]], whole.means[whole.latent_row[kept]])
    assert whole.means.abs().sum() > 0
    assert joined.num_forward_passes == whole.num_forward_passes and joined.num_prompts == 5
    assert (joined.prompt_plans is None) == (not per_prompt)
    assert not torch.equal(whole.node_latents(whole.leaves)[:4], whole.node_latents(whole.leaves)[4:8])


def test_leaves_are_scored_in_the_batches_of_sequential_scoring():
    calls = []

    def score_batch(latents, prompts, conditions):
        calls.append((latents[:, 0].tolist(), list(prompts), conditions["c"][:, 0].tolist()))
        return {"r": latents[:, 0] * 2}, latents + 1

    with ThreadPoolExecutor(1) as pool:
        scorer = LeafScorer(pool, score_batch, batch_size=4)
        rows = torch.arange(10, dtype=torch.float32).reshape(10, 1).repeat(1, 3)
        for start, stop in ((0, 3), (3, 8), (8, 10)):  # chunks of 3, 5 and 2 leaves
            scorer.add(rows[start:stop], [f"p{i}" for i in range(start, stop)], {"c": -rows[start:stop]})
        scores, media = scorer.result()
    assert [c[0] for c in calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert calls[1][1] == ["p4", "p5", "p6", "p7"] and calls[2][2] == [-8, -9]
    assert torch.equal(scores["r"], rows[:, 0] * 2) and torch.equal(media, rows + 1)


def test_when_the_overlap_is_on():
    assert overlap_chunks("auto", 2, out_of_process=False, separable=True, is_main=False) == 0
    assert overlap_chunks("auto", 2, out_of_process=True, separable=True, is_main=False) == 2
    assert overlap_chunks("on", 3, out_of_process=False, separable=True, is_main=False) == 3
    assert overlap_chunks("off", 3, out_of_process=True, separable=True, is_main=False) == 0
    assert overlap_chunks("auto", 2, out_of_process=True, separable=False, is_main=False) == 0
    with pytest.raises(ValueError, match="--overlap_scoring on: this algorithm's rollout couples"):
        overlap_chunks("on", 2, out_of_process=True, separable=False, is_main=False)


@pytest.mark.slow
def test_training_with_the_overlap_equals_training_without(tmp_path, caplog):
    """The toy, 3 prompts per iteration (chunks of 1 and 2 prompts), 4 leaves each and reward batches of 3
    (cut across chunks): the same metrics and bitwise the same weights with the overlap on as off."""
    caplog.set_level(logging.INFO, logger="branchgrpo.runtime.overlap")
    emb = make_toy_embeddings(tmp_path / "emb")
    common = dict(train_batch_size=3, reward_batch_size=3, overlap_chunks=2, max_train_steps=2)
    for mode in ("off", "on"):
        train(fast_args(emb, tmp_path / mode, overlap_scoring=mode, **common))
    assert caplog.text.count("scoring overlaps the rollout: the prompts rolled out in 2 chunks") == 1  # on, and only there
    logs = [[{k: v for k, v in json.loads(line).items() if "time" not in k and k != "peak_memory_mb"}
             for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()] for mode in ("off", "on")]
    assert logs[0] and logs[0] == logs[1]
    weights = [exported_weights(tmp_path / mode) for mode in ("off", "on")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

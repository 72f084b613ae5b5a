"""Two processes under torchrun (gloo, CPU): DDP and FSDP2 keep the ranks in step and train the same model as a
single process fed the same global batch (same prompts, same noise keys, same mean over edges)."""

import pytest
import torch

from trainer_utils import exported_weights, fast_args, make_toy_embeddings, metrics, torchrun, train, without_timings

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


# Adam divides by sqrt(v) + eps: a large eps keeps near-zero gradient components (whose sign is decided by float
# summation order, which differs between 1 and 2 processes) from turning into full learning-rate steps.
COMMON = dict(adam_epsilon=1e-2, use_ema=True, ema_decay=0.5, checkpointing_steps=2)


@pytest.fixture(scope="module")
def single(emb, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(fast_args(emb, out, **dict(COMMON, train_batch_size=2)))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, emb, single, tmp_path):
    out = tmp_path / mode
    proc = torchrun(fast_args(emb, out, parallel=mode, **dict(COMMON, train_batch_size=1)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the same global batch: identical rollouts and rewards at the first iteration
    m1, m2 = without_timings(metrics(single)), without_timings(metrics(out))
    assert m1[0]["reward_mean"] == pytest.approx(m2[0]["reward_mean"], abs=1e-6)
    a, b = exported_weights(single), exported_weights(out)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    # and the weights did move (the comparison is not vacuous)
    from branchgrpo.models.toy import load_toy

    init = load_toy().transformer.state_dict()
    assert max(float((b[f"transformer/{k}"] - v).abs().max()) for k, v in init.items()) > 1e-3
    if mode == "ddp":  # every rank holds the whole model: their EMAs (a function of the weights) agree bitwise
        ranks = [torch.load(out / "checkpoints" / "checkpoint-2" / "state" / f"rank{r}.pt", weights_only=True)
                 for r in (0, 1)]
        ema0, ema1 = ranks[0]["ema"]["shadow"], ranks[1]["ema"]["shadow"]
        assert ema0.keys() == ema1.keys() and all(torch.equal(ema0[k], ema1[k]) for k in ema0)

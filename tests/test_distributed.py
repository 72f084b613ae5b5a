"""Two processes under torchrun (gloo, CPU): DDP and FSDP2 keep the ranks in step and train the same model as a
single process fed the same global batch (same prompts, same noise keys, same mean over edges); an FSDP2 run killed
during a checkpoint write resumes to exactly the unbroken run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from trainer_utils import (
    REPO,
    exported_weights,
    fast_args,
    free_port,
    make_toy_embeddings,
    metrics,
    processes_naming,
    torchrun,
    train,
    without_timings,
)

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


def two_processes(emb, out, mode):
    # --recompute_old_log_prob: its re-scoring forwards run with autograd on and no backward, which DDP and FSDP2 must
    # take without a gradient all-reduce or a stuck hook; in fp32 it changes no number (the runs must match `single`)
    proc = torchrun(fast_args(emb, out, parallel=mode, recompute_old_log_prob=True, **dict(COMMON, train_batch_size=1)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp(emb, tmp_path_factory):
    """The unbroken two-process FSDP2 run (2 iterations)."""
    return two_processes(emb, tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, emb, single, tmp_path, request):
    out = request.getfixturevalue("fsdp") if mode == "fsdp" else two_processes(emb, tmp_path / mode, mode)
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


def test_a_killed_two_process_fsdp_run_resumes_like_the_unbroken_one(emb, fsdp, tmp_path):
    """SIGKILL of the whole torchrun group while checkpoint-2 is being written (rank 0 has exported the weights,
    rank 1 waits at the barrier), then `--resume_from_checkpoint latest` under torchrun: the sharded parameters and
    optimizer state, each rank's RNG, EMA shard and data position come back, and the finished run equals the unbroken
    one bitwise (weights, EMA, metrics, evaluations)."""
    out, marker = tmp_path / "killed", tmp_path / "in_second_save"
    script = tmp_path / "train_then_hang.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        import branchgrpo.runtime.trainer as t
        from branchgrpo.cli.train import main
        orig, calls = t.Trainer._export, []
        def export(self, folder):
            orig(self, folder)
            calls.append(folder)
            if len(calls) == 2 and self.info.is_main:  # checkpoint-2 written, not yet published
                pathlib.Path({str(marker)!r}).write_text(str(folder))
                time.sleep(600)
        t.Trainer._export = export
        sys.exit(main(sys.argv[1:]))
    """))
    # the unbroken run's flags (`two_processes`): its metrics count --recompute_old_log_prob's forwards
    args = fast_args(emb, out, parallel="fsdp", recompute_old_log_prob=True,
                     **dict(COMMON, train_batch_size=1, checkpointing_steps=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    start = time.time()
    while not marker.exists():
        if proc.poll() is not None or time.time() - start > 300:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no second checkpoint write:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    ranks = [pid for pid in processes_naming(str(script)) if pid != proc.pid]  # torchrun names the script too
    assert len(ranks) == 2, ranks
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and, in their own sessions, both ranks at once
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 10
    while processes_naming(str(script)) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_naming(str(script)), "a rank survived its SIGKILL"
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "checkpoint-1" and not (ckpts / "checkpoint-2").exists()
    resumed = torchrun(fast_args(emb, out, parallel="fsdp", resume_from_checkpoint="latest",
                                 recompute_old_log_prob=True, **dict(COMMON, train_batch_size=1, checkpointing_steps=1)))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [e["step"] for e in metrics(out)] == [0, 1]
    assert without_timings(metrics(out)) == without_timings(metrics(fsdp))
    assert (out / "eval.jsonl").read_text() == (fsdp / "eval.jsonl").read_text()
    for which in ("model", "ema"):
        a, b = exported_weights(fsdp, 2, which), exported_weights(out, 2, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


def test_fsdp_bf16_gradient_reduce_and_device_ema(emb, fsdp, tmp_path):
    """--reduce_dtype bf16 (FSDP2's MixedPrecisionPolicy reduce-scatter) and --ema_device device on the same
    two-process run as the fp32 / host-EMA one: it trains to nearly the same weights (the gradients are rounded to bf16
    before they are summed, so not bitwise), and its EMA checkpoints have the host-EMA layout (CPU tensors, same
    names and shard shapes), so either setting resumes the other's checkpoints."""
    out = tmp_path / "bf16_reduce"
    proc = torchrun(fast_args(emb, out, parallel="fsdp", reduce_dtype="bf16", ema_device="device",
                              **dict(COMMON, train_batch_size=1)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = exported_weights(fsdp), exported_weights(out)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < worst < 1e-2, worst  # > 0: the bf16 reduce really happened
    for r in (0, 1):
        ref, new = (torch.load(run / "checkpoints" / "checkpoint-2" / "state" / f"rank{r}.pt", weights_only=True)
                    for run in (fsdp, out))
        ref, new = ref["ema"]["shadow"], new["ema"]["shadow"]
        assert ref.keys() == new.keys()
        assert all(new[k].device.type == "cpu" and new[k].shape == ref[k].shape for k in ref)
        assert max(float((ref[k] - new[k]).abs().max()) for k in ref if ref[k].numel()) < 1e-2

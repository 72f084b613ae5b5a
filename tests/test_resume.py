"""Checkpoints: a resumed run equals an unbroken one bitwise; SIGTERM saves and exits cleanly; a kill during a
checkpoint write leaves the previous checkpoint loadable; corrupt or mismatched checkpoints give clear errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainer_utils import REPO, exported_weights, fast_args, make_toy_embeddings, metrics, train, without_timings

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

# schedules (LR warmup + cosine decay, moving windows), EMA and evaluations all carry state across the resume
STATEFUL = dict(mix_ode_sde_tree=True, mix_sde_window_size=2, mix_window_interval=1, use_ema=True, ema_decay=0.5,
                depth_pruning="3", depth_pruning_slide=True, depth_pruning_stop_depth=1, max_train_steps=4,
                lr_scheduler="cosine", lr_warmup_steps=2, validation_steps=2)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


@pytest.fixture(scope="module")
def straight(emb, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(fast_args(emb, out, checkpointing_steps=2, **STATEFUL))
    return out


def assert_same_run(a, b):
    wa, wb = exported_weights(a, 4), exported_weights(b, 4)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ea, eb = exported_weights(a, 4, "ema"), exported_weights(b, 4, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea), "EMA differs"
    assert without_timings(metrics(a)) == without_timings(metrics(b))
    assert (a / "eval.jsonl").read_text() == (b / "eval.jsonl").read_text()


def test_resumed_run_matches_the_unbroken_run_bitwise(emb, straight, tmp_path):
    out = tmp_path / "resumed"
    train(fast_args(emb, out, checkpointing_steps=2, **dict(STATEFUL, max_train_steps=2)))
    train(fast_args(emb, out, checkpointing_steps=2, resume_from_checkpoint="latest", **STATEFUL))
    assert [e["step"] for e in metrics(out)] == [0, 1, 2, 3]
    assert_same_run(straight, out)
    # the schedules really moved during the run (so their restoration was tested)
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["algorithm"]["window"]["last_iteration"] == 3
    model, ema = exported_weights(out, 4), exported_weights(out, 4, "ema")
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # ema/ is the EMA, not a copy of model/
    lrs = [e["lr"] for e in metrics(out)]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warmup, then decay: the LR schedule crossed the resume
    assert [e["step"] for e in map(json.loads, (out / "eval.jsonl").read_text().splitlines())] == [0, 2, 4]


def _run_script(code: str, tmp_path, name: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=180):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(emb, straight, tmp_path):
    out = tmp_path / "sigterm"
    args = fast_args(emb, out, checkpointing_steps=2, **STATEFUL)
    # slow each iteration down a little so the signal lands mid-run
    proc = _run_script(f"""
        import time, branchgrpo.runtime.trainer as t
        from trainer_utils import train
        orig = t.Trainer.iteration
        t.Trainer.iteration = lambda self, it: (time.sleep(0.5), orig(self, it))[1]
        train({args!r})
    """, tmp_path, "sigterm")
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 1 <= stopped < 4 and len(metrics(out)) == stopped
    train(fast_args(emb, out, checkpointing_steps=2, resume_from_checkpoint="latest", **STATEFUL))
    assert_same_run(straight, out)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(emb, tmp_path):
    out = tmp_path / "killed"
    args = fast_args(emb, out, checkpointing_steps=1, max_train_steps=3)
    marker = tmp_path / "in_second_save"
    proc = _run_script(f"""
        import pathlib, time, branchgrpo.runtime.trainer as t
        from trainer_utils import train
        orig, calls = t.Trainer._export, []
        def export(self, folder):
            orig(self, folder)
            calls.append(folder)
            if len(calls) == 2:  # model files of checkpoint-2 written, not yet published
                pathlib.Path({str(marker)!r}).write_text(str(folder))
                time.sleep(600)
        t.Trainer._export = export
        train({args!r})
    """, tmp_path, "killed")
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "checkpoint-1"
    assert (ckpts / ".tmp-checkpoint-2").exists() and not (ckpts / "checkpoint-2").exists()
    train(fast_args(emb, out, checkpointing_steps=1, max_train_steps=3, resume_from_checkpoint="latest"))
    assert [e["step"] for e in metrics(out)] == [0, 1, 2]
    assert not list(ckpts.glob(".tmp-*")) and (ckpts / "latest").read_text().strip() == "checkpoint-3"


def test_corrupt_or_mismatched_checkpoints_give_clear_errors(emb, straight, tmp_path):
    from branchgrpo.cli.train import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", ckpt)
    resume = lambda **kw: main(fast_args(emb, tmp_path / "r", resume_from_checkpoint=str(ckpt),  # noqa: E731
                                         checkpointing_steps=2, **dict(STATEFUL, **kw)))
    assert resume(tree_split_points="0,1") == 2  # another experiment
    (ckpt / "trainer_state.json").write_text('{"step": 2, "conf')
    assert resume() == 2
    shutil.copy(straight / "checkpoints" / "checkpoint-2" / "trainer_state.json", ckpt / "trainer_state.json")
    for f in (ckpt / "state").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    assert resume() == 2
    (ckpt / "state" / "rank0.pt").unlink()
    assert resume() == 2


def _error_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume_from_checkpoint"), lines
    return lines[0]


@pytest.mark.parametrize("damage,named", [
    ("truncate state/__0_0.distcp", "state/__0_0.distcp"),  # caught by complete.json's sizes
    ("legacy, truncate state/__0_0.distcp", "state/__0_0.distcp"),  # by the DCP metadata's offsets (EOFError)
    ("legacy, truncate state/.metadata", "state/.metadata"),  # (AssertionError inside dcp.load)
    ("garbage state/rank0.pt", "state/rank0.pt"),  # same size: caught by torch.load (UnpicklingError)
    ("legacy, pickle state/rank0.pt", "state/rank0.pt"),  # objects weights_only refuses (UnpicklingError)
    ("delete model", "model/"),  # half deleted
    ("legacy, delete model", "model/*.safetensors"),
])
def test_a_damaged_checkpoint_is_named_in_one_line(damage, named, emb, straight, tmp_path, capsys):
    """Each damage gives exit 2 and one line naming the file and --resume_from_checkpoint, no traceback. "legacy":
    without complete.json, as checkpoints written before it existed."""
    from branchgrpo.cli.train import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", ckpt)
    if damage.startswith("legacy, "):
        (ckpt / "complete.json").unlink(missing_ok=True)
        damage = damage[len("legacy, "):]
    action, name = damage.split(" ")
    target = ckpt / name
    if action == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif action == "garbage":
        target.write_bytes(b"\x07" * target.stat().st_size)
    elif action == "pickle":
        torch.save({"rng": {"torch": Path("not a tensor")}}, target)
    else:
        shutil.rmtree(target)
    assert main(fast_args(emb, tmp_path / "r", resume_from_checkpoint=str(ckpt), checkpointing_steps=2,
                          **STATEFUL)) == 2
    line = _error_line(capsys)
    assert named in line, line


def test_every_checkpoint_ends_with_a_completeness_marker(straight):
    """complete.json is written last: it lists every other file of the checkpoint with its size."""
    ckpt = straight / "checkpoints" / "checkpoint-4"
    marker = json.loads((ckpt / "complete.json").read_text())
    on_disk = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*")
               if p.is_file() and p.name != "complete.json"}
    assert marker == {"step": 4, "files": on_disk}
    assert {"trainer_state.json", "state/.metadata", "state/rank0.pt", "model/transformer.safetensors",
            "ema/transformer.safetensors"} <= set(on_disk)


def test_a_kill_while_deleting_an_old_checkpoint_leaves_no_half_deleted_checkpoint(emb, tmp_path):
    """Rotation (--checkpoints_total_limit) renames an old checkpoint to a hidden trash name before deleting it, so
    a kill halfway through the deletion leaves nothing named like a checkpoint without its files; the next save
    sweeps the trash."""
    out = tmp_path / "rotated"
    args = fast_args(emb, out, checkpointing_steps=1, max_train_steps=2, checkpoints_total_limit=1)
    proc = _run_script(f"""
        import os, shutil, signal
        from trainer_utils import train
        rmtree = shutil.rmtree
        def killed_halfway(path, *args, **kwargs):
            if "checkpoint-1" in str(path) and os.path.isdir(os.path.join(path, "model")):
                rmtree(os.path.join(path, "model"))  # the weights are gone, the rest not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return rmtree(path, *args, **kwargs)
        shutil.rmtree = killed_halfway
        train({args!r})
    """, tmp_path, "rotated")
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stdout.read()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "checkpoint-2"
    assert [p.name for p in ckpts.glob("checkpoint-*")] == ["checkpoint-2"]
    assert [p.name for p in ckpts.glob(".trash-*")] == [".trash-checkpoint-1"]
    train(fast_args(emb, out, checkpointing_steps=1, max_train_steps=3, checkpoints_total_limit=1,
                    resume_from_checkpoint="latest"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3", "latest"]


def test_resume_error_messages(emb, straight, tmp_path, capsys):
    from branchgrpo.cli.train import main

    ckpt = straight / "checkpoints" / "checkpoint-2"
    main(fast_args(emb, tmp_path / "r", resume_from_checkpoint=str(ckpt), checkpointing_steps=2,
                   **dict(STATEFUL, tree_split_points="0,1")))
    assert "--tree_split_points '0,2' -> '0,1'" in capsys.readouterr().err
    # 'latest' on a folder without a checkpoint starts over (a requeued job repeats its command):
    # test_latest_on_a_run_without_a_checkpoint_starts_over_unless_the_files_are_another_runs


def test_a_kill_while_replacing_a_checkpoint_of_the_same_step_keeps_latest_loadable(emb, straight, tmp_path):
    """Re-saving a step that has a checkpoint (a run resumed from an earlier one) swaps the old folder aside before
    the new one takes its name; a kill between the two renames must leave `latest` resolvable, and the next save
    puts the folder back."""
    from branchgrpo.runtime.checkpoint import REPLACED, CheckpointManager

    out = tmp_path / "swap"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "checkpoint-4")
    (ckpts / "latest").write_text("checkpoint-2")
    os.replace(ckpts / "checkpoint-2", ckpts / f"{REPLACED}checkpoint-2")  # the state after such a kill
    assert CheckpointManager(out, 0, 1).resolve("latest").name == f"{REPLACED}checkpoint-2"
    shutil.copy(straight / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copy(straight / "eval.jsonl", out / "eval.jsonl")
    train(fast_args(emb, out, checkpointing_steps=2, resume_from_checkpoint="latest", **STATEFUL))
    assert not list(ckpts.glob(f"{REPLACED}*")) and (ckpts / "checkpoint-2" / "trainer_state.json").is_file()
    assert_same_run(straight, out)


LEGACY = REPO / "tests" / "data" / "legacy_checkpoint" / "checkpoint-1"
LEGACY_FLAGS = dict(use_lora=True, lora_rank=2, lora_alpha=4, use_ema=True, mix_ode_sde_tree=True, max_train_steps=2,
                    checkpointing_steps=1, checkpoints_total_limit=0, learning_rate=1e-2)


def test_a_checkpoint_written_before_the_units_redesign_resumes(emb, tmp_path):
    """tests/data/legacy_checkpoint/checkpoint-1 was written by the code before algorithms, backbones and config
    sections became units (commit c446fc0: a toy LoRA + EMA run of BranchGRPO-Mix, fast_args with LEGACY_FLAGS,
    step 1 of 2). It resumes with today's code and finishes like an unbroken run of today's code. (LoRA runs could
    not resume at all before: the frozen base weights are not in the checkpoint, and the state dict was loaded back
    strictly.) Its recorded paths
    (data, output) are the machine's that wrote it, so they are pointed at this test's folders first, as a user
    moving a run folder would. Numbers are compared to 1e-6, not bitwise: the file was written on another machine
    and torch build than the one that may run this test, and float results differ across CPUs and builds in their
    last digits (same-machine reruns are bitwise: the resume tests above check that). Relative 1e-6 for values of
    order one; absolute 1e-6 as well, because some entries (the surrogate loss: a mean of advantage x ratio over
    groups whose advantages sum to zero) are sums of O(1) float32 terms that cancel to ~1e-8, so their cross-machine
    difference is float32 rounding of the terms (eps 1.2e-7 x O(1)), not of the result: -1.1e-08 vs 0.0 was
    measured between an AMD EPYC machine and the one that recorded the checkpoint."""
    out = tmp_path / "resumed"
    target = out / "checkpoints" / LEGACY.name
    shutil.copytree(LEGACY, target)
    state = json.loads((target / "trainer_state.json").read_text())
    args = fast_args(emb, out, resume_from_checkpoint=str(target), **LEGACY_FLAGS)
    state["config"].update(data_json_path=str(emb[0]), eval_data_json_path=str(emb[1]), output_dir=str(out))
    (target / "trainer_state.json").write_text(json.dumps(state))
    train(args)
    straight = tmp_path / "straight"
    torch.manual_seed(0)  # the LoRA A matrices are drawn from the global RNG, seeded 0 when the checkpoint was made
    train(fast_args(emb, straight, **LEGACY_FLAGS))
    resumed, unbroken = without_timings(metrics(out)), without_timings(metrics(straight))
    assert [e["step"] for e in resumed] == [1]  # the resumed attempt ran the second iteration only
    for key, value in unbroken[1].items():
        assert resumed[0][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]  # step 0 restored from the checkpoint, step 2 evaluated now
    assert evals[1]["eval_reward"] == pytest.approx(json.loads((straight / "eval.jsonl").read_text().splitlines()[1])
                                                    ["eval_reward"], rel=1e-6)
    new_state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert new_state["algorithm"]["window"]["last_iteration"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Untrusted checkpoints: nothing in one runs code; every path read from one stays in its folder
# ---------------------------------------------------------------------------------------------------------------
class Payload:
    """What a planted pickle does when it is loaded: here, write `marker` (in an attack, anything)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from a checkpoint ran')",))


def _plant(ckpts: Path, target: str, marker: Path) -> str:
    """Put a payload (or a path outside the folder) into one file of checkpoint-2, as whoever hands over a checkpoint
    could, and keep complete.json's sizes consistent with it (they could rewrite it too). Returns what the error
    line must name."""
    import dataclasses
    import io
    import pickle

    ckpt = ckpts / "checkpoint-2"
    state = ckpt / "state"
    if target == "latest":
        (ckpts / "latest").write_bytes(pickle.dumps(Payload(marker)))
        return "checkpoints/latest"
    if target == "latest outside":
        (ckpts / "latest").write_text("../../elsewhere/checkpoint-2")
        return "checkpoints/latest"
    if target == "state/__0_0.distcp":  # the optimizer's lr, a non-tensor value, replaced by a torch.save'd payload
        metadata = pickle.loads((state / ".metadata").read_bytes())  # the test's own file: plain pickle is fine
        buffer = io.BytesIO()
        torch.save(Payload(marker), buffer)
        data = state / "__0_0.distcp"
        offset = data.stat().st_size
        data.write_bytes(data.read_bytes() + buffer.getvalue())
        key = next(k for k in metadata.storage_data if k.fqn == "optim.param_groups.0.lr")
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], offset=offset,
                                                         length=len(buffer.getvalue()))
        (state / ".metadata").write_bytes(pickle.dumps(metadata))
        named = "checkpoint-2/state"
    elif target == "state/.metadata outside":
        metadata = pickle.loads((state / ".metadata").read_bytes())
        for key, info in metadata.storage_data.items():
            metadata.storage_data[key] = dataclasses.replace(info, relative_path="../../../outside.distcp")
        (state / ".metadata").write_bytes(pickle.dumps(metadata))
        named = "state/.metadata"
    elif target == "state/rank0.pt":
        torch.save({"rng": Payload(marker)}, state / "rank0.pt")
        named = "state/rank0.pt"
    else:
        (ckpt / target).write_bytes(pickle.dumps(Payload(marker)))
        named = target
    if target != "complete.json":
        listed = json.loads((ckpt / "complete.json").read_text())
        listed["files"] = {name: (ckpt / name).stat().st_size for name in listed["files"]}
        (ckpt / "complete.json").write_text(json.dumps(listed))
    return named


@pytest.mark.parametrize("target", ["latest", "latest outside", "complete.json", "trainer_state.json",
                                    "state/.metadata", "state/.metadata outside", "state/__0_0.distcp",
                                    "state/rank0.pt"])
def test_a_tampered_checkpoint_runs_no_code_and_is_refused_in_one_line(target, emb, straight, tmp_path, capsys):
    """A pickle payload planted in any file that resuming reads (DCP's .metadata was read with plain pickle.load,
    its non-tensor values with torch.load(weights_only=False)) does not run, and the refusal is one line naming the
    file; a pointer or metadata entry leading outside the checkpoint's folder is refused the same way."""
    from branchgrpo.cli.train import main

    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(straight / "checkpoints", out / "checkpoints", ignore=shutil.ignore_patterns("checkpoint-4"))
    (out / "checkpoints" / "latest").write_text("checkpoint-2")
    named = _plant(out / "checkpoints", target, marker)
    assert main(fast_args(emb, out, resume_from_checkpoint="latest", checkpointing_steps=2, **STATEFUL)) == 2
    assert not marker.exists(), f"code planted in {target} ran"
    line = _error_line(capsys)
    assert named in line, line


def test_latest_on_a_run_without_a_checkpoint_starts_over_unless_the_files_are_another_runs(emb, tmp_path, capsys):
    """A requeued job repeats its command, --resume_from_checkpoint latest included, even when the first attempt
    was stopped before its first checkpoint: it starts over, replacing the files that attempt wrote before it
    finished an iteration (same flags in its config.json). Results of trained iterations are never deleted, and
    another run's files are refused, each in one line."""
    from branchgrpo.cli.train import main
    from branchgrpo.config import parse_train_config

    out = tmp_path / "requeued"
    args = fast_args(emb, out, max_train_steps=1, resume_from_checkpoint="latest")
    out.mkdir()
    (out / "config.json").write_text(json.dumps(parse_train_config(args).flags))  # the earlier attempt's files
    (out / "eval.jsonl").write_text('{"step": 0, "eval_reward": 0.5}\n')
    (out / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\n')  # a trained iteration: a result
    assert main(args) == 2
    line = _error_line(capsys)
    assert "holds results (metrics.jsonl: 1 iteration(s))" in line and "nothing was deleted" in line, line
    assert (out / "metrics.jsonl").read_text() == '{"step": 0, "reward_mean": 0.1}\n'
    (out / "metrics.jsonl").write_text('{"step": 0, "rew')  # killed while writing its first iteration's line
    assert main(args) == 0
    assert [e["step"] for e in metrics(out)] == [0]
    assert [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()] == [0, 1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-1"
    capsys.readouterr()

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(parse_train_config(fast_args(emb, other, learning_rate=0.5)).flags))
    assert main(fast_args(emb, other, max_train_steps=1, resume_from_checkpoint="latest")) == 2
    line = _error_line(capsys)
    assert "another run" in line and "--learning_rate 0.5 -> 0.001" in line, line
    (other / "config.json").unlink()
    (other / "metrics.jsonl").write_text("")
    assert main(fast_args(emb, other, max_train_steps=1, resume_from_checkpoint="latest")) == 2
    assert "without a config.json" in _error_line(capsys)


def test_a_run_whose_optimizer_steps_keep_being_skipped_stops_with_a_checkpoint(emb, tmp_path, capsys, monkeypatch):
    """Non-finite gradient norms from iteration 1 on (rewards stay finite, so the non-finite reward guard does not
    trip): after --max_skipped_steps of them in a row the run writes a checkpoint - whose weights are those after
    iteration 0, the last applied step - and stops with one line, exit 3 (halted), instead of running to the end
    with 0."""
    import branchgrpo.runtime.update as update
    from branchgrpo.cli.train import main

    real, calls = update.clip_grad_norm, []

    def diverging(params, max_norm):
        calls.append(None)
        norm = real(params, max_norm)
        return norm if len(calls) == 1 else torch.tensor(float("nan"))

    monkeypatch.setattr(update, "clip_grad_norm", diverging)
    out = tmp_path / "diverged"
    assert main(fast_args(emb, out, max_train_steps=8, max_skipped_steps=3)) == 3
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: diverged: 3 optimizer steps in a row"), lines
    assert "iterations 1-3" in lines[0] and "checkpoint-4" in lines[0] and "iteration 0" in lines[0], lines[0]
    assert [e["skipped_steps"] for e in metrics(out)] == [0, 1, 1, 1]
    monkeypatch.setattr(update, "clip_grad_norm", real)
    reference = tmp_path / "one_iteration"
    train(fast_args(emb, reference, max_train_steps=1))
    a, b = exported_weights(out, 4), exported_weights(reference, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)

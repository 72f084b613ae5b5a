"""Preemption: a stop signal leaves a loadable checkpoint whoever receives it, and the run resumes to exactly the
unbroken run; a stalled rank ends the job with a line naming it.

The signal matrix, as two runs each stopped several times during a slow iteration and then finished by the same
command (with --resume_from_checkpoint latest from the first start on), each equal to its unbroken run bitwise:

    receiver                          processes  the iteration in progress       expected
    the launcher's bash (exec)        1          longer than the deadline        checkpoint at the last finished iteration, exit 0
    the trainer, SIGINT, again        1          longer than the deadline        the same, the 2nd ignored, exit 0
                                                 while saving
    the launcher's bash and torchrun  2          longer than torchrun's grace    the same, exit 143
    rank 1 alone                      2          longer than the deadline        the same, exit 0

A slow iteration: a test-only slow reward (tests/preempt_hook: every reward chunk of it sleeps 2 s, 8 s in all) with a
5 s torchrun grace; the trainer's 1 s --preempt_save_deadline_s cuts it at its next chunk and saves the state at its
start.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_utils import (
    REPO,
    exported_weights,
    fast_args,
    free_port,
    make_toy_embeddings,
    metrics,
    train,
    without_timings,
)


HOOK = REPO / "tests" / "preempt_hook"
GRACE_S = "5"  # torchrun's wait between its SIGTERM to the ranks and SIGKILL: shorter than a slow iteration
SLOW = dict(BG_TEST_SLOW_S="2")  # a slow iteration: 4 reward chunks of 2 s (the cut comes at the 2nd)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


@pytest.fixture(autouse=True)
def no_process_left_running(tmp_path):
    """Whatever a failing test leaves running (e.g. a trainer orphaned by its launcher) is stopped afterwards."""
    yield
    for pid in processes_of(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_args(emb, out: Path, **extra) -> list[str]:
    """The toy launcher's configuration, made small (what the launcher passes, then the test's flags)."""
    values = dict(sampling_steps=4, tree_split_points="0,1", train_batch_size=1, max_train_steps=2, kl_coef=0,
                  num_eval_prompts=1, eval_samples_per_prompt=1, validation_steps=0, checkpointing_steps=0,
                  reward_batch_size=1, rollout_batch_size=64, train_micro_batch_size=8, report_to="none",
                  save_rollout_samples=0, preempt_save_deadline_s=1, data_json_path=emb[0],
                  eval_data_json_path=emb[1], output_dir=out)
    values.update(extra)
    args = ["--config", str(REPO / "configs" / "toy_branchgrpo.yaml"), "--device", "cpu"]
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BG_TEST_")}
    env.update(PYTHONPATH=f"{HOOK}:{REPO}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHON=sys.executable,
               SKIP_SETUP="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT=GRACE_S, TORCHRUN_GRACE_S=GRACE_S,
               MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def trainer_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "branchgrpo.cli.train", *args]


def torchrun_cmd(args: list[str], port: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            "-m", "branchgrpo.cli.train", *args]


def launcher_cmd() -> list[str]:
    return ["bash", str(REPO / "scripts" / "finetune" / "finetune_toy_branchgrpo.sh")]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-4000:]}") from None


def processes_of(out: Path) -> dict[int, dict]:
    """Live processes whose command line names `out` (this test's run): pid -> {"cmd", "rank"}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if state != "Z" and any(str(out).encode() in part for part in cmd):
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
            found[int(entry.name)] = {"cmd": b" ".join(cmd).decode(errors="replace"), "rank": rank}
    return found


def ranks_of(out: Path) -> dict[str, int]:
    return {p["rank"]: pid for pid, p in processes_of(out).items()
            if "branchgrpo.cli.train" in p["cmd"] and "torch.distributed.run" not in p["cmd"] and p["rank"]}


def wait_for(predicate, proc, log: Path, timeout: float = 240) -> None:
    start_time = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.time() - start_time > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def assert_same_run(a: Path, b: Path, step: int = 2) -> None:
    wa, wb = exported_weights(a, step), exported_weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    assert without_timings(metrics(a)) == without_timings(metrics(b))
    assert (a / "eval.jsonl").read_text() == (b / "eval.jsonl").read_text()


def saved_step(out: Path, world_size: int) -> int:
    from branchgrpo.runtime.checkpoint import CheckpointManager

    path = CheckpointManager(out, 0, world_size).resolve("latest")  # verified: complete and loadable
    return int(path.name.split("-")[1])


def unbroken(emb, out: Path, world_size: int, steps: int) -> Path:
    args = run_args(emb, out, max_train_steps=steps)
    if world_size == 1:
        from branchgrpo.config import parse_train_config
        from branchgrpo.runtime.trainer import Trainer

        Trainer(parse_train_config(args)).train()
        return out
    proc = subprocess.run(torchrun_cmd(args, str(free_port())), cwd=REPO, env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def interrupt(cmd, env, out: Path, log: Path, iteration: int, send) -> tuple[int, float]:
    """Start `cmd` with `iteration` slowed down, call `send(proc)` once it scores, wait for the end. Returns the exit
    code and the seconds from the signal to the end."""
    marker = log.with_suffix(".slow")
    proc = start(cmd, dict(env, **SLOW, BG_TEST_SLOW_FROM=str(iteration), BG_TEST_MARKER=str(marker)), log)
    wait_for(marker.exists, proc, log)
    sent = time.time()
    send(proc)
    rc = finish(proc, log)
    return rc, time.time() - sent


def check_stopped(out: Path, log: Path, world_size: int, iteration: int) -> None:
    """Iterations before `iteration` finished, `iteration` was cut: its checkpoint is the state after them (complete
    and loadable), the metrics end there, and no process of the run is left."""
    text = log.read_text()
    assert saved_step(out, world_size) == iteration, text[-4000:]
    assert [e["step"] for e in metrics(out)] == list(range(iteration))
    time.sleep(0.5)
    assert not processes_of(out), f"left behind: {processes_of(out)}"
    # no traceback but torchrun's own, when it was signalled itself
    assert text.count("Traceback") <= text.count("elastic.multiprocessing.api.SignalException: Process"), text[-4000:]


@pytest.mark.slow  # processes and signals: not in the fast tier
def test_one_process_sigterm_to_the_launcher_then_sigint_twice(emb, tmp_path):
    """One run, stopped twice. (1) SIGTERM to the launcher's pid - its bash exec'd the trainer - during iteration 1:
    checkpoint-1. The first start already passes --resume_from_checkpoint latest, as a requeue script would: it
    starts fresh, with a notice. (2) The same command given to the trainer directly, Ctrl-C during iteration 2 and
    Ctrl-C again while the checkpoint is written: the second is ignored, checkpoint-2. (3) The same command finishes
    the run, equal to the unbroken run bitwise."""
    out, logs = tmp_path / "run", tmp_path
    args = run_args(emb, out, max_train_steps=3, resume_from_checkpoint="latest")
    launcher_env = environment(OUTPUT_DIR=str(out), NPROC="1")
    rc, took = interrupt(launcher_cmd() + args, launcher_env, out, logs / "1.log", 1,
                         lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert rc == 0, (logs / "1.log").read_text()[-3000:]
    check_stopped(out, logs / "1.log", 1, 1)
    assert "no checkpoint in" in (logs / "1.log").read_text()  # the first start's notice

    saving = logs / "saving"

    def sigint_twice(proc):
        os.kill(proc.pid, signal.SIGINT)
        wait_for(saving.exists, proc, logs / "2.log")
        os.kill(proc.pid, signal.SIGINT)

    rc, _ = interrupt(trainer_cmd(args), environment(BG_TEST_SAVE_MARKER=str(saving)), out, logs / "2.log", 2,
                      sigint_twice)
    assert rc == 0, (logs / "2.log").read_text()[-3000:]
    check_stopped(out, logs / "2.log", 1, 2)
    assert "SIGINT again: ignored" in (logs / "2.log").read_text()

    from branchgrpo.config import parse_train_config
    from branchgrpo.runtime.trainer import Trainer

    Trainer(parse_train_config(args)).train()
    assert_same_run(unbroken(emb, tmp_path / "unbroken", 1, 3), out, 3)


@pytest.mark.slow  # processes and signals: not in the fast tier
def test_two_processes_sigterm_to_the_launcher_and_torchrun_then_to_one_rank(emb, tmp_path):
    """One two-process run, stopped twice, each time during a slow iteration, then finished by the same command:
    equal to the unbroken run bitwise. (1) SIGTERM to the launcher's bash and to torchrun, as a scheduler signals
    the processes of a job: bash forwards it to torchrun, which so receives it twice and forwards it to the ranks
    (twice as well); the iteration is longer than torchrun's grace. Exit 128 + 15. (2) SIGTERM to rank 1 alone: rank
    0 learns of it at the next cut point; both save and exit 0."""
    out, logs = tmp_path / "run", tmp_path
    args = run_args(emb, out, max_train_steps=3, resume_from_checkpoint="latest")

    def scheduler(proc):
        torchrun = [pid for pid, p in processes_of(out).items() if "torch.distributed.run" in p["cmd"]]
        assert len(torchrun) == 1, processes_of(out)
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(torchrun[0], signal.SIGTERM)

    env = environment(OUTPUT_DIR=str(out), NPROC="2", LOG_DIR=str(logs / "ranks"))
    rc, took = interrupt(launcher_cmd() + args, env, out, logs / "1.log", 1, scheduler)
    assert rc == 128 + signal.SIGTERM, (logs / "1.log").read_text()[-3000:]
    assert took < float(GRACE_S) + 5
    check_stopped(out, logs / "1.log", 2, 1)

    rc, _ = interrupt(torchrun_cmd(args, str(free_port())), environment(), out, logs / "2.log", 2,
                      lambda proc: os.kill(ranks_of(out)["1"], signal.SIGTERM))
    assert rc == 0, (logs / "2.log").read_text()[-3000:]
    check_stopped(out, logs / "2.log", 2, 2)

    rc = finish(start(torchrun_cmd(args, str(free_port())), environment(), logs / "3.log"), logs / "3.log")
    assert rc == 0, (logs / "3.log").read_text()[-3000:]
    assert_same_run(unbroken(emb, tmp_path / "unbroken", 2, 3), out, 3)


@pytest.mark.slow  # processes and signals: not in the fast tier
def test_a_stalled_rank_ends_the_job_with_a_line_naming_it(emb, tmp_path):
    """Rank 1 stops itself (SIGSTOP) at the start of iteration 0: rank 0 waits in a collective, the watchdog names
    the collective and rank 1 after a quarter of --collective_timeout_s, and rank 0 ends with that line after the
    timeout instead of hanging for the default 10 minutes (30 before). (torchrun then stops the stopped rank after
    its own 30 s: not waited for here.)"""
    out, log = tmp_path / "run", tmp_path / "log"
    args = run_args(emb, out, collective_timeout_s=6)
    env = environment(BG_TEST_STOP_RANK="1", BG_TEST_STOP_AT="0")
    proc = start(torchrun_cmd(args, str(free_port())), env, log)
    try:
        wait_for(lambda: "error: a collective timed out" in log.read_text(), proc, log)
        wait_for(lambda: "0" not in ranks_of(out), proc, log, timeout=30)  # rank 0 has exited
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = log.read_text().splitlines()
    line = next(x for x in lines if "error: a collective timed out" in x)
    assert "rank 0: no progress" in line and "all_reduce_max" in line and "behind: rank 1 (heartbeat" in line, line
    assert not [x for x in lines if "stalled:" in x and "iteration 0" not in x]  # no false alarm at start-up


@pytest.fixture
def own_signal_handlers():
    """In-process trainers install SIGTERM/SIGINT handlers in the test process: put the originals back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.slow  # three short training runs
def test_cuts_after_an_optimizer_step_and_inside_an_evaluation_resume_exactly(emb, tmp_path, monkeypatch,
                                                                               own_signal_handlers):
    """Iterations of several optimizer steps (--gradient_accumulation_steps 1): SIGTERM after the first step of
    iteration 1 - the cut must put back the weights and optimizer state kept in host memory, not save a partial
    update. Then SIGTERM at the start of the evaluation at step 2: saved as pending, run first on resume. Deadline
    0: cut at the next cut point. The twice-stopped run equals the unbroken one bitwise."""
    import branchgrpo.runtime.trainer as trainer
    import branchgrpo.runtime.update as update

    flags = dict(max_train_steps=3, validation_steps=2, checkpointing_steps=0, train_micro_batch_size=2,
                 gradient_accumulation_steps=1, preempt_save_deadline_s=0)
    out = tmp_path / "run"
    args = fast_args(emb, out, resume_from_checkpoint="latest", **flags)
    now, real_run, real_norm = {}, update.PolicyUpdate.run, update.clip_grad_norm

    def run(self, graph, embeddings, edges, iteration):
        now.update(iteration=iteration, steps=0)
        return real_run(self, graph, embeddings, edges, iteration)

    def norm(params, max_norm):
        now["steps"] += 1
        if now["iteration"] == 1 and now["steps"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # this step is taken; the next micro-batch is a cut point
        return real_norm(params, max_norm)

    monkeypatch.setattr(update.PolicyUpdate, "run", run)
    monkeypatch.setattr(update, "clip_grad_norm", norm)
    assert train(args) == {"stopped_at": 1}
    assert saved_step(out, 1) == 1 and [e["step"] for e in metrics(out)] == [0]
    monkeypatch.undo()

    real_evaluate = trainer.Trainer._evaluate

    def evaluate(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(self, step)

    monkeypatch.setattr(trainer.Trainer, "_evaluate", evaluate)
    assert train(args) == {"stopped_at": 2}
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["preemption"] == {"pending_evaluation": 2}
    monkeypatch.undo()

    train(args)
    unbroken = tmp_path / "unbroken"
    train(fast_args(emb, unbroken, **flags))
    assert_same_run(unbroken, out, 3)
    assert [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()] == [0, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# The mechanisms, without training (fast tier)
# ---------------------------------------------------------------------------------------------------------------
def test_signals_stop_at_once_before_training_and_are_deferred_then_repeats_ignored(own_signal_handlers):
    from branchgrpo.runtime.preemption import Preempted, Preemption

    early = Preemption(deadline_s=0.3, world_size=1, rank=0)
    early.install()
    with pytest.raises(SystemExit) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs in this thread at the next bytecode
    assert stopped.value.code == 128 + signal.SIGINT

    p = Preemption(deadline_s=0.3, world_size=1, rank=0)
    p.install()
    p.arm()
    p.cut_point()  # no signal: nothing
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert p.requested and p.signal_name == "SIGTERM" and p.stop_agreed()
    p.cut_point()  # the deadline has not passed: the iteration goes on
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun's copy of the scheduler's signal
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    assert p.repeats == 2
    with pytest.raises(Preempted):
        p.cut_point()
    p.uninstall()  # after a stop, late copies are ignored rather than killing a process that exits cleanly
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_the_boundary_puts_back_small_states_weights_and_optimizer_state():
    from branchgrpo.runtime.preemption import Preemption

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    def step():
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    for first in (True, False):  # before the optimizer has any state, and after
        if not first:
            step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        adam = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()}
        lr, sched = optimizer.param_groups[0]["lr"], scheduler.state_dict()
        p = Preemption(deadline_s=0, world_size=1, rank=0)
        p.capture({"scheduler": scheduler})
        p.keep_weights(list(model.parameters()), optimizer)
        step()
        step()
        p.restore(optimizer)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        restored = optimizer.state_dict()["state"]
        assert restored.keys() == adam.keys()
        assert all(torch.equal(adam[k][n], restored[k][n]) for k in adam for n in adam[k])
        assert optimizer.param_groups[0]["lr"] == lr and scheduler.state_dict() == sched


def test_dcp_metadata_is_read_without_running_code(tmp_path):
    """DCP's .metadata is a pickle: the allow-listed unpickler reads a real one, refuses a payload before anything
    of it runs, and refuses data files outside the checkpoint's folder."""
    import dataclasses
    import pickle

    import torch.distributed.checkpoint as dcp

    from branchgrpo.runtime.checkpoint import read_dcp_metadata

    dcp.save({"w": torch.ones(3), "lr": 0.5, "betas": (0.9, 0.99)}, checkpoint_id=str(tmp_path / "state"),
             no_dist=True)
    metadata = read_dcp_metadata(tmp_path / "state" / ".metadata")
    assert {k.fqn for k in metadata.storage_data} == {"w", "lr", "betas"}

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        read_dcp_metadata(tmp_path / "state" / ".metadata")
    assert not marker.exists()

    for key, info in metadata.storage_data.items():
        metadata.storage_data[key] = dataclasses.replace(info, relative_path="/etc/passwd")
    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(pickle.UnpicklingError, match="outside its folder"):
        read_dcp_metadata(tmp_path / "state" / ".metadata")


def test_the_latest_pointer_names_a_checkpoint_of_its_folder_or_nothing(tmp_path):
    from branchgrpo.runtime.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, 0, 1)
    assert manager.resolve("latest") is None  # no checkpoint yet: a requeued job starts over
    (tmp_path / "checkpoints").mkdir()
    for pointer in ("../../somewhere/checkpoint-3", "/abs/checkpoint-3", "checkpoint-3/../../x"):
        (tmp_path / "checkpoints" / "latest").write_text(pointer)
        with pytest.raises(ValueError, match="not a checkpoint of"):
            manager.resolve("latest")


def test_a_torn_last_line_is_dropped_and_a_damaged_line_named(tmp_path, caplog):
    from branchgrpo.runtime.outputs import MetricsLog, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-append
    log = MetricsLog(tmp_path, "none", "run", {}, "project", resume_step=2)
    assert [e["step"] for e in log.entries] == [0, 1]
    assert "metrics.jsonl: dropped its last line" in caplog.text
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 2.0}\n'
    path.write_bytes(b'{"step": 0}\n\x80\x81 garbage\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_jsonl(path)


def test_unreadable_config_and_index_files_are_named(tmp_path):
    from branchgrpo.core.flags import load_yaml
    from branchgrpo.data.embeddings import EmbeddingStore, write_index, write_shard

    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x80\x81\xfe binary")
    with pytest.raises(ValueError, match="--config: .*config.yaml is not a text file"):
        load_yaml(binary)
    binary.write_text("algo: [unclosed\n")
    with pytest.raises(ValueError, match="--config: .*config.yaml is not valid YAML at line"):
        load_yaml(binary)

    folder = tmp_path / "emb"
    write_shard(folder, 0, {"prompt_embeds": torch.zeros(2, 3)}, ["a", "b"])
    index = write_index(folder, "toy", 1, {})
    (tmp_path / "outside.safetensors").write_bytes((folder / "shards" / "shard-00000.safetensors").read_bytes())
    data = json.loads(index.read_text())
    data["shards"][0]["file"] = "../outside.safetensors"  # exists, and would be read
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="index.json names the shard '../outside.safetensors', a path outside"):
        EmbeddingStore(index)
    index.write_bytes(b"\x80\x81 not json")
    with pytest.raises(ValueError, match="index.json"):
        EmbeddingStore(index)


def test_a_hub_id_is_answered_with_the_download_command(tmp_path, monkeypatch):
    from branchgrpo.config.sections import ModelConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        ModelConfig(model="flux", pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev").validate()
    assert "huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir data/flux" in str(err.value)

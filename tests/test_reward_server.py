"""The reward server (python -m branchgrpo.serve_reward) and the `remote` reward, against real server processes on
127.0.0.1 started here: scores equal to in-process scoring, start-up refusals, the fault cases (slow, HTTP 500,
garbage, killed mid-run) ending in a retry that succeeds or one clear line in bounded time, and training runs whose
reward is served (2 processes; a server killed mid-run stops the run with a checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.base import RewardUnavailable
from branchgrpo.rewards.remote import quantise

pytest.importorskip("aiohttp", reason="the reward server needs aiohttp (requirements-rewards.txt)")

from trainer_utils import REPO, fast_args, make_toy_embeddings, torchrun  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # every test starts server processes
PROMPTS = ["a bold three", "a five", "a thin seven", "one", "a wide zero", "a slanted two"]
SERVE = ["--reward", "toy,toy_digit", "--device", "cpu", "--port", "0"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@contextmanager
def server(fault: tuple | None = None, extra=()):
    """A reward server process (with `fault` = (mode, start, count, delay_s): tests/reward_fault_server.py); yields
    (process, url); killed on exit."""
    if fault is None:
        command = [sys.executable, "-m", "branchgrpo.serve_reward", *SERVE, *extra]
    else:
        command = [sys.executable, str(REPO / "tests" / "reward_fault_server.py"), *map(str, fault), "--", *SERVE]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("listening on "), f"the reward server did not start (got {line!r})"
        yield process, line.split()[-1]
    finally:
        process.kill()
        process.wait(timeout=10)


def _media(num=len(PROMPTS)) -> torch.Tensor:
    media = torch.rand(num, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    media[2, 1, 3, 3] = float("nan")  # a diverged sample: NaN in process and remote alike
    return media


def _remote(url, **options):
    return build_reward("remote", url=url, **{"reward": "toy", "backoff_s": 0.05, "timeout_s": 5.0, **options})


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_remote_scores_equal_in_process_scores():
    media, local = _media(), build_reward("toy")
    with server() as (_, url):
        remote = _remote(url)
        assert remote.reward_max == 1.0
        assert _same(remote(media, PROMPTS), local(media, PROMPTS))  # float32: bitwise
        eight_bit = quantise(media).float() / 255
        expected = local(eight_bit, PROMPTS)
        expected[2] = float("nan")
        for encoding in ("uint8", "png"):  # the server scores the 8-bit images
            assert _same(_remote(url, encoding=encoding)(media, PROMPTS), expected), encoding
        digit = build_reward("remote", url=url, reward="toy_digit")
        assert _same(digit(media, PROMPTS), build_reward("toy_digit")(media, PROMPTS))
        with pytest.raises(ValueError, match="refused the request.*unknown word"):  # a bad prompt: the server's 400
            remote(media[:1], ["a purple three"])


def test_start_up_refuses_a_missing_reward_or_server():
    with server() as (_, url):
        with pytest.raises(ValueError, match=rf"^--reward_options: reward 'remote': {url} does not serve 'hps' "
                                             r"\(it serves toy, toy_digit\)"):
            _remote(url, reward="hps")
        port = url.rsplit(":", 1)[1]
    start = time.time()
    with pytest.raises(ValueError, match=rf"127.0.0.1:{port}/version failed 2 times.*is the reward server running"):
        _remote(url, retries=1)  # the server is gone now
    assert time.time() - start < 10
    with pytest.raises(ValueError, match="option url must be the http"):
        build_reward("remote", url="localhost:8765", reward="toy")


# (mode, faulty requests, server delay, client options) -> what the client does: scores after a retry, or one line
FAULTS = {
    "slow once: retried": (("slow", 0, 1, 30.0), {"timeout_s": 2.0}, None),
    "slow always: timeout line": (("slow", 0, -1, 30.0), {"timeout_s": 1.0, "retries": 1},
                                  "no answer within timeout_s=1"),
    "500 once: retried": (("error", 0, 1, 0), {}, None),
    "500 always: error line": (("error", 0, -1, 0), {"retries": 2}, "failed 3 times.*HTTP 500"),
    "garbage once: retried": (("garbage", 0, 1, 0), {}, None),
    "garbage always: error line": (("garbage", 0, -1, 0), {"retries": 1},
                                   "the reply is not a score list.*502 bad gateway"),
    "killed mid-run: error line": (("die", 0, -1, 0), {"retries": 2}, "failed 3 times.*(Disconnected|Cannot connect)"),
}


@pytest.fixture(scope="module")
def fault_server():
    with server(("slow", 0, 0, 0)) as (process, url):  # no fault until a test sets one
        yield process, url


def _set_fault(url: str, mode: str, start: int, count: int, delay_s: float) -> None:
    import urllib.request

    body = json.dumps({"mode": mode, "start": start, "count": count, "delay_s": delay_s}).encode()
    urllib.request.urlopen(urllib.request.Request(url + "/fault", body, {"Content-Type": "application/json"}),
                           timeout=10).read()


@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_ends_in_a_retry_or_one_line_never_a_hang(case, fault_server, caplog):
    fault, options, error = FAULTS[case]
    media, expected = _media(), build_reward("toy")(_media(), PROMPTS)
    with server(fault) if fault[0] == "die" else nullcontext(fault_server) as (process, url):
        if fault[0] != "die":
            _set_fault(url, *fault)
        remote = _remote(url, **options)  # /version is never faulty: the start-up check passes
        start = time.time()
        if error is None:
            with caplog.at_level(logging.WARNING, logger="branchgrpo.rewards._http"):
                assert _same(remote(media, PROMPTS), expected)
            assert caplog.text.count("attempt 2 of") == 1 and "attempt 3 of" not in caplog.text  # one retry
        else:
            with pytest.raises(RewardUnavailable, match=error) as caught:
                remote(media, PROMPTS)
            assert "\n" not in str(caught.value)
            assert str(caught.value).startswith(f"reward 'remote': {url}/score ")
        assert time.time() - start < 15  # bounded: timeouts, retries and backoff, never a hang
        if fault[0] == "die":
            assert process.poll() is not None  # it really died mid-request


@pytest.mark.slow
def test_two_process_training_with_a_served_reward_matches_in_process(tmp_path):
    """2 ranks under torchrun, the reward served by a separate process: the same rewards, per iteration and at
    evaluation, as the same run scoring in process."""
    emb = make_toy_embeddings(tmp_path / "emb")
    common = dict(train_batch_size=2, max_train_steps=2)  # served: overlapped scoring, 2 chunks of 1 prompt
    local = torchrun(fast_args(emb, tmp_path / "local", **common))
    assert local.returncode == 0, local.stderr[-3000:]
    with server() as (_, url):
        options = json.dumps({"remote": {"url": url, "reward": "toy"}})
        served = torchrun(fast_args(emb, tmp_path / "served", reward="remote", reward_options=options, **common))
    assert served.returncode == 0, served.stderr[-3000:]
    for name in ("metrics.jsonl", "eval.jsonl"):
        rows = [_rewards(tmp_path / run / name) for run in ("local", "served")]
        assert rows[0] and rows[0] == rows[1], name
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("local", "served")]
    assert summaries[0]["eval_reward_after"] == summaries[1]["eval_reward_after"]


def _rewards(path: Path) -> list:
    """Every reward figure of a metrics or evaluation log, keyed without the reward's name."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k.replace("remote", "toy"): v for k, v in row.items() if "reward" in k and "time" not in k} for row in rows]


@pytest.mark.slow
def test_a_server_killed_mid_run_stops_training_with_a_checkpoint(tmp_path):
    """The server dies at the 4th /score request (iteration 2, after the step-0 evaluation and 2 iterations): the
    run exits with code 3 and one error line, after writing the checkpoint of step 2, from which it resumes."""
    emb = make_toy_embeddings(tmp_path / "emb")
    out = tmp_path / "run"
    with server(("die", 3, -1, 0)) as (_, url):
        options = json.dumps({"remote": {"url": url, "reward": "toy", "retries": 1, "backoff_s": 0.05}})
        args = fast_args(emb, out, reward="remote", reward_options=options, max_train_steps=4, train_batch_size=1,
                         reward_batch_size=64)
        run = subprocess.run([sys.executable, "-m", "branchgrpo.cli.train", *args], capture_output=True, text=True,
                             timeout=120, env=_env(), cwd=REPO)
    assert run.returncode == 3, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/score failed 2 times" in errors[0] and "checkpoint-2" in errors[0], errors
    assert (out / "checkpoints" / "checkpoint-2").is_dir()

"""The VLM-judge reward against a real OpenAI-compatible HTTP server process on 127.0.0.1
(branchgrpo.testing.judge_server), which scores each image by the mean of its red channel: answers, concurrency,
timeouts and retries, HTTP errors, garbage replies, a server killed mid-run, API keys. Every test is bounded."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from branchgrpo.rewards import available_rewards, build_reward
from branchgrpo.rewards.vlm_judge import TEMPLATES, answer_text, chat_endpoint

pytest.importorskip("aiohttp", reason="the vlm_judge reward needs aiohttp (requirements-rewards.txt)")

from branchgrpo.testing.judge_server import judge_server  # noqa: E402

RED = (51, 153, 204, 230)  # red channel levels of the test images (0.2, 0.6, 0.8, 0.9 of full scale)
pytestmark = pytest.mark.timeout(60)


def _images(levels=RED) -> torch.Tensor:
    """One 16x16 image per level: red = level / 255, green and blue varying (so each image is distinct)."""
    images = torch.rand(len(levels), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = (images * 255).round() / 255
    images[:, 0] = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1) / 255
    return images


def _judge(url, **options):
    return build_reward("vlm_judge", url=url, model="judge-test", **{"backoff_s": 0.05, **options})


def _stats(url) -> dict:
    with urllib.request.urlopen(url.replace("/v1", "/stats"), timeout=5) as response:
        return json.loads(response.read())


def _prompts(n):
    return [f"prompt {i}" for i in range(n)]


def test_templates_parse_scores():
    unified, generic = TEMPLATES["unifiedreward"], TEMPLATES["score10"]
    assert unified.parse("Looks right.\nFinal Score: 4.5") == pytest.approx(0.9)
    assert unified.parse("Final Score:3") == pytest.approx(0.6)
    assert unified.parse("Final Score: 7") is None and unified.parse("Score: 4") is None
    assert generic.parse("Score: 8") == pytest.approx(0.8)
    assert generic.parse("Score: 10.0") == pytest.approx(1.0)
    assert generic.parse("Score: 11") is None and generic.parse("no idea") is None
    assert "{prompt}" in unified.question and "{prompt}" in generic.question
    assert answer_text('{"choices": [{"message": {"content": "hi"}}]}') == "hi"
    assert answer_text("<html>") is None and answer_text('{"choices": []}') is None


def test_options_refused_before_any_request(monkeypatch):
    assert "vlm_judge" in available_rewards()
    assert chat_endpoint("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="option url must be an http"):
        build_reward("vlm_judge", model="m")
    with pytest.raises(ValueError, match="option model"):
        build_reward("vlm_judge", url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="template must be one of"):
        _judge("http://127.0.0.1:9/v1", template="nope")
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        _judge("http://127.0.0.1:9/v1", concurrency=0)
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable JUDGE_TEST_KEY, which is not set"):
        _judge("http://127.0.0.1:9/v1", api_key_env="JUDGE_TEST_KEY")


def test_scores_follow_the_image_with_both_templates():
    expected = torch.tensor(RED, dtype=torch.float32) / 255
    with judge_server("ok") as (_, url):
        unified = _judge(url)(_images(), _prompts(4))
        generic = _judge(url, template="score10")(_images(), _prompts(4))
        assert _stats(url)["requests"] == 8
    assert unified.dtype == torch.float32 and unified.shape == (4,)
    torch.testing.assert_close(unified, (1 + 4 * expected) / 5, atol=1e-4, rtol=0)
    torch.testing.assert_close(generic, expected, atol=1e-4, rtol=0)


def test_concurrency_is_limited():
    with judge_server("hang", delay_s=1.0) as (_, url):
        start = time.monotonic()
        _judge(url, concurrency=2)(_images(), _prompts(4))
        elapsed = time.monotonic() - start
        stats = _stats(url)
    assert stats["max_in_flight"] == 2 and stats["requests"] == 4
    assert elapsed >= 1.9  # two rounds of 1 s


def test_timeout_then_retry_succeeds():
    with judge_server("slow", delay_s=20.0) as (_, url):
        start = time.monotonic()
        scores = _judge(url, timeout_s=2.0, retries=1)(_images(), _prompts(4))
        elapsed = time.monotonic() - start
        assert _stats(url)["requests"] == 8  # every image timed out once, then was answered
    assert elapsed < 15.0  # the slow answers were not waited for
    torch.testing.assert_close(scores, (1 + 4 * torch.tensor(RED) / 255) / 5, atol=1e-4, rtol=0)


def test_server_errors_are_retried():
    with judge_server("flaky") as (_, url):
        scores = _judge(url, retries=1)(_images(), _prompts(4))
        assert _stats(url)["requests"] == 8
    assert (scores > 0.2).all()


def test_persistent_server_errors_give_one_line_naming_the_url():
    with judge_server("error") as (_, url):
        with pytest.raises(RuntimeError) as caught:
            _judge(url, retries=2)(_images()[:1], _prompts(1))
        assert _stats(url)["requests"] == 3  # the first attempt and 2 retries
    message = str(caught.value)
    assert f"{url}/chat/completions failed 3 times" in message and "HTTP 500" in message
    assert "\n" not in message


def test_garbage_answers_are_counted_and_score_zero(caplog):
    with judge_server("garbage") as (_, url):
        judge = _judge(url)
        with caplog.at_level(logging.WARNING, logger="branchgrpo.rewards.vlm_judge"):
            scores = judge(_images(), _prompts(4))
    assert scores[0] == 0.0 and scores[1] == 0.0  # not JSON; JSON without a score
    torch.testing.assert_close(scores[2:], (1 + 4 * torch.tensor(RED[2:]) / 255) / 5, atol=1e-4, rtol=0)  # answered
    assert judge.num_unparseable == 2
    assert "2 of 4 answers" in caplog.text and "hold no score" in caplog.text


def test_nonfinite_image_is_not_sent():
    images = _images()
    images[1, 2, 3, 4] = float("inf")
    with judge_server("ok") as (_, url):
        judge = _judge(url)
        scores = judge(images, _prompts(4))
        assert _stats(url)["requests"] == 3
    assert scores[1] == 0.0 and (scores[[0, 2, 3]] > 0.2).all()
    assert judge.num_invalid == 1


def test_server_killed_mid_run_is_a_clear_error():
    with judge_server("hang", delay_s=30.0) as (process, url):
        judge = _judge(url, timeout_s=20.0, retries=1)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(judge, _images(), _prompts(4))
            deadline = time.monotonic() + 10
            while _stats(url)["requests"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.kill()
            start = time.monotonic()
            with pytest.raises(RuntimeError, match=f"{url}/chat/completions failed 2 times"):
                future.result(timeout=30)
            assert time.monotonic() - start < 5.0  # the dropped connection is noticed, not waited out


def test_api_key_from_environment_is_sent_and_never_shown(monkeypatch, caplog):
    secret = "sk-test-" + "7f3a9c"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    with judge_server("ok", api_key_env="JUDGE_TEST_KEY") as (_, url):
        scores = _judge(url, api_key_env="JUDGE_TEST_KEY")(_images(), _prompts(4))
        assert (scores > 0.2).all()
        monkeypatch.setenv("OTHER_KEY", "wrong-key")
        with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="answered HTTP 401") as caught:
            _judge(url, api_key_env="OTHER_KEY", retries=3)(_images()[:1], _prompts(1))
        assert _stats(url)["requests"] == 5  # a refused key is not retried
    assert secret not in str(caught.value) and "wrong-key" not in str(caught.value)
    assert "Bearer <api key>" in str(caught.value)  # the server echoed the key; the message hides it
    assert secret not in caplog.text and "wrong-key" not in caplog.text


def test_edit_template_shows_the_source_then_the_result():
    """The editing judge sends both images, source first (the test server scores the change in red from the first
    to the last image), reading each sample's source through the reward conditioning."""
    from branchgrpo.rewards.base import RewardSet

    results = _images()
    sources = (results * 255).round().to(torch.uint8)
    sources[:, 0] = 25  # red 0.1 in every source
    with judge_server("ok") as (_, url):
        judge = _judge(url, template="edit10")
        assert judge.conditioning == ("source_image",) and TEMPLATES["edit10"].sees_source
        scores = RewardSet({"vlm_judge": judge}, {"vlm_judge": 1.0}).score(results, _prompts(4),
                                                                            {"source_image": sources})["vlm_judge"]
        unchanged = judge(sources.float() / 255, _prompts(4), {"source_image": sources})
        with pytest.raises(ValueError, match="source_image"):
            judge(results, _prompts(4))
    torch.testing.assert_close(scores, torch.tensor(RED, dtype=torch.float32) / 255 - 25 / 255, atol=1e-4, rtol=0)
    assert unchanged.tolist() == [0.0] * 4
    assert not hasattr(_judge("http://127.0.0.1:9/v1"), "conditioning")  # the text-to-image templates read none

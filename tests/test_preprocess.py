"""FLUX prompt preprocessing: `branchgrpo.cli.preprocess --model flux` on a tiny FLUX checkpoint (CPU, offline).

Checks the written embeddings against FluxPipeline.encode_prompt, the skipped-line counts, resume after a killed run
(finished shards untouched, only missing prompts re-encoded), refusal to mix prompt files, and the torchrun launcher
with two gloo processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
from pathlib import Path

import pytest
import torch

from branchgrpo.cli import preprocess as cli
from branchgrpo.data.embeddings import EmbeddingStore
from branchgrpo.testing.flux_tiny import make_tiny_flux

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ = 16
PROMPTS = [
    "a red cat sitting on a wooden table",
    "an astronaut riding a horse in the desert at sunset",
    "a watercolor painting of a quiet harbor",
    "a tiny robot reading a book in a library",
    "an old map with a golden compass",
    "a castle in the clouds, highly detailed",
    "a bowl of oranges on a blue cloth",
]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux(str(tmp_path_factory.mktemp("flux") / "flux"), seed=0)


@pytest.fixture(scope="module")
def reference(flux_dir):
    """FluxPipeline.encode_prompt of every prompt: the numbers preprocessing must reproduce."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS, max_sequence_length=MAX_SEQ)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _prompt_file(path: Path, extra_bad_lines: bool = True) -> Path:
    lines = [p.encode() for p in PROMPTS]
    if extra_bad_lines:  # two empty lines (one only whitespace) and one that is not UTF-8
        lines[2:2] = [b"", b"   ", b"caf\xe9 au lait \xff"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run_cli(flux_dir, prompts, out, shard_size=3, batch_size=2, exit_code=0):
    """The CLI in this process; input errors are its exit code 2 and one `error:` line on stderr."""
    assert cli.main(["--model", "flux", "--model_path", str(flux_dir), "--prompts", str(prompts), "--output_dir",
                     str(out), "--max_sequence_length", str(MAX_SEQ), "--shard_size", str(shard_size), "--batch_size",
                     str(batch_size), "--device", "cpu"]) == exit_code


def _assert_matches_reference(out_dir, reference):
    store = EmbeddingStore(out_dir / "index.json")
    assert [store.text(i) for i in range(len(store))] == PROMPTS
    batch = store.batch(range(len(store)))
    assert set(batch) == {"prompt_embeds", "pooled_prompt_embeds"}
    for key, value in reference.items():
        torch.testing.assert_close(batch[key], value, atol=1e-6, rtol=1e-5)
    return store


@pytest.fixture
def counted_encoder(monkeypatch):
    """Wrap the FLUX encoder factory so that every text handed to the encoders is recorded."""
    import branchgrpo.models.flux as flux

    seen: list[str] = []
    real = flux.build_prompt_encoder

    def build(model_path, device, args):
        encode = real(model_path, device, args)

        def counting(texts):
            seen.extend(texts)
            return encode(texts)

        return counting

    monkeypatch.setattr(flux, "build_prompt_encoder", build)
    return seen


def test_cli_embeddings_equal_encode_prompt_and_skips_are_counted(flux_dir, reference, tmp_path, counted_encoder):
    out = tmp_path / "emb"
    _run_cli(flux_dir, _prompt_file(tmp_path / "prompts.txt"), out)
    store = _assert_matches_reference(out, reference)
    assert store.skipped == {"empty": 2, "undecodable": 1}
    assert json.loads((out / "index.json").read_text())["skipped"] == {"empty": 2, "undecodable": 1}
    assert store.keys["prompt_embeds"] == ((MAX_SEQ, 32), "F32")
    assert sorted(counted_encoder) == sorted(PROMPTS)


def test_killed_run_resumes_without_reencoding_finished_shards(flux_dir, reference, tmp_path, counted_encoder):
    prompts, out = _prompt_file(tmp_path / "prompts.txt"), tmp_path / "emb"
    _run_cli(flux_dir, prompts, out)  # 7 prompts, shards of 3: [0-2], [3-5], [6]
    shards = sorted((out / "shards").glob("shard-*.safetensors"))
    assert len(shards) == 3
    # Simulate a run killed while writing the middle shard: it and the index never appeared.
    shards[1].unlink()
    (out / "index.json").unlink()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (shards[0], shards[2])}
    counted_encoder.clear()
    _run_cli(flux_dir, prompts, out)
    assert sorted(counted_encoder) == sorted(PROMPTS[3:6])  # only the missing shard's prompts were encoded
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (shards[0], shards[2])}
    assert after == before
    _assert_matches_reference(out, reference)


def test_a_real_kill_mid_run_resumes_without_reencoding_finished_shards(flux_dir, reference, tmp_path,
                                                                         counted_encoder):
    """SIGKILL a preprocessing process while it encodes its second shard; the rerun encodes only what is missing."""
    import signal
    import sys
    import textwrap
    import time

    prompts, out, marker = _prompt_file(tmp_path / "prompts.txt"), tmp_path / "emb", tmp_path / "in_shard_2"
    script = tmp_path / "slow_preprocess.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, time
        import branchgrpo.models.flux as flux
        from branchgrpo.cli import preprocess as cli
        real = flux.build_prompt_encoder
        def build(model_path, device, args):
            encode = real(model_path, device, args)
            def slow(texts):
                if {PROMPTS[3]!r} in texts:  # the second shard: stop here until killed
                    pathlib.Path({str(marker)!r}).write_text("x")
                    time.sleep(600)
                return encode(texts)
            return slow
        flux.build_prompt_encoder = build
        cli.main(["--model", "flux", "--model_path", {str(flux_dir)!r}, "--prompts", {str(prompts)!r},
                  "--output_dir", {str(out)!r}, "--max_sequence_length", "{MAX_SEQ}", "--shard_size", "3",
                  "--batch_size", "2", "--device", "cpu"])
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < 120, "the preprocessing process never reached its second shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    shards = sorted((out / "shards").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors"] and not (out / "index.json").exists()
    before = (shards[0].stat().st_ino, shards[0].stat().st_mtime_ns)
    _run_cli(flux_dir, prompts, out)
    assert sorted(counted_encoder) == sorted(PROMPTS[3:])  # the finished shard was not encoded again
    assert (shards[0].stat().st_ino, shards[0].stat().st_mtime_ns) == before
    _assert_matches_reference(out, reference)


def test_resume_with_other_encoder_settings_is_refused(flux_dir, tmp_path, capsys):
    out = tmp_path / "emb"
    prompts = _prompt_file(tmp_path / "a.txt")
    _run_cli(flux_dir, prompts, out)
    capsys.readouterr()
    assert cli.main(["--model", "flux", "--model_path", str(flux_dir), "--prompts", str(prompts), "--output_dir",
                     str(out), "--max_sequence_length", str(MAX_SEQ + 8), "--shard_size", "3", "--device", "cpu"]) == 2
    assert "encoder settings" in capsys.readouterr().err


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from branchgrpo.data.preprocess import read_prompt_file

    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(PROMPTS[:2]).encode())
    assert read_prompt_file(path) == (PROMPTS[:2], {"empty": 0, "undecodable": 0})


def test_resume_with_another_prompt_file_is_refused(flux_dir, tmp_path, capsys):
    out = tmp_path / "emb"
    _run_cli(flux_dir, _prompt_file(tmp_path / "a.txt"), out)
    other = tmp_path / "b.txt"
    other.write_text("a completely different prompt\n")
    capsys.readouterr()
    _run_cli(flux_dir, other, out, exit_code=2)
    assert "another prompt list" in capsys.readouterr().err


def test_missing_model_folder_is_reported(tmp_path, capsys):
    _run_cli(tmp_path / "no_flux_here", _prompt_file(tmp_path / "p.txt"), tmp_path / "emb", exit_code=2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_flux_here" in err and "Traceback" not in err


def test_launcher_with_two_processes(flux_dir, reference, tmp_path):
    """The bash launcher, torchrun with NPROC=2 on gloo (CPU): both ranks write shards, rank 0 the index."""
    out = tmp_path / "emb"
    env = dict(os.environ, NPROC="2", MODEL_PATH=str(flux_dir), PROMPTS=str(_prompt_file(tmp_path / "p.txt")),
               OUTPUT_DIR=str(out), MASTER_PORT=str(29500 + os.getpid() % 1000), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    script = REPO / "scripts" / "preprocess" / "preprocess_flux_rl_embeddings.sh"
    result = subprocess.run(["bash", str(script), "--shard_size", "2", "--device", "cpu", "--max_sequence_length",
                             str(MAX_SEQ)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 1: shard" in result.stderr  # the second process did encode its share
    store = _assert_matches_reference(out, reference)
    assert len(json.loads((out / "index.json").read_text())["shards"]) == 4
    assert store.skipped == {"empty": 2, "undecodable": 1}


def test_launcher_reports_missing_inputs(tmp_path):
    env = dict(os.environ, MODEL_PATH=str(tmp_path / "nothing"), PROMPTS=str(tmp_path / "none.txt"))
    script = REPO / "scripts" / "preprocess" / "preprocess_flux_rl_embeddings.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "none.txt not found" in result.stderr and "nothing not found" in result.stderr

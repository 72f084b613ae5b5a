"""`bash scripts/bench/gpu_check.sh --tiny`: the GPU check's code on the tiny FLUX in bf16 on CPU (rollout, update with
activation checkpointing, first-ratio deviation, planner prediction), writing gpu_check.json and gpu_check.md. The
eager-vs---compile section is skipped here (compiling takes minutes on CPU); tests/test_compile.py covers --compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trainer_utils import REPO

from branchgrpo.bench import gpu_check


def test_gpu_check_tiny_writes_its_report(tmp_path):
    """In-process (the launcher with --tiny only adds `exec python -m branchgrpo.bench.gpu_check`)."""
    assert gpu_check.main(["--tiny", "--steps", "11", "--micro_batch", "32", "--skip_compile",
                           "--output_dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["tiny"] and r["rollout"]["leaves"] == 16 and r["update"]["activation_checkpointing"]
    # tree with splits 0,3,6,9 over 11 steps: 1+2+2+2+4+4+4+8+8+8+16 nodes evaluated below the leaves' last step
    assert r["rollout"]["forward_passes"] == 59 and r["update"]["edges"] == 58
    assert r["rollout"]["forward_passes_per_s"] > 0 and r["update"]["seconds"] > 0
    assert 0 <= r["bf16_first_ratio_deviation"] < 0.1
    assert r["bf16_first_ratio_deviation_recompute_old_log_prob"] <= r["bf16_first_ratio_deviation"] + 1e-6
    assert r["memory"]["predicted_total_gb"] > r["memory"]["predicted_without_margin_gb"] > 0
    assert "skipped" in r["compile"]
    for phase in ("rollout", "update"):  # the bound on --compile's speed-up: GEMM + attention are part of the wall
        share = r["gemm_attention"][phase]
        assert 0 < share["share"] < 1 and share["bound"] == 1 / share["share"], share
    assert "first-ratio deviation" in (tmp_path / "gpu_check.md").read_text()


def test_bad_gpu_check_flag_is_one_line(capsys):
    assert gpu_check.main(["--tiny", "--h", "-3"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --h: -3 is not a positive multiple of 16 (FLUX latents are "
                                               "2x2-packed 8x-downsampled images)")


def test_launcher_refuses_bad_nproc(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path), NPROC="x")
    proc = subprocess.run(["bash", str(REPO / "scripts/bench/gpu_check.sh"), "--tiny"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr

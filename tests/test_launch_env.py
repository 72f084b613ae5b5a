"""Issue 21, the launchers' side: their environment variables are parsed strictly - a boolean is 1/true/yes/on or
0/false/no/off (anything else is refused in one line naming it; `true` is never read as false), a number must be
one, the torchrun variables must make sense - and a CONFIG that does not exist is named as such. The launchers run
with PYTHON pointing at a shim that prints the command it was asked to run instead of running it."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from trainer_utils import REPO


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A shim `python`, the files the FLUX launchers check for, and the environment pointing at them."""
    root = tmp_path_factory.mktemp("launch_env")
    shim = root / "python"
    shim.write_text(f'#!/bin/bash\nif [[ "$1" == "-c" ]]; then exec {sys.executable} "$@"; fi\n'
                    'printf "LAUNCHED"; printf " %q" "$@"; echo\n')
    shim.chmod(0o755)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (root / "flux" / part).mkdir(parents=True)
    (root / "data.json").write_text("{}")
    (root / "hps").mkdir()
    (root / "hps" / "HPS_v2.1_compressed.pt").write_bytes(b"")
    (root / "p.txt").write_text("a cat\n")
    base = {k: v for k, v in os.environ.items() if k not in ("USE_LORA", "USE_EMA", "NNODES", "NODE_RANK", "H")}
    return dict(base, PYTHON=str(shim), NPROC="1", SKIP_SETUP="1", MODEL_PATH=str(root / "flux"),
                DATA_JSON=str(root / "data.json"), HPS_CKPT_DIR=str(root / "hps"), PROMPTS=str(root / "p.txt"),
                OUTPUT_DIR=str(root / "out"))


def launch(env: dict, script: str, **variables) -> tuple[int, list[str], str]:
    """(exit code, the arguments the launcher ran python with, stderr)."""
    proc = subprocess.run(["bash", script], cwd=REPO, env=dict(env, **variables), capture_output=True, text=True,
                          timeout=120)
    launched = [line for line in proc.stdout.splitlines() if line.startswith("LAUNCHED")]
    return proc.returncode, shlex.split(launched[-1])[1:] if launched else [], proc.stderr


def refused(env: dict, script: str, **variables) -> str:
    rc, argv, err = launch(env, script, **variables)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and not argv and len(lines) == 1 and lines[0].startswith("error: "), (rc, argv, err)
    return lines[0]


FLUX = "scripts/finetune/finetune_flux_branchgrpo_8gpus.sh"
EVAL = "scripts/eval/eval_flux.sh"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False),
                                      ("false", False), ("NO", False), ("off", False), ("", False)])
def test_boolean_variables_accept_every_usual_spelling(env, value, on):
    assert ("--use_lora" in launch(env, FLUX, USE_LORA=value)[1]) is on
    assert ("--use_ema" in launch(env, EVAL, USE_EMA=value, CHECKPOINT=env["MODEL_PATH"])[1]) is on


@pytest.mark.parametrize("script,variable", [(FLUX, "USE_LORA"), (EVAL, "USE_EMA"),
                                             ("scripts/finetune/finetune_toy_branchgrpo.sh", "SKIP_SETUP"),
                                             ("scripts/bench/compare_methods.sh", "SKIP_SETUP")])
def test_a_boolean_that_is_neither_is_refused_naming_the_variable(env, script, variable):
    line = refused(env, script, **{variable: "maybe"})
    assert line == f"error: {variable} must be a boolean (1, true, yes, on or 0, false, no, off), got 'maybe'"


@pytest.mark.parametrize("variables,named", [
    ({"NNODES": "abc"}, "error: NNODES must be a positive integer, got 'abc'"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "error: NODE_RANK must be below NNODES (2), got '2'"),
    ({"MASTER_PORT": "http"}, "error: MASTER_PORT must be a port number (1-65535), got 'http'"),
    ({"H": "abc"}, "error: H must be an integer (>= 0), got 'abc'"),
    ({"LR": "fast"}, "error: LR must be a number, got 'fast'"),
])
def test_numeric_variables_are_checked_before_anything_runs(env, variables, named):
    assert refused(env, FLUX, **variables) == named


def test_a_missing_config_is_named_as_config_not_as_algo(env, tmp_path):
    toy = "scripts/finetune/finetune_toy_branchgrpo.sh"
    line = refused(env, toy, CONFIG=str(tmp_path / "mine.yaml"))
    assert line.startswith("error: CONFIG:") and "mine.yaml" in line and "ALGO" not in line, line
    assert refused(env, toy, ALGO="ppo").startswith("error: ALGO: no toy config for ALGO=ppo")


def test_every_script_parses_and_what_it_runs_or_sources_exists():
    """A launcher that is a thin wrapper (`source scripts/lib/X.sh`, `exec bash scripts/.../Y.sh`) breaks silently
    when its target is renamed: every script under scripts/ must parse, and every script path it names must exist."""
    named = re.compile(r"(?:source|exec bash|bash)\s+\"?(?:\$REPO_ROOT/)?(scripts/[\w/.-]+\.sh)")
    scripts = sorted((REPO / "scripts").rglob("*.sh"))
    assert len(scripts) > 40
    missing = []
    for script in scripts:
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{script}: {parsed.stderr}"
        missing += [f"{script} -> {target}" for target in named.findall(script.read_text())
                    if not (REPO / target).is_file()]
    assert not missing, missing

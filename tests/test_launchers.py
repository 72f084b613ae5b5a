"""Every FLUX and Wan launcher, as users run it, hands the trainer a configuration that the real flag parser and
validator accept and that has the paper's settings: the launcher runs with PYTHON pointing at a shim that, instead
of training, parses the trainer arguments with `parse_train_config` and counts them with `branchgrpo.plan`.
(The FLUX and Wan end-to-end tests train through the BranchGRPO launchers; this covers all of them in seconds.)"""

import json
import os
import subprocess
import sys

import pytest

from trainer_utils import REPO

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A `python` that replaces `-m branchgrpo.cli.train ARGS` by: validate ARGS, print config + plan counts."""
    root = tmp_path_factory.mktemp("launchers")
    script = root / "python"
    check = ("import json, sys; from branchgrpo.config import parse_train_config; "
             "from branchgrpo.planner.counts import count; cfg = parse_train_config(sys.argv[1:]); "
             "print('CONFIG ' + json.dumps({'cfg': cfg.flags, 'plan': count(cfg, 0)}))")
    script.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == "-m" && "$2" == "branchgrpo.cli.train" ]]; then\n'
                      f'  shift 2; exec {sys.executable} -c "{check}" "$@"\nfi\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    for backbone in ("flux", "wan", "wan_i2v"):  # the launchers only check that the inputs exist
        for part in ("transformer", "vae"):
            (root / backbone / part).mkdir(parents=True)
        (root / f"{backbone}.json").write_text("{}")
    (root / "hps").mkdir()
    (root / "hps" / "HPS_v2.1_compressed.pt").write_bytes(b"")
    (root / "hps" / "VideoReward").mkdir()
    return root


def launch(shim, script: str, *args: str, **env) -> dict:
    backbone = "wan_i2v" if "wan_i2v" in script else "wan" if "wan" in script else "flux"
    full_env = dict(os.environ, PYTHON=str(shim / "python"), NPROC="1", MODEL_PATH=str(shim / backbone),
                    DATA_JSON=str(shim / f"{backbone}.json"), HPS_CKPT_DIR=str(shim / "hps"),
                    OUTPUT_DIR=str(shim / "out"), **env)
    proc = subprocess.run(["bash", f"scripts/finetune/{script}", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("CONFIG ")][-1]
    return json.loads(line[len("CONFIG "):])


PAPER = dict(sampling_steps=20, shift=3.0, h=720, w=720, learning_rate=1e-5, clip_range=1e-3, adv_clip_max=5.0,
             reward="hps=1.0", parallel="fsdp", gradient_checkpointing=True, mixed_precision="bf16")


@pytest.mark.parametrize("variant,trained_per_leaf", [("base", 202 / 16), ("widpru", 122 / 16),
                                                      ("deppru", 138 / 16), ("mix", 34 / 16)])
def test_flux_branchgrpo_launcher_and_variants(shim, variant, trained_per_leaf):
    out = launch(shim, "finetune_flux_branchgrpo_8gpus.sh", VARIANT=variant)
    cfg, plan = out["cfg"], out["plan"]
    assert {k: cfg[k] for k in PAPER} == PAPER
    assert (cfg["algo"], cfg["tree_split_points"], cfg["branch_factor"], cfg["eta"]) == ("branchgrpo", "0,3,6,9", 2, 0.3)
    assert (plan["leaves"], plan["forward_passes"]) == (16, 203)
    assert plan["trained_edges_per_leaf"] == pytest.approx(trained_per_leaf)
    if variant == "deppru":
        assert (cfg["depth_pruning"], cfg["depth_pruning_slide_interval"], cfg["depth_pruning_stop_depth"]) == \
            ("15,16,17,18", 30, 9)


def test_flux_baseline_launchers(shim):
    dance = launch(shim, "finetune_flux_dancegrpo_8gpus.sh", TF="0.6")
    assert (dance["cfg"]["algo"], dance["cfg"]["timestep_fraction"]) == ("dancegrpo", 0.6)
    assert dance["plan"]["trained_edges_per_leaf"] == 11  # floor(0.6 x 19) of the 19 stochastic steps
    assert launch(shim, "finetune_flux_dancegrpo_8gpus.sh")["plan"]["trained_edges_per_leaf"] == 19
    mix = launch(shim, "finetune_flux_mixgrpo_8gpus.sh")
    assert (mix["cfg"]["algo"], mix["plan"]["trained_edges_per_leaf"], mix["plan"]["forward_passes_per_leaf"]) == \
        ("mixgrpo", 5, 20)  # MixGRPO (20, 5)
    g2 = launch(shim, "finetune_flux_g2rpo_8gpus.sh")
    assert (g2["cfg"]["algo"], g2["cfg"]["sampling_steps"], g2["plan"]["leaves"]) == ("g2rpo", 16, 12 * 8 * 3 + 1)


def test_wan_launchers(shim):
    branch = launch(shim, "finetune_wan_branchgrpo_8gpus.sh")
    cfg = branch["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_frames"], cfg["guidance_scale"], cfg["reward"]) == \
        ("wan", "branchgrpo", 33, 5.0, "videoalign=1.0")
    assert branch["plan"]["forward_passes"] == 203
    dance = launch(shim, "finetune_wan_dancegrpo_8gpus.sh", TF="0.6")
    assert (dance["cfg"]["algo"], dance["cfg"]["num_generations"], dance["plan"]["trained_edges_per_leaf"]) == \
        ("dancegrpo", 16, 11)


def test_wan_i2v_launchers(shim):
    branch = launch(shim, "finetune_wan_i2v_branchgrpo_8gpus.sh", VARIANT="deppru")
    cfg = branch["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_frames"], cfg["h"], cfg["w"], cfg["guidance_scale"], cfg["shift"],
            cfg["reward"]) == ("wan_i2v", "branchgrpo", 33, 480, 832, 5.0, 3.0, "videoalign=1.0")
    assert cfg["output_dir"] == str(shim / "out") and cfg["depth_pruning"] == "15,16,17,18"
    assert (branch["plan"]["leaves"], branch["plan"]["forward_passes"]) == (16, 203)
    dance = launch(shim, "finetune_wan_i2v_dancegrpo_8gpus.sh", "--learning_rate", "2e-6", TF="0.6", USE_LORA="1")
    cfg = dance["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_generations"], cfg["learning_rate"], cfg["use_lora"]) == \
        ("wan_i2v", "dancegrpo", 16, 2e-6, True)
    assert dance["plan"]["trained_edges_per_leaf"] == 11


@pytest.mark.parametrize("script,model,guidance,shift,algo", [
    ("finetune_wan22_branchgrpo_8gpus.sh", "wan22", (4.0, 3.0), 12.0, "branchgrpo"),
    ("finetune_wan22_g2rpo_8gpus.sh", "wan22", (4.0, 3.0), 12.0, "g2rpo"),
    ("finetune_wan22_i2v_dancegrpo_8gpus.sh", "wan22_i2v", (3.5, 3.5), 5.0, "dancegrpo")])
def test_wan22_launchers(shim, script, model, guidance, shift, algo):
    """The A14B recipes: each expert's guidance, the shift, LoRA on by default (a full fine-tune of both experts
    does not fit 8 x 80 GB), both experts trained unless TRAIN_EXPERTS says otherwise. (The mixgrpo and the other
    wan22_i2v launcher share the same scripts/lib/wan22.sh.)"""
    cfg = launch(shim, script)["cfg"]
    assert (cfg["model"], cfg["algo"], (cfg["guidance_scale"], cfg["guidance_scale_2"]), cfg["shift"]) == \
        (model, algo, guidance, shift)
    assert cfg["use_lora"] and cfg["train_experts"] == "both" and cfg["parallel"] == "fsdp"
    if algo == "g2rpo":  # its SDE steps are all the high-noise expert's: train that one alone
        one = launch(shim, script, "--guidance_scale_2", "2.5", TRAIN_EXPERTS="high", USE_LORA="0")["cfg"]
        assert (one["train_experts"], one["use_lora"], one["guidance_scale_2"]) == ("high", False, 2.5)


def test_extra_flags_win_over_the_launcher_defaults(shim):
    assert launch(shim, "finetune_flux_branchgrpo_8gpus.sh")["cfg"]["learning_rate"] == 1e-5
    cfg = launch(shim, "finetune_flux_branchgrpo_8gpus.sh", "--learning_rate", "3e-6", "--tree_split_points",
                 "0,4,8")["cfg"]
    assert (cfg["learning_rate"], cfg["tree_split_points"]) == (3e-6, "0,4,8")

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


def test_flux_diffusion_nft_launcher(shim):
    ode = launch(shim, "finetune_flux_diffusion_nft_8gpus.sh")
    cfg, plan = ode["cfg"], ode["plan"]
    assert (cfg["algo"], cfg["nft_sampler"], cfg["use_lora"], cfg["lora_rank"], cfg["lora_alpha"],
            cfg["learning_rate"], cfg["max_grad_norm"], cfg["nft_beta"], cfg["kl_coef"], cfg["adv_clip_max"],
            cfg["nft_std"], cfg["nft_decay"]) == ("diffusion_nft", "ode", True, 32, 64.0, 3e-4, 1.0, 1.0, 1e-4, 5.0,
                                                   "global", "linear")
    assert (plan["leaves"], plan["forward_passes_per_leaf"], plan["trained_edges_per_leaf"]) == (16, 20, 20)
    tree = launch(shim, "finetune_flux_diffusion_nft_8gpus.sh", BETA="0.1", DECAY="delayed", SAMPLER="tree")
    assert (tree["cfg"]["nft_beta"], tree["cfg"]["nft_decay"], tree["plan"]["leaves"],
            tree["plan"]["forward_passes"]) == (0.1, "delayed", 16, 203)


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


def test_extra_flags_win_over_the_launcher_defaults(shim):
    assert launch(shim, "finetune_flux_branchgrpo_8gpus.sh")["cfg"]["learning_rate"] == 1e-5
    cfg = launch(shim, "finetune_flux_branchgrpo_8gpus.sh", "--learning_rate", "3e-6", "--tree_split_points",
                 "0,4,8")["cfg"]
    assert (cfg["learning_rate"], cfg["tree_split_points"]) == (3e-6, "0,4,8")

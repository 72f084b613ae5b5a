"""Every FLUX and Wan launcher, as users run it, hands the trainer a configuration that the real flag parser and
validator accept and that has the paper's settings: the launcher runs with PYTHON pointing at a shim that, instead
of training, records the trainer arguments, which the test then parses with `parse_train_config` and counts with
`branchgrpo.plan` (in the test's process: a launch costs the shell, not a torch import).
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
    """A `python` that replaces `-m branchgrpo.cli.train ARGS` by writing ARGS (NUL-separated) to $BG_SHIM_ARGS."""
    root = tmp_path_factory.mktemp("launchers")
    script = root / "python"
    script.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == "-m" && "$2" == "branchgrpo.cli.train" ]]; then\n'
                      f'  shift 2; printf "%s\\0" "$@" > "$BG_SHIM_ARGS"; exit 0\nfi\nexec {sys.executable} "$@"\n')
    script.chmod(0o755)
    # the launchers only check that the inputs exist
    for backbone in ("flux", "flux_kontext", "wan", "wan_i2v", "sd3", "qwen_image", "qwen_image_edit"):
        for part in ("transformer", "vae"):
            (root / backbone / part).mkdir(parents=True)
        (root / f"{backbone}.json").write_text("{}")
    (root / "hps").mkdir()
    (root / "hps" / "HPS_v2.1_compressed.pt").write_bytes(b"")
    (root / "hps" / "VideoReward").mkdir()
    return root


def launch(shim, script: str, *args: str, **env) -> dict:
    """{"cfg": the flags the launcher hands the trainer, as the trainer's parser and validator take them; "plan": their
    counts}."""
    from branchgrpo.config import parse_train_config
    from branchgrpo.planner.counts import count

    name = next(b for b in ("wan_i2v", "wan", "sd3", "qwen_image_edit", "qwen_image", "kontext", "flux") if b in script)
    backbone = {"kontext": "flux_kontext"}.get(name, name)
    recorded = shim / "args"
    recorded.unlink(missing_ok=True)
    full_env = dict(os.environ, PYTHON=str(shim / "python"), NPROC="1", MODEL_PATH=str(shim / backbone),
                    DATA_JSON=str(shim / f"{backbone}.json"), HPS_CKPT_DIR=str(shim / "hps"),
                    OUTPUT_DIR=str(shim / "out"), BG_SHIM_ARGS=str(recorded), **env)
    proc = subprocess.run(["bash", f"scripts/finetune/{script}", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and recorded.is_file(), proc.stderr[-3000:]
    cfg = parse_train_config(recorded.read_text().split("\0")[:-1])
    return json.loads(json.dumps({"cfg": cfg.flags, "plan": count(cfg, 0)}))


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
            cfg["global_std"], cfg["nft_decay"]) == ("diffusion_nft", "ode", True, 32, 64.0, 3e-4, 1.0, 1.0, 1e-4, 5.0,
                                                   True, "linear")
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


def test_sd3_launchers(shim):
    """The peers' SD3.5 settings (512 x 512, CFG 4.5, 10 steps, LoRA 32/64 at lr 3e-4) in every algorithm's launcher."""
    recipe = dict(model="sd3", h=512, w=512, guidance_scale=4.5, shift=3.0, sampling_steps=10, use_lora=True,
                  lora_rank=32, lora_alpha=64.0, learning_rate=3e-4, parallel="fsdp")
    branch = launch(shim, "finetune_sd3_branchgrpo_8gpus.sh", VARIANT="deppru")  # the paper's depths, on 10 steps
    assert {k: branch["cfg"][k] for k in recipe} == recipe and branch["cfg"]["algo"] == "branchgrpo"
    assert (branch["plan"]["leaves"], branch["cfg"]["depth_pruning"]) == (16, "7,8")
    full = launch(shim, "finetune_sd3_branchgrpo_8gpus.sh", USE_LORA="0")["cfg"]
    assert (full["use_lora"], full["learning_rate"]) == (False, 1e-5)
    dance = launch(shim, "finetune_sd3_dancegrpo_8gpus.sh", TF="0.6")
    assert (dance["cfg"]["algo"], dance["cfg"]["num_generations"], dance["plan"]["trained_edges_per_leaf"]) == \
        ("dancegrpo", 16, 5)  # floor(0.6 x 9) of the 9 stochastic steps
    assert launch(shim, "finetune_sd3_mixgrpo_8gpus.sh")["plan"]["trained_edges_per_leaf"] == 3
    g2 = launch(shim, "finetune_sd3_g2rpo_8gpus.sh")
    assert (g2["cfg"]["algo"], g2["cfg"]["model"], g2["plan"]["leaves"]) == ("g2rpo", "sd3", 5 * 12 * 3 + 1)


def test_qwen_image_launchers(shim):
    branch = launch(shim, "finetune_qwen_image_branchgrpo_8gpus.sh")
    cfg = branch["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["h"], cfg["w"], cfg["guidance_scale"], cfg["time_shift"], cfg["use_lora"],
            cfg["lora_rank"], cfg["learning_rate"], cfg["gradient_accumulation_steps"]) == \
        ("qwen_image", "branchgrpo", 512, 512, 4.0, "dynamic", True, 64, 3e-4, 3)
    assert (branch["plan"]["leaves"], branch["plan"]["forward_passes"]) == (16, 203)
    full = launch(shim, "finetune_qwen_image_branchgrpo_8gpus.sh", USE_LORA="0", GUIDANCE="1")["cfg"]
    assert (full["use_lora"], full["learning_rate"], full["gradient_accumulation_steps"], full["guidance_scale"]) == \
        (False, 1e-5, 1, 1.0)
    # the dancegrpo / mixgrpo / g2rpo launchers are the FLUX ones' algorithm flags on the same scripts/lib body
    g2 = launch(shim, "finetune_qwen_image_g2rpo_8gpus.sh")["cfg"]
    assert (g2["model"], g2["algo"], g2["sampling_steps"], g2["clip_range"]) == ("qwen_image", "g2rpo", 16, 1e-4)


def test_kontext_launchers(shim):
    branch = launch(shim, "finetune_kontext_branchgrpo_8gpus.sh", USE_LORA="1")
    cfg = branch["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["h"], cfg["w"], cfg["source_size"], cfg["guidance_scale"],
            cfg["time_shift"], cfg["reward"], cfg["use_lora"]) == \
        ("flux_kontext", "branchgrpo", 512, 512, "generation", 2.5, "dynamic",
         "clip_directional=1.0,source_consistency=0.5", True)
    assert (branch["plan"]["leaves"], cfg["tree_split_points"]) == (16, "0,3,6,9")
    dance = launch(shim, "finetune_kontext_dancegrpo_8gpus.sh", "--h", "1024", "--w", "1024", SOURCE_SIZE="preferred",
                   GUIDANCE="3")
    cfg = dance["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_generations"], cfg["h"], cfg["source_size"], cfg["guidance_scale"]) == \
        ("flux_kontext", "dancegrpo", 12, 1024, "preferred", 3.0)


@pytest.mark.parametrize("script,model,algo", [
    ("finetune_kontext_flow_grpo_8gpus.sh", "flux_kontext", "flow_grpo"),
    ("finetune_qwen_image_edit_g2rpo_8gpus.sh", "qwen_image_edit", "g2rpo")])
def test_the_other_edit_launchers(shim, script, model, algo):
    """Every algorithm launcher of the edit models is its text-to-image launcher with the edit settings (two of
    them here, one per edit model: they are the same two lines; test_launch_env.py checks every script's targets)."""
    cfg = launch(shim, script)["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["h"], cfg["source_size"], cfg["time_shift"], cfg["reward"]) == \
        (model, algo, 512, "generation", "dynamic", "clip_directional=1.0,source_consistency=0.5")


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


def test_qwen_image_edit_launchers(shim):
    branch = launch(shim, "finetune_qwen_image_edit_branchgrpo_8gpus.sh")
    cfg = branch["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["h"], cfg["w"], cfg["source_size"], cfg["guidance_scale"],
            cfg["time_shift"], cfg["reward"], cfg["use_lora"], cfg["data_json_path"]) == \
        ("qwen_image_edit", "branchgrpo", 512, 512, "generation", 4.0, "dynamic",
         "clip_directional=1.0,source_consistency=0.5", True, str(shim / "qwen_image_edit.json"))
    assert (branch["plan"]["leaves"], cfg["tree_split_points"]) == (16, "0,3,6,9")
    dance = launch(shim, "finetune_qwen_image_edit_dancegrpo_8gpus.sh", SOURCE_SIZE="preferred", USE_LORA="0",
                   EDIT_MODEL="qwen_image_edit_plus")
    cfg = dance["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_generations"], cfg["source_size"], cfg["use_lora"]) == \
        ("qwen_image_edit_plus", "dancegrpo", 12, "preferred", False)


def test_extra_flags_win_over_the_launcher_defaults(shim):
    assert launch(shim, "finetune_flux_branchgrpo_8gpus.sh")["cfg"]["learning_rate"] == 1e-5
    cfg = launch(shim, "finetune_flux_branchgrpo_8gpus.sh", "--learning_rate", "3e-6", "--tree_split_points",
                 "0,4,8")["cfg"]
    assert (cfg["learning_rate"], cfg["tree_split_points"]) == (3e-6, "0,4,8")


def test_flux_flow_grpo_launchers(shim):
    flow = launch(shim, "finetune_flux_flow_grpo_8gpus.sh")
    cfg = flow["cfg"]
    assert (cfg["algo"], cfg["sampling_steps"], cfg["time_shift"], cfg["num_generations"], cfg["sde_kernel"],
            cfg["eta"], cfg["h"], cfg["guidance_scale"], cfg["global_std"]) == \
        ("flow_grpo", 6, "dynamic", 24, "flow", 0.9, 512, 3.5, True)
    assert (cfg["use_lora"], cfg["learning_rate"], cfg["clip_range"], cfg["kl_coef"], cfg["max_grad_norm"]) == \
        (True, 3e-4, 1e-4, 0.0, 1.0)
    assert (flow["plan"]["leaves"], flow["plan"]["trained_edges_per_leaf"]) == (24, 5)  # every non-final step
    fast = launch(shim, "finetune_flux_flow_grpo_fast_8gpus.sh", USE_LORA="0")
    cfg = fast["cfg"]
    assert (cfg["algo"], cfg["sde_kernel"], cfg["eta"], cfg["sde_window_size"], cfg["global_std"], cfg["use_lora"]) \
        == ("flow_grpo_fast", "cps", 0.8, 3, False, False)
    assert (fast["plan"]["leaves"], fast["plan"]["trained_edges_per_leaf"]) == (24, 3)  # the window alone


def test_sd3_launchers_of_the_methods_the_field_compares_against(shim):
    """Flow-GRPO (CFG 4.5, flow kernel 0.7, KL 0.04), Flow-GRPO-Fast (no CFG, CPS 0.8, window 3 in [0, 5)) and
    DiffusionNFT (no CFG) on SD3.5 with the reference recipes' settings."""
    flow = launch(shim, "finetune_sd3_flow_grpo_8gpus.sh")
    cfg = flow["cfg"]
    assert (cfg["model"], cfg["algo"], cfg["num_generations"], cfg["sde_kernel"], cfg["eta"], cfg["global_std"],
            cfg["kl_coef"], cfg["guidance_scale"], cfg["sampling_steps"]) == \
        ("sd3", "flow_grpo", 24, "flow", 0.7, True, 0.04, 4.5, 10)
    assert flow["plan"]["trained_edges_per_leaf"] == 9  # floor(1.0 x 9) of the 9 stochastic steps
    fast = launch(shim, "finetune_sd3_flow_grpo_fast_8gpus.sh")
    cfg = fast["cfg"]
    assert (cfg["algo"], cfg["sde_kernel"], cfg["eta"], cfg["sde_window_size"], cfg["sde_window_range"],
            cfg["global_std"], cfg["guidance_scale"]) == ("flow_grpo_fast", "cps", 0.8, 3, "0,5", False, 1.0)
    assert fast["plan"]["trained_edges_per_leaf"] == 3
    nft = launch(shim, "finetune_sd3_diffusion_nft_8gpus.sh", SAMPLER="tree")["cfg"]
    assert (nft["algo"], nft["nft_sampler"], nft["nft_split_points"], nft["guidance_scale"], nft["global_std"]) == \
        ("diffusion_nft", "tree", "0,2,4,6", 1.0, True)

"""Bad algorithm flags are refused up front with a message naming the flag, the value and what is allowed."""

import subprocess
import sys

import pytest

from branchgrpo.config import AlgoConfig, parse_config, validate_algo


def bad(message, **flags):
    with pytest.raises(ValueError, match=message):
        validate_algo(AlgoConfig(**flags))


def test_split_points_must_be_integers():
    bad(r"--tree_split_points: '3.5' is not an integer", tree_split_points="0,3.5")


def test_split_points_must_not_be_negative():
    bad(r"--tree_split_points: -1 is outside 0..18", tree_split_points="-1,3")


def test_split_points_must_not_repeat():
    bad(r"--tree_split_points: duplicate", tree_split_points="0,3,3")


def test_split_points_must_precede_the_last_step():
    bad(r"--tree_split_points: 19 is outside 0..18", tree_split_points="0,19")
    bad(r"--tree_split_points: 9 is outside 0..8", sampling_steps=10, tree_split_points="0,9")
    validate_algo(AlgoConfig(sampling_steps=10, tree_split_points="0,8"))


def test_branch_factor_at_least_two():
    bad(r"--branch_factor: need >= 2, got 1", branch_factor=1)


@pytest.mark.parametrize("r", [0.0, -0.2, 1.5])
def test_branch_innovation_in_unit_interval(r):
    bad(r"--branch_innovation: need r in \(0, 1\]", branch_innovation=r)


@pytest.mark.parametrize("lam", [0.0, -4.0])
def test_split_noise_scale_positive(lam):
    bad(r"--tree_split_noise_scale: need > 0", tree_split_noise_scale=lam)


def test_eta_not_negative():
    bad(r"--eta: need a number >= 0, got -0.3", eta=-0.3)


def test_pruning_windows_inside_the_steps():
    bad(r"--depth_pruning: depth 25 is outside 1..19", depth_pruning="15,25")
    bad(r"--depth_pruning: depth 0 is outside", depth_pruning="0")
    bad(r"--depth_pruning_stop_depth: 30 is outside", depth_pruning="15", depth_pruning_slide=True,
        depth_pruning_stop_depth=30)
    bad(r"--mix_window_max_start 17 \+ --mix_sde_window_size 4 runs past step 18", mix_ode_sde_tree=True,
        mix_window_max_start=17)
    bad(r"--mix_sde_window_size: need 1..19", algo="mixgrpo", mix_sde_window_size=25)


@pytest.mark.parametrize("ratio", [0.0, 1.2])
def test_width_ratio_in_unit_interval(ratio):
    bad(r"--width_pruning_ratio: need a value in \(0, 1\]", width_pruning_mode=2, width_pruning_ratio=ratio)


@pytest.mark.parametrize("algo", ["dancegrpo", "mixgrpo", "g2rpo"])
def test_group_methods_need_two_generations(algo):
    bad(r"--num_generations: group methods need >= 2, got 1", algo=algo, num_generations=1)


def test_leaf_bound_needs_an_explicit_override():
    points = ",".join(str(i) for i in range(13))  # 2^13 = 8192 leaves
    bad(r"8192 leaves per prompt exceed --max_leaves 4096", tree_split_points=points)
    validate_algo(AlgoConfig(tree_split_points=points, max_leaves=10000))
    bad(r"exceed --max_leaves", algo="g2rpo", num_generations=200, g2rpo_granularities="1,2,3")


def test_other_algorithm_flags():
    bad(r"--timestep_fraction: need a value in \(0, 1\]", algo="dancegrpo", timestep_fraction=1.5)
    bad(r"--g2rpo_steps: 19 is outside 0..18", algo="g2rpo", g2rpo_steps="0,19")
    bad(r"--g2rpo_granularities: strides must be >= 1", algo="g2rpo", g2rpo_granularities="0,1")
    bad(r"--tree_prob_weighted means --fusion_alpha 1", tree_prob_weighted=True, fusion_alpha=0.5)
    bad(r"--algo: 'ppo'", algo="ppo")


def test_yaml_and_cli_layers(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("algo: dancegrpo\nnum_generations: 8\ntimestep_fraction: 0.6\n")
    cfg, _ = parse_config(AlgoConfig, ["--config", str(cfg_file), "--num_generations", "6"])
    assert (cfg.algo, cfg.num_generations, cfg.timestep_fraction) == ("dancegrpo", 6, 0.6)
    (tmp_path / "bad.yaml").write_text("algo: dancegrpo\nnum_generation: 8\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_generation'\]"):
        parse_config(AlgoConfig, ["--config", str(tmp_path / "bad.yaml")])


def test_plan_cli_reports_bad_flags_clearly():
    out = subprocess.run([sys.executable, "-m", "branchgrpo.plan", "--tree_split_points", "0,3,x"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "error: --tree_split_points: 'x' is not an integer" in out.stderr
    assert "Traceback" not in out.stderr

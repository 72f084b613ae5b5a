"""Bad algorithm flags are refused up front with a message naming the flag, the value and what is allowed."""

import subprocess
import sys

import pytest

from branchgrpo.config import algorithm_from_flags, config_from_flags, parse_flags, parse_train_config
from branchgrpo.models import backbones


def bad(message, **flags):
    with pytest.raises(ValueError, match=message):
        algorithm_from_flags(**flags)


def test_split_points_must_be_integers():
    bad(r"--tree_split_points: '3.5' is not an integer", tree_split_points="0,3.5")


def test_split_points_must_not_be_negative():
    bad(r"--tree_split_points: -1 is outside 0..18", tree_split_points="-1,3")


def test_split_points_must_not_repeat():
    bad(r"--tree_split_points: duplicate", tree_split_points="0,3,3")


def test_split_points_must_precede_the_last_step():
    bad(r"--tree_split_points: 19 is outside 0..18", tree_split_points="0,19")
    bad(r"--tree_split_points: 9 is outside 0..8", sampling_steps=10, tree_split_points="0,9")
    algorithm_from_flags(sampling_steps=10, tree_split_points="0,8")


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
    algorithm_from_flags(tree_split_points=points, max_leaves=10000)
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
    cfg = config_from_flags(parse_flags(["--config", str(cfg_file), "--num_generations", "6"])[0], "algorithm")
    assert (cfg.run.algo, cfg.algorithm.num_generations, cfg.algorithm.timestep_fraction) == ("dancegrpo", 6, 0.6)
    (tmp_path / "bad.yaml").write_text("algo: dancegrpo\nnum_generation: 8\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_generation'\]"):
        parse_flags(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.slow
def test_plan_cli_reports_bad_flags_clearly():
    out = subprocess.run([sys.executable, "-m", "branchgrpo.plan", "--tree_split_points", "0,3,x"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "error: --tree_split_points: 'x' is not an integer" in out.stderr
    assert "Traceback" not in out.stderr


def test_yaml_values_of_the_wrong_type_name_the_flag(tmp_path):
    for text, message in (("branch_factor: 2.5", r"--branch_factor: need an integer, got 2.5"),
                          ("num_generations: true", r"--num_generations: need an integer, got True"),
                          ("tree_split_noise_scale: .inf", r"--tree_split_noise_scale: need a finite number"),
                          ("init_same_noise: 1", r"--init_same_noise: need true or false")):
        (tmp_path / "c.yaml").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            config_from_flags(parse_flags(["--config", str(tmp_path / "c.yaml")])[0], "algorithm")
    # comma-list flags may be written as YAML lists or a single number
    (tmp_path / "ok.yaml").write_text("tree_split_points: [0, 3, 6]\ndepth_pruning: 15\n")
    cfg = config_from_flags(parse_flags(["--config", str(tmp_path / "ok.yaml")])[0], "algorithm")
    assert (cfg.algorithm.split_points(20), cfg.algorithm.pruned_depths) == ([0, 3, 6], [15])


def test_the_last_step_cannot_be_trained():
    bad(r"--no-ignore_last: the last step", ignore_last=False)


def test_a_selection_that_trains_nothing_is_refused(tmp_path):
    every_depth = ",".join(str(d) for d in range(1, 20))
    with pytest.raises(ValueError, match=r"--depth_pruning '1,2,.*no edge is left to train"):
        parse_train_config(["--depth_pruning", every_depth, "--data_json_path", str(tmp_path)])
    parse_train_config(["--depth_pruning", every_depth[2:], "--data_json_path", str(tmp_path)])  # depth 1 trains


def test_flags_without_effect_are_reported(tmp_path, caplog):
    parse = lambda *a: parse_train_config([*a, "--data_json_path", str(tmp_path)])  # noqa: E731
    cfg = parse("--algo", "dancegrpo", "--tree_split_points", "0,3", "--lora_rank", "8", "--h", "64")
    sized = [name for name, spec in backbones().items() if hasattr(spec.Config(), "h")]  # the backbones with --h
    assert "toy" not in sized and {"flux", "wan"} <= set(sized)
    takers = ", ".join(sized[:-1]) + " or " + sized[-1]
    assert cfg.inapplicable_flags() == ["--lora_rank (acts only with --use_lora)",
                                        f"--h (acts only with --model {takers})",
                                        "--tree_split_points (acts only with --algo branchgrpo)"]
    assert "no effect in this configuration: " + "; ".join(cfg.inapplicable_flags()) in caplog.text
    assert parse("--width_pruning_ratio", "0.3").inapplicable_flags() == \
        ["--width_pruning_ratio (acts only with --width_pruning_mode 2)"]
    assert parse("--algo", "mixgrpo", "--mix_sde_window_size", "5", "--num_generations", "8").inapplicable_flags() == []
    assert parse("--mix_ode_sde_tree", "--mix_sde_window_size", "5").inapplicable_flags() == []
    assert parse("--mix_sde_window_size", "5").inapplicable_flags() == \
        ["--mix_sde_window_size (acts only with --mix_ode_sde_tree)"]
    assert parse("--algo", "g2rpo", "--mix_sde_window_size", "5").inapplicable_flags() == \
        ["--mix_sde_window_size (acts only with --algo mixgrpo or branchgrpo)"]


def test_mixgrpo_window_never_reaches_the_last_two_steps():
    """MixGRPO's max_timesteps = N - 2: by default the window's last position ends at step T - 3."""
    from branchgrpo.core.graph import skeleton_graph
    import torch

    algo = algorithm_from_flags(algo="mixgrpo", sampling_steps=20, mix_sde_window_size=4, mix_window_interval=1)
    trained_steps = set()
    for it in range(40):  # more than one full sweep, so the roll-back is crossed too
        graph = skeleton_graph(algo.plan(it))
        trained = algo.select(graph, torch.zeros(graph.num_nodes, dtype=torch.float64), it)
        trained_steps |= set((graph.step[trained] - 1).tolist())
    assert trained_steps == set(range(0, 18))  # steps 18 and 19 never trained

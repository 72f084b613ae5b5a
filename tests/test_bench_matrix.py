"""The backbone matrix (branchgrpo.bench.matrix): what makes a cell pass, which runs use LoRA, and one real run of
the tool on one backbone x two algorithms (the whole matrix is a benchmark, docs/benchmarks.md section 7)."""

import json

import pytest

from branchgrpo.bench.matrix import run_modes, selected, verdict

PASSING = dict(algo="dancegrpo", mode="full", loss_finite=True, rewards_finite=True, first_ratio_dev=0.0,
               reload_rel_diff=0.0, training_rel_change=1e-3)


@pytest.mark.parametrize("change, failure", [
    (dict(loss_finite=False), "non-finite loss"),
    (dict(rewards_finite=False), "non-finite rewards"),
    (dict(first_ratio_dev=1e-4), "first ratio off 1 by 0.0001"),
    (dict(reload_rel_diff=1e-3), "the reloaded export predicts 1.00e-03"),
    (dict(training_rel_change=0.0), "training did not move the prediction"),
    (dict(error="ValueError: --h: 40 is not a positive multiple of 16"), "ValueError: --h: 40"),
])
def test_a_cell_fails_on_each_check_with_its_reason(change, failure):
    assert verdict(PASSING) is None
    assert verdict(dict(PASSING, first_ratio_dev=None)) is None  # an algorithm without ratios (DiffusionNFT)
    assert failure in verdict(dict(PASSING, **change))


def test_alternating_modes_give_every_algorithm_both_across_two_backbones():
    assert run_modes("alternate", 0, 3) == [["full"], ["lora"], ["full"]]
    assert run_modes("alternate", 1, 3) == [["lora"], ["full"], ["lora"]]
    assert run_modes("both", 4, 2) == [["full", "lora"], ["full", "lora"]]
    assert run_modes("lora", 0, 2) == [["lora"], ["lora"]]


def test_names_are_taken_in_registry_order_and_unknown_ones_refused():
    assert selected("", ["a", "b", "c"], "--algos") == ["a", "b", "c"]
    assert selected("c,a", ["a", "b", "c"], "--algos") == ["a", "c"]
    with pytest.raises(ValueError, match="--backbones: unknown nope; expected some of a, b"):
        selected("a,nope", ["a", "b"], "--backbones")


@pytest.mark.slow
def test_the_tool_trains_checks_and_tabulates_one_backbone_with_two_algorithms(tmp_path):
    """In this process (--nproc 1), one iteration each: FLUX's tiny checkpoint with DanceGRPO under LoRA and
    BranchGRPO's tree on the full model (the toy, which has no tiny checkpoint, is the skipped row 0)."""
    from branchgrpo.bench.matrix import main

    assert main(["--output_dir", str(tmp_path), "--backbones", "toy,flux", "--algos", "dancegrpo,branchgrpo",
                 "--iterations", "1", "--nproc", "1", "--modes", "alternate"]) == 0
    result = json.loads((tmp_path / "matrix.json").read_text())
    assert result["algorithms"] == ["dancegrpo", "branchgrpo"]
    assert "no tiny checkpoint" in result["backbones"]["toy"]["skipped"]
    flux = result["backbones"]["flux"]
    assert flux["reward"] == "hps"  # its first evaluation reward, from the tiny HPS checkpoint
    cells = flux["cells"]
    assert [(c["algo"], c["mode"]) for c in cells] == [("dancegrpo", "lora"), ("branchgrpo", "full")]
    for cell in cells:
        assert verdict(cell) is None, cell
        assert cell["iterations"] == 1 and cell["median_iter_time_s"] > 0
        assert cell["first_ratio_dev"] is not None  # both train on ratios (verdict: within 1e-6 of 1)
        assert cell["reload_rel_diff"] < 1e-5 < cell["training_rel_change"]
    table = (tmp_path / "matrix.md").read_text()
    assert "| backbone | reward | dancegrpo | branchgrpo | row median |" in table
    assert "| flux | hps | pass L " in table and "- toy: no tiny checkpoint" in table

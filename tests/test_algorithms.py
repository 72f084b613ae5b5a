"""Algorithms are registered units: a new one is defined here, in the test module, without editing the package, and
trains through the normal CLI entry point; its flags, plan counts and applicability come from the unit itself."""

import json
from dataclasses import dataclass

import pytest
import torch

from branchgrpo import algorithms
from branchgrpo.algorithms import Algorithm, GroupFlags, register_algorithm
from branchgrpo.config import config_from_flags, flag, parse_train_config, require
from branchgrpo.core.graph import RolloutGraph
from branchgrpo.core.plans import group_plan
from trainer_utils import fast_args, make_toy_embeddings, metrics


@dataclass
class LeaveOneOutConfig(GroupFlags):
    """G chains per prompt; each chain's advantage is its reward minus a multiple of the mean of the OTHER chains."""

    loo_baseline_weight: float = flag(1.0, "test_rloo: weight of the leave-one-out baseline (0: raw rewards)")

    def validate(self, sampling) -> None:
        super().validate(sampling)
        require(0 <= self.loo_baseline_weight <= 1,
                f"--loo_baseline_weight: need a value in [0, 1], got {self.loo_baseline_weight}")


class LeaveOneOut(Algorithm):
    name = "test_rloo"
    Config = LeaveOneOutConfig
    default_kernel = "dance"

    def plan(self, iteration):
        return group_plan(self.num_steps, self.cfg.num_generations)

    def estimate(self, graph: RolloutGraph, leaf_rewards: torch.Tensor) -> torch.Tensor:
        r = leaf_rewards.to(torch.float64)
        prompt = graph.prompt[graph.leaves]
        total = torch.zeros(graph.num_prompts, dtype=torch.float64).index_add(0, prompt, r)
        count = torch.bincount(prompt, minlength=graph.num_prompts).to(torch.float64)
        baseline = (total[prompt] - r) / (count[prompt] - 1)
        leaf_adv = r - self.cfg.loo_baseline_weight * baseline
        out = torch.zeros(graph.num_nodes, dtype=torch.float64)
        out[graph.leaves] = leaf_adv
        for d in range(int(graph.depth.max()), 0, -1):  # a chain node inherits its leaf's advantage
            nodes = torch.nonzero(graph.depth == d).flatten()
            out[graph.parent[nodes]] = out[nodes]
        return out


@pytest.fixture
def registered():
    register_algorithm(LeaveOneOut)
    yield LeaveOneOut
    del algorithms._REGISTRY[LeaveOneOut.name]


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


@pytest.mark.slow
def test_a_unit_defined_in_a_test_trains_through_the_cli(registered, emb, tmp_path):
    from branchgrpo.cli.train import main

    out = tmp_path / "rloo"
    args = fast_args(emb, out, algo="test_rloo", num_generations=3, loo_baseline_weight=0.5, checkpointing_steps=2)
    assert main(args) == 0
    entries = metrics(out)
    assert [e["step"] for e in entries] == [0, 1]
    assert all(e["trained_edges"] == 2 * 3 * 5 for e in entries)  # 2 prompts x 3 chains x 5 SDE edges (T 6)
    assert all(e["loss"] != 0 and e["grad_norm"] > 0 for e in entries)
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == "test_rloo" and config["loo_baseline_weight"] == 0.5
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_the_unit_owns_its_flags_checks_and_counts(registered, tmp_path, caplog):
    with pytest.raises(ValueError, match=r"--loo_baseline_weight: need a value in \[0, 1\], got 2.0"):
        config_from_flags({"algo": "test_rloo", "loo_baseline_weight": 2.0}, validate="algorithm")
    with pytest.raises(ValueError, match=r"--num_generations: group methods need >= 2"):
        config_from_flags({"algo": "test_rloo", "num_generations": 1}, validate="algorithm")
    counts = config_from_flags({"algo": "test_rloo", "num_generations": 4}, validate="algorithm") \
        .build_algorithm().counts(0)
    assert (counts["leaves"], counts["forward_passes"], counts["trained_edges"]) == (4, 80, 76)
    # the shared --num_generations now also names the new unit; its own flag is reported with the others' algos
    cfg = parse_train_config(["--algo", "branchgrpo", "--loo_baseline_weight", "0.5", "--num_generations", "6",
                              "--data_json_path", str(tmp_path)])
    assert cfg.inapplicable_flags() == [
        "--num_generations (acts only with --algo dancegrpo, mixgrpo, g2rpo, flow_grpo, flow_grpo_fast, diffusion_nft "
        "or test_rloo)",
        "--loo_baseline_weight (acts only with --algo test_rloo)"]


def test_builtin_units_are_found_through_the_registry():
    units = algorithms.algorithms()
    assert list(units)[:4] == ["dancegrpo", "mixgrpo", "branchgrpo", "g2rpo"]
    assert {u.default_kernel for u in units.values()} <= {"dance", "flow"}
    with pytest.raises(ValueError, match="registered twice"):
        class Impostor(Algorithm):
            name = "branchgrpo"
        register_algorithm(Impostor)

"""The method comparison harness on the toy at tiny settings: every method of Table 1 (and G2RPO) trains for the
same 2 iterations, the table has the promised columns, each method's measured NFEs are exactly what
`python -m branchgrpo.plan` counts for its flags, and one reward-vs-time plot is written."""

import json
import os
import subprocess
import sys

import pytest

from branchgrpo.bench.compare import methods as compare_rows
from branchgrpo.cli.compare import main as compare_main
from branchgrpo.cli.plan import main as plan_main
from trainer_utils import REPO

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier

TINY = ["--train_batch_size", "2", "--num_eval_prompts", "2", "--eval_samples_per_prompt", "2"]
KEYS = ("method", "rollout_nfe", "train_nfe", "iter_time_s", "rollout_time_s", "reward_time_s", "train_time_s",
        "eval_reward_before", "eval_reward_after", "iter_time_ratio", "leaves_per_prompt", "flags")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    compare_main(["--iterations", "2", "--output_dir", str(out), "--", *TINY])
    return out, json.loads((out / "table.json").read_text())


def plan_counts(trainer_args: list[str], iteration: int, capsys) -> dict:
    capsys.readouterr()
    plan_main([*trainer_args, "--json", "--iteration", str(iteration)])
    return json.loads(capsys.readouterr().out)


def test_every_method_is_tabulated_with_plan_exact_nfe(compared, capsys):
    out, table = compared
    rows = {r["method"]: r for r in table["rows"]}
    assert list(rows) == list(compare_rows())
    methods = json.loads((out / "methods.json").read_text())
    for name, row in rows.items():
        assert all(row.get(k) is not None for k in KEYS), (name, [k for k in KEYS if row.get(k) is None])
        assert row["iterations"] == 2 and row["iter_time_s"] > 0
        counts = [plan_counts(methods[name]["trainer_args"], it, capsys) for it in (0, 1)]
        assert row["rollout_nfe"] == pytest.approx(sum(c["forward_passes_per_leaf"] for c in counts) / 2, rel=1e-12)
        assert row["train_nfe"] == pytest.approx(sum(c["trained_edges_per_leaf"] for c in counts) / 2, rel=1e-12)
        assert row["leaves_per_prompt"] == counts[0]["leaves"]
    # the fairness the harness promises: 16 leaves for every method that has a free group/tree size
    assert {rows[m]["leaves_per_prompt"] for m in compare_rows() if m != "g2rpo"} == {16}
    assert rows["g2rpo"]["leaves_per_prompt"] == 16 * 4 * 3 + 1
    assert rows["dancegrpo_tf1.0"]["iter_time_ratio"] == 1.0
    assert rows["branchgrpo"]["rollout_nfe"] == pytest.approx(203 / 16)
    assert rows["branchgrpo_widpru"]["train_nfe"] < rows["branchgrpo"]["train_nfe"]
    assert "--width_pruning_mode 1" in rows["branchgrpo_widpru"]["flags"]
    assert "{interval}" not in json.dumps(methods)


def test_outputs_table_csv_and_one_plot(compared):
    out, table = compared
    assert sorted(p.name for p in out.glob("*.png")) == ["reward_vs_time.png"]
    md = (out / "table.md").read_text()
    assert "iter. time / DanceGRPO tf1.0" in md and "BranchGRPO-DepPru" in md and "Method flags" in md
    header = (out / "table.csv").read_text().splitlines()[0].split(",")
    assert {"method", "rollout_nfe", "train_nfe", "iter_time_s", "eval_reward_after", "plan_rollout_nfe"} <= set(header)
    assert table["setup"]["iterations"] == 2 and table["setup"]["extra_flags"] == TINY


def test_finished_runs_are_reused(compared, capsys):
    out, _ = compared
    compare_main(["--iterations", "2", "--output_dir", str(out), "--methods", "branchgrpo", "--", *TINY])
    assert "reusing the finished run" in capsys.readouterr().out


def test_launcher_checks_its_inputs(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, SKIP_SETUP="1", OUTPUT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/bench/compare_methods.sh"], env={**env, "ITERATIONS": "abc"}, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "ITERATIONS" in proc.stderr
    proc = subprocess.run(["bash", "scripts/bench/compare_methods.sh"],
                          env={**env, "MODEL": "flux", "MODEL_PATH": str(tmp_path / "none"),
                               "DATA_JSON": str(tmp_path / "none.json")}, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "MODEL_PATH" in proc.stderr and "DATA_JSON" in proc.stderr


def test_a_run_folder_the_harness_did_not_write_is_never_deleted(tmp_path, capsys):
    """The harness deletes and retrains only run folders it stamped (harness_args.json, written before training);
    anything else in a method's folder is refused, not deleted."""
    mine = tmp_path / "runs" / "branchgrpo" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("not the harness's")
    with pytest.raises(SystemExit, match="did not write"):
        compare_main(["--iterations", "1", "--output_dir", str(tmp_path), "--methods", "branchgrpo", "--", *TINY])
    assert mine.read_text() == "not the harness's"

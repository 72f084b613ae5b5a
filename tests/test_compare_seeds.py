"""The comparison's over-seeds summary on hand-made rows: intervals, the compute and time to the baseline's final
reward, and the mean curves (the harness's end-to-end run is tests/test_compare.py)."""

import math

import pytest

from branchgrpo.bench.compare_seeds import aggregate, first_reaching, interval


def _row(method, seed, rewards, compute_per_eval, time_per_eval, **extra):
    steps = list(range(0, 5 * len(rewards), 5))
    curve = {"eval_step": steps, "eval_reward": rewards,
             "eval_compute": [compute_per_eval * i for i in range(len(steps))],
             "eval_time_s": [time_per_eval * i for i in range(len(steps))]}
    return dict(method=method, label=method.upper(), seed=seed, eval_reward_after=rewards[-1],
                eval_reward_delta=rewards[-1] - rewards[0], train_wall_s=time_per_eval * (len(steps) - 1),
                diversity_ratio=extra.get("diversity", 1.0), kid=0.0, forwards_per_iteration=compute_per_eval / 5,
                curve=curve)


def test_interval_is_the_student_t_half_width_over_the_known_values():
    mean, half = interval([1.0, 2.0, 4.0, None, float("nan")])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == pytest.approx(7 / 3) and half == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)
    assert interval([0.5]) == (0.5, None) and interval([None]) == (None, None)


def test_compute_to_the_baselines_final_reward_is_taken_at_the_first_evaluation_reaching_it():
    rows = [_row("base", 1, [0.4, 0.5, 0.6], 100, 10), _row("base", 2, [0.4, 0.55, 0.7], 100, 12),
            _row("fast", 1, [0.4, 0.66, 0.8], 300, 5), _row("fast", 2, [0.4, 0.5, 0.64], 300, 6),
            _row("slow", 1, [0.4, 0.41, 0.42], 50, 1)]
    assert first_reaching(rows[2]["curve"], 0.65) == (300, 5)
    assert first_reaching(rows[4]["curve"], 0.65) == (None, None)
    aggregates, target = aggregate(rows, "base")
    assert target == pytest.approx(0.65)
    by = {a["method"]: a for a in aggregates}
    assert [a["method"] for a in aggregates] == ["base", "fast", "slow"]
    assert by["base"]["reached"] == "1/2" and by["base"]["forwards_to_target"] == 200  # seed 2 at its last eval
    assert by["fast"]["reached"] == "1/2" and by["fast"]["forwards_to_target"] == 300
    assert by["fast"]["time_to_target_s"] == 5 and by["slow"]["forwards_to_target"] is None
    assert by["fast"]["eval_reward_after"] == pytest.approx(0.72)
    assert by["fast"]["curve"]["reward"] == pytest.approx([0.4, 0.58, 0.72])
    assert by["fast"]["curve"]["compute"] == [0, 300, 600] and by["base"]["curve"]["time_s"] == [0, 11, 22]

"""The run's guards (branchgrpo.runtime.guards) and its metrics component (branchgrpo.runtime.metrics): every guard
implements the Guard protocol and halts with a RunHalted - one `error:` line, exit code 3 - naming the checkpoint; the
metrics are a pure function of an iteration's results; the reward-hacking monitor leaves non-finite evaluation samples
out and counts them; a run diverged by a huge learning rate stops through the divergence guard, with a checkpoint of
the last weights that sampled finitely."""

import copy
import dataclasses
import json
import logging
import math

import pytest
import torch

from branchgrpo.config.sections import EvalConfig
from branchgrpo.core import sde
from branchgrpo.core.plans import tree_plan
from branchgrpo.core.rollout import NoiseKeys, run_rollout
from branchgrpo.runtime.entry import EXIT_HALTED, RunHalted, run_cli
from branchgrpo.runtime.guards import DivergenceGuard, Guard, NonFiniteGuard, Observation
from branchgrpo.runtime.metrics import IterationResults, finite_samples, iteration_metrics
from branchgrpo.runtime.monitor import HackingMonitor, high_frequency_share
from branchgrpo.runtime.watchdog import StalledError


def iteration(step, scored=8, nonfinite_samples=0, reward_failures=0, applied=(True,)):
    counts = {"scored": scored, "nonfinite_rewards": nonfinite_samples + reward_failures,
              "nonfinite_samples": nonfinite_samples, "reward_failures": reward_failures,
              "per_reward": {"toy": reward_failures}, "live_edges": 1.0, "applied_steps": list(applied)}
    return Observation(step, {"step": step}, counts)


def smooth_images(n=16, seed=0):
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


def checkerboard_images(n=16):
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float()
    return (0.85 * smooth_images(n) + 0.15 * board).clamp(0, 1)


def evaluation(monitor, step, media, samples_per_prompt=4):
    """One evaluation as the trainer runs it: measured, then observed by the guard."""
    ids = list(range(media.shape[0]))
    record = monitor.measure(step, media, ids, [False] * len(ids), samples_per_prompt)
    monitor.observe(Observation(step, record, evaluation=True))
    return record


def tiny_model():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def trip_nonfinite():
    guard = NonFiniteGuard(0.5, 2)
    for step in range(2):
        guard.observe(Observation(step, {"step": step}, evaluation=True))  # evaluations are not its business
        guard.observe(iteration(step, reward_failures=6))
    return guard


def trip_divergence():
    model, optimizer = tiny_model()
    guard = DivergenceGuard(2, list(model.parameters()), optimizer)
    for step in range(2):
        guard.observe(iteration(step, applied=[False]))
    return guard


def trip_monitor():
    monitor = HackingMonitor(EvalConfig(hacking_guard="stop"))
    evaluation(monitor, 0, smooth_images())
    evaluation(monitor, 4, checkerboard_images())
    return monitor


@pytest.mark.parametrize("trip", [trip_nonfinite, trip_divergence, trip_monitor])
def test_each_guard_implements_the_protocol_and_halts_with_exit_code_3(trip, capsys):
    guard = trip()
    assert isinstance(guard, Guard) and Guard in type(guard).__mro__  # declared, not only of the right shape
    assert guard.tripped
    err = guard.error("/runs/x/checkpoints/checkpoint-7")
    assert isinstance(err, RunHalted) and not isinstance(err, ValueError)
    assert "checkpoint-7" in str(err)

    def body(argv):
        raise err

    assert run_cli(body, []) == EXIT_HALTED == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checkpoint-7" in lines[0]


def test_a_stall_halts_with_exit_code_3_and_a_class_without_the_protocols_methods_is_refused(capsys):
    def body(argv):
        raise StalledError("a collective timed out after --collective_timeout_s 6: rank 0: no progress")

    assert run_cli(body, []) == 3 and capsys.readouterr().err.startswith("error: a collective timed out")

    class Half(Guard):
        def observe(self, seen):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_guards_below_their_limits_do_not_trip():
    nonfinite, monitor = NonFiniteGuard(0.5, 1), HackingMonitor(EvalConfig(hacking_guard="warn"))
    nonfinite.observe(iteration(0, reward_failures=4))  # 4 of 8: not more than half
    evaluation(monitor, 0, smooth_images())
    evaluation(monitor, 4, checkerboard_images())
    assert monitor.alarm is not None and not monitor.tripped and not nonfinite.tripped  # warn: an alarm, no stop
    assert not DivergenceGuard(0, [], None).tripped


def test_non_finite_samples_are_the_policys_failure_not_the_reward_models():
    """Leaves whose sample is NaN have no finite reward, but they do not count against the reward models: an
    iteration without a finite sample says nothing about them (the divergence guard covers it)."""
    guard = NonFiniteGuard(0.5, 1)
    guard.observe(iteration(0, nonfinite_samples=8))
    assert guard.count == 0 and not guard.tripped
    guard.observe(iteration(1, nonfinite_samples=4, reward_failures=3))  # 3 of the 4 finite samples: 75%
    assert guard.tripped and guard.recent == [[1, 0.75]]


def test_the_divergence_guard_puts_back_the_last_state_that_sampled_finitely():
    model, optimizer = tiny_model()
    params = list(model.parameters())
    guard = DivergenceGuard(2, params, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a good step: optimizer state exists from here on
    optimizer.zero_grad()
    guard.keep_if_sound(0, torch.tensor([True, True]))
    good = [p.detach().clone() for p in params]
    good_state = copy.deepcopy(optimizer.state_dict()["state"])
    model(torch.ones(1, 3)).sum().backward()
    optimizer.param_groups[0]["lr"] = 1e20  # the step that diverges: finite weights, absurd ones
    optimizer.step()
    optimizer.zero_grad()
    guard.observe(iteration(0, applied=[True]))
    guard.keep_if_sound(1, torch.tensor([True, False]))  # its rollout is not finite: nothing kept
    guard.observe(iteration(1, applied=[False]))
    assert not guard.tripped and not torch.equal(params[0], good[0])
    guard.keep_if_sound(2, torch.tensor([False, False]))
    guard.observe(iteration(2, applied=[False]))
    assert guard.tripped
    assert all(torch.equal(p, g) for p, g in zip(params, good))
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][k], good_state[i][k]) for i in good_state for k in good_state[i])
    assert optimizer.param_groups[0]["lr"] == 1e20  # the LR stays the schedule's
    assert "before the update of iteration 0" in str(guard.error("ckpt"))


def test_without_a_kept_copy_the_divergence_guard_leaves_the_weights_and_says_which_checkpoint_is_good():
    """A full fine-tune of a large backbone keeps no host copy (it would be the whole trainable state per iteration):
    tripping changes nothing, and the error points at the checkpoint before the one it writes."""
    model, optimizer = tiny_model()
    params = list(model.parameters())
    guard = DivergenceGuard(1, params, optimizer, keep_copy=False)
    guard.keep_if_sound(0, torch.tensor([True]))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.param_groups[0]["lr"] = 1e20
    optimizer.step()
    after = [p.detach().clone() for p in params]
    guard.observe(iteration(0, applied=[False]))
    assert guard.tripped and guard.sound is None
    assert all(torch.equal(p, a) for p, a in zip(params, after))
    assert "the checkpoint before it is the last good state" in str(guard.error("ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# the metrics component
# ---------------------------------------------------------------------------------------------------------------
def results_of_a_real_rollout():
    """A real tree rollout of 2 prompts (4 leaves each) whose velocity turns NaN for prompt 1 below sigma 0.5 (so
    every leaf of prompt 1 is NaN), rewards with a NaN on one finite sample, and an update's results."""
    def velocity(x, sigma, prompt):
        v = 0.5 * x + 0.1 * (prompt.float() + 1).reshape(-1, 1, 1)
        broken = (prompt == 1) & (sigma < 0.5)
        return torch.where(broken.reshape(-1, 1, 1), torch.full_like(v, float("nan")), v)

    graph = run_rollout(tree_plan(6, [0, 2], 2), velocity, sde.make_sigmas(6, 3.0), sde.Kernel("dance", 0.3),
                        NoiseKeys(7, 1, (0, 1)), (2, 3))
    num_leaves = graph.leaves.numel()
    toy = torch.linspace(0.1, 0.8, num_leaves, dtype=torch.float64)
    toy[1] = float("nan")  # the reward model fails on a finite sample of prompt 0
    finite = finite_samples(graph)
    toy = torch.where(finite, toy, torch.full_like(toy, float("nan")))  # no reward for a non-finite sample
    trained = torch.zeros(graph.parent.numel(), dtype=torch.bool)
    trained[graph.leaves] = True
    update = {"loss": 0.25, "grad_norm": 1.5, "optimizer_steps": 2, "skipped_steps": 1, "applied_steps": [True, False],
              "micro_batches": 3, "nonfinite_edges": 1.0, "clip_fraction": 0.1, "approx_kl": 0.01, "kl": 0.02,
              "ratio_min": 0.9, "ratio_max": 1.1, "first_ratio_min": 1.0, "first_ratio_max": 1.0}
    return IterationResults(3, graph, {"toy": toy}, toy.clone(), finite, trained, update, 5.0,
                            (10.0, 11.0, 11.5, 13.0), 1e-3, 42.0)


def _snapshot(results):
    return copy.deepcopy({"graph": vars(results.graph), "scores": results.scores, "total": results.total,
                          "finite": results.finite_samples, "trained": results.trained, "update": results.update})


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and _same(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_the_metrics_are_a_pure_function_of_the_iterations_results(caplog):
    results = results_of_a_real_rollout()
    before, rng = _snapshot(results), torch.get_rng_state()
    with caplog.at_level(logging.DEBUG):
        first = iteration_metrics(results, world_size=1)
        second = iteration_metrics(results, world_size=1)
    assert first == second
    assert _same(_snapshot(results), before), "the metrics changed their inputs"
    assert torch.equal(torch.get_rng_state(), rng) and not caplog.records  # no RNG drawn, nothing logged

    # the figures against the inputs, computed independently
    entry, counts = first.entry, first.counts
    finite = results.finite_samples
    assert finite.tolist() == [True] * 4 + [False] * 4  # the velocity broke prompt 1 below sigma 0.5
    kept = results.total[torch.isfinite(results.total)]
    assert entry["reward_mean"] == pytest.approx(float(kept.mean()))
    assert entry["reward_std"] == pytest.approx(float(kept.std()))
    assert (entry["nonfinite_rewards"], entry["nonfinite_samples"], entry["leaves"]) == (5, 4, 8)
    assert counts["reward_failures"] == 1 and counts["per_reward"] == {"toy": 1} and counts["scored"] == 8
    assert counts["applied_steps"] == [True, False] and "applied_steps" not in entry
    assert (entry["iter_time_s"], entry["train_time_s"], entry["lr"], entry["peak_memory_mb"]) == (3.0, 1.5, 1e-3, 42.0)
    json.dumps(entry, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# the monitor and non-finite evaluation samples
# ---------------------------------------------------------------------------------------------------------------
def test_non_finite_evaluation_samples_are_left_out_and_counted():
    """A NaN sample and an inf sample: the monitor goes on, counts both, and its figures are those of the finite
    samples - the same as a monitor given only them; the KID functions stay strict for direct callers."""
    from branchgrpo.core.diversity import kid

    base, later = smooth_images(), smooth_images(seed=1)
    broken = later.clone()
    broken[3] = float("nan")
    broken[9, 1, 2, 5] = float("inf")
    monitor = HackingMonitor(EvalConfig())
    evaluation(monitor, 0, base)
    record = evaluation(monitor, 2, broken)
    assert record["monitor_nonfinite"] == 2
    finite = [i for i in range(16) if i not in (3, 9)]
    assert record["monitor_hf_share"] == pytest.approx(float(high_frequency_share(later[finite]).mean()))
    assert all(record[k] is not None and math.isfinite(record[k])
               for k in ("monitor_hf_ratio", "monitor_diversity_ratio", "monitor_kid", "monitor_mmd2_p"))
    json.dumps(record, allow_nan=False)

    alone = HackingMonitor(EvalConfig())
    alone.measure(0, base, list(range(16)), [False] * 16, 4)
    same = alone.measure(2, later[finite], finite, [False] * len(finite), 4)
    assert same.pop("monitor_nonfinite") == 0 and record.pop("monitor_nonfinite") == 2
    assert record == same

    features = base.flatten(1).numpy().copy()
    features[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        kid(features, base.flatten(1).numpy())


def test_with_too_few_finite_samples_every_statistic_is_null_and_nothing_trips():
    monitor = HackingMonitor(EvalConfig(hacking_guard="stop", hacking_max_kid=1e-6))
    reference = smooth_images()
    reference[0] = float("nan")  # the base too may have a broken sample: the reference leaves it out
    assert evaluation(monitor, 0, reference)["monitor_nonfinite"] == 1
    assert monitor.reference["sample_ids"] == list(range(1, 16))
    one_left = torch.full_like(reference, float("nan"))
    one_left[5] = smooth_images(seed=2)[5]
    record = evaluation(monitor, 2, one_left)
    assert record["monitor_nonfinite"] == 15 and record["monitor_kid"] is None and record["monitor_mmd2"] is None
    assert record["monitor_hf_share"] is not None and record["monitor_diversity"] is None  # one sample: no pairs
    none_left = evaluation(monitor, 4, torch.full_like(reference, float("inf")))
    assert none_left["monitor_nonfinite"] == 16
    assert all(none_left[k] is None for k in ("monitor_hf_share", "monitor_diversity", "monitor_hf_ratio",
                                              "monitor_diversity_ratio", "monitor_kid", "monitor_mmd2",
                                              "monitor_mmd2_p"))
    assert none_left["monitor_alarm"] == [] and not monitor.tripped


# ---------------------------------------------------------------------------------------------------------------
# a diverging run on the toy
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from trainer_utils import make_toy_embeddings

    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


def _error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return [x for x in err.splitlines() if x.startswith("error:")]


@pytest.mark.slow  # a toy run of 6 iterations
def test_learning_rate_1e20_stops_through_the_divergence_guard_with_the_initial_weights(emb, tmp_path, capsys):
    """Iteration 0's step (finite gradient) sends the weights to ~1e20: finite, but every later rollout is NaN and
    every later step is skipped. The run stops through the divergence guard (not the non-finite reward guard), with
    exit code 3 and one line, and its checkpoint holds the weights that sampled finitely: the initial ones. The
    evaluations of the diverged model in between (every sample NaN) do not stop it: they are counted."""
    from branchgrpo.cli.train import main
    from branchgrpo.models.toy import load_toy
    from trainer_utils import exported_weights, fast_args, metrics

    out = tmp_path / "lr1e20"
    assert main(fast_args(emb, out, learning_rate=1e20, max_train_steps=8, validation_steps=2)) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: diverged: 5 optimizer steps in a row"), lines
    assert "iterations 1-5" in lines[0] and "checkpoint-6" in lines[0] and "before the update of iteration 0" in lines[0]
    entries = metrics(out)
    assert [e["skipped_steps"] for e in entries] == [0, 1, 1, 1, 1, 1]
    assert [e["nonfinite_samples"] for e in entries] == [0, 8, 8, 8, 8, 8]
    evals = {e["step"]: e for e in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    assert evals[2]["monitor_nonfinite"] == evals[2]["eval_nonfinite"] == 2 * 2  # every held-out sample
    assert evals[2]["monitor_kid"] is None and evals[4]["monitor_nonfinite"] == 4
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["skipped_steps"]["count"] == 5 and state["nonfinite"]["count"] == 0
    saved = exported_weights(out, 6)
    initial = {f"transformer/{k}": v for k, v in load_toy().transformer.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in initial.items())


@pytest.mark.slow  # two toy runs
def test_a_divergence_after_a_good_step_keeps_the_good_steps_weights(emb, tmp_path, capsys, monkeypatch):
    """Iteration 0 trains at --learning_rate 1e-3, then the schedule jumps to 1e20: the checkpoint holds the weights
    after iteration 0 - equal to those of a run of that one iteration - and they are finite."""
    import branchgrpo.runtime.optim as optim
    from branchgrpo.cli.train import main
    from trainer_utils import exported_weights, fast_args

    monkeypatch.setattr(optim, "lr_lambda", lambda cfg, total: lambda step: 1.0 if step == 0 else 1e23)
    out = tmp_path / "diverges"
    assert main(fast_args(emb, out, max_train_steps=8, max_skipped_steps=2)) == 3
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "iterations 2-3" in lines[0] and "before the update of iteration 1" in lines[0]
    reference = tmp_path / "one_iteration"
    assert main(fast_args(emb, reference, max_train_steps=1)) == 0
    saved, good = exported_weights(out, 4), exported_weights(reference, 1)
    assert saved.keys() == good.keys() and all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], good[k]) for k in good)

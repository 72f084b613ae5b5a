"""The GRPO trainer on the shipped toy model: every algorithm trains, LoRA trains only adapters, the first ratio is
exactly 1, non-finite rewards are contained, and bad inputs fail early with messages naming the flag or file."""

import json
import logging
from pathlib import Path

import pytest
import torch

from branchgrpo.models.toy import load_toy
from branchgrpo.rewards.base import register_reward
from trainer_utils import exported_weights, fast_args, make_toy_embeddings, metrics, train

pytestmark = pytest.mark.slow  # multi-process, end-to-end or model-building: not in the fast tier


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("toy_emb"))


@pytest.fixture(scope="module")
def initial():
    return {f"transformer/{k}": v.clone() for k, v in load_toy().transformer.state_dict().items()}


ALGO_FLAGS = {
    "branchgrpo": {},
    "branchgrpo-mix": {"algo": "branchgrpo", "mix_ode_sde_tree": True, "mix_sde_window_size": 2},
    "dancegrpo": {"algo": "dancegrpo", "timestep_fraction": 0.6},
    "mixgrpo": {"algo": "mixgrpo", "mix_sde_window_size": 2},
    "g2rpo": {"algo": "g2rpo", "g2rpo_steps": "0,1", "g2rpo_granularities": "1,2", "reward_combine": "advantage"},
}


@pytest.mark.parametrize("variant", sorted(ALGO_FLAGS))
def test_every_algorithm_changes_every_parameter(variant, emb, initial, tmp_path):
    out = tmp_path / variant
    summary = train(fast_args(emb, out, **ALGO_FLAGS[variant]))
    entries = metrics(out)
    assert len(entries) == 2 and summary["iterations"] == 2
    for e in entries:
        assert all(torch.isfinite(torch.tensor(float(e[k]))) for k in ("loss", "grad_norm", "reward_mean"))
        assert e["first_ratio_min"] == 1.0 and e["first_ratio_max"] == 1.0  # on-policy at theta_old, CPU fp32
        assert e["optimizer_steps"] >= 1 and e["skipped_steps"] == 0 and e["trained_edges"] > 0
    after = exported_weights(out)
    trained = {k: v for k, v in after.items() if k.startswith("transformer/")}
    assert trained.keys() == initial.keys()
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    for name in ("metrics.jsonl", "summary.json", "reward_curve.png", "eval.jsonl"):
        assert (out / name).exists(), name
    assert len(list((out / "samples").glob("eval_step*.png"))) == 2  # before and after


def test_lora_trains_only_the_adapters(emb, initial, tmp_path):
    from branchgrpo.config import parse_train_config
    from branchgrpo.runtime.trainer import Trainer

    out = tmp_path / "lora"
    trainer = Trainer(parse_train_config(fast_args(emb, out, use_lora=True, lora_rank=4, lora_alpha=8,
                                                   learning_rate=1e-2)))
    named = dict(trainer.adapter.transformer.named_parameters())
    before = {k: p.detach().clone() for k, p in named.items()}
    trainer.train()
    lora_keys = [k for k in named if ".lora_" in k]
    assert lora_keys and all(named[k].requires_grad for k in lora_keys)
    # in the trained model itself: every base weight is bitwise what it was, every LoRA B matrix moved
    assert all(torch.equal(named[k], before[k]) for k in named if ".lora_" not in k)
    assert all(not torch.equal(named[k], before[k]) for k in lora_keys if ".lora_B" in k)
    from safetensors.torch import load_file

    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "model"
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    b_weights = [v for k, v in adapter.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in b_weights), "every LoRA B matrix left its zero init"
    # the base weights were not trained: re-run the model with adapters switched off equals the shipped model
    from branchgrpo.models.lora import lora_disabled, lora_layers
    from branchgrpo.models.toy import load_toy as reload

    adapter_model = reload()
    adapter_model.add_lora(4, 8)
    state = adapter_model.transformer.state_dict()
    state.update({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                  for k, v in adapter.items()})
    adapter_model.transformer.load_state_dict(state)
    assert len(lora_layers(adapter_model.transformer)) > 0
    base = load_toy()
    x, sig = torch.randn(3, *base.latent_shape), torch.tensor([0.9, 0.5, 0.2])
    cond = base.encode_prompts(["a bold seven", "a thin two", "a wide zero"])
    with torch.no_grad(), lora_disabled(adapter_model.transformer):
        assert torch.equal(adapter_model.velocity(x, sig, cond), base.velocity(x, sig, cond))
    with torch.no_grad():
        assert not torch.allclose(adapter_model.velocity(x, sig, cond), base.velocity(x, sig, cond))


@register_reward("toy_with_nan")
def _toy_with_nan(device="cpu", **options):
    """The toy reward with NaN for every third sample: a reward model that fails on some inputs."""
    from branchgrpo.rewards.base import build_reward

    inner = build_reward("toy", device=device)

    def score(media, prompts):
        values = inner(media, prompts).clone()
        values[::3] = float("nan")
        return values

    score.name = "toy_with_nan"
    return score


@register_reward("toy_all_nan")
def _toy_all_nan(device="cpu", **options):
    """A reward model that fails on every input."""

    def score(media, prompts):
        return torch.full((media.shape[0],), float("nan"))

    score.name = "toy_all_nan"
    return score


def test_non_finite_rewards_are_counted_and_contained(emb, tmp_path):
    out = tmp_path / "nan"
    summary = train(fast_args(emb, out, reward="toy_with_nan"))
    for e in metrics(out):
        assert e["nonfinite_rewards"] > 0 and e["skipped_steps"] == 0
        assert torch.isfinite(torch.tensor(e["loss"])) and torch.isfinite(torch.tensor(e["reward_mean"]))
    assert all(torch.isfinite(v).all() for v in exported_weights(out).values())
    # the evaluation averages the samples with a finite reward and says how many had none
    for record in map(json.loads, (out / "eval.jsonl").read_text().splitlines()):
        assert record["eval_nonfinite"] == 2 and 0 < record["eval_reward"] < 1  # samples 0 and 3 of 4
    assert 0 < summary["eval_reward_after"] < 1


def test_iterations_without_a_finite_reward_log_null_not_numbers(emb, tmp_path, caplog):
    out = tmp_path / "all_nan"
    with caplog.at_level(logging.WARNING):
        summary = train(fast_args(emb, out, reward="toy_all_nan"))  # 2 iterations: under --max_nonfinite_iterations
    written = "".join((out / name).read_text() for name in ("metrics.jsonl", "eval.jsonl", "summary.json"))
    assert "NaN" not in written and "Infinity" not in written
    for e in metrics(out):
        assert e["reward_mean"] is None and e["reward_std"] is None  # no data, not 0.0
        assert e["loss"] is None and e["grad_norm"] is None and e["clip_fraction"] is None  # no edge to train on
        assert e["nonfinite_rewards"] == e["leaves"] == 8
    for record in map(json.loads, (out / "eval.jsonl").read_text().splitlines()):
        assert record["eval_reward"] is None and record["eval_nonfinite"] == 4
    assert summary["eval_reward_before"] is None and summary["eval_reward_after"] is None
    warned = [r.getMessage() for r in caplog.records if "no finite reward" in r.getMessage()]
    assert sum("8 of 8 leaves" in w and "'toy_all_nan' non-finite on 8" in w for w in warned) == 2, warned


def test_a_run_whose_rewards_keep_failing_stops_with_a_checkpoint(emb, tmp_path, capsys):
    """More than --max_nonfinite_fraction of the leaves non-finite in --max_nonfinite_iterations iterations in a row
    stops the run with a checkpoint and a message; the count is checkpointed, so it goes on across a resume."""
    from branchgrpo.cli.train import main

    out = tmp_path / "stops"
    flags = dict(reward="toy_all_nan", checkpointing_steps=1, max_nonfinite_iterations=3)
    train(fast_args(emb, out, max_train_steps=2, **flags))  # two failing iterations: not yet
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["nonfinite"]["count"] == 2
    capsys.readouterr()
    assert main(fast_args(emb, out, max_train_steps=6, resume_from_checkpoint="latest", **flags)) == 3  # halted
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "3 iterations in a row" in errors[0] and "checkpoint-3" in errors[0], errors
    assert "'toy_all_nan' on 8 leaves" in errors[0] and "--max_nonfinite_iterations 3" in errors[0]
    assert [e["step"] for e in metrics(out)] == [0, 1, 2]  # the third failing iteration in a row was the last
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-3"
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["nonfinite"]["count"] == 3


def test_kl_to_the_reference_is_logged_and_positive_after_an_update(emb, tmp_path):
    out = tmp_path / "kl"
    train(fast_args(emb, out, kl_coef=0.1, max_train_steps=2))
    e = metrics(out)
    assert e[0]["kl"] == 0.0 and e[1]["kl"] > 0.0  # the policy equals the reference only before the first update


def test_bad_inputs_are_refused_with_clear_messages(emb, tmp_path):
    from branchgrpo.cli.train import main

    base = fast_args(emb, tmp_path / "bad")
    assert main(base + ["--algo", "ppo"]) == 2  # not a registered algorithm
    assert main(base + ["--tree_split_points", "0,9"]) == 2
    assert main(base + ["--data_json_path", str(tmp_path / "nope.json")]) == 2
    assert main(base + ["--use_group"]) == 2
    assert main(base + ["--sp_size", "2"]) == 2
    # a missing embedding shard names the file
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(emb[0].parent, broken)
    next((broken / "shards").glob("*.safetensors")).unlink()
    from branchgrpo.data.embeddings import EmbeddingStore

    with pytest.raises(FileNotFoundError, match="shard"):
        EmbeddingStore(broken / "index.json")
    assert main(fast_args(emb, tmp_path / "b2", data_json_path=str(broken / "index.json"))) == 2
    # embeddings of another backbone
    index = json.loads(emb[0].read_text())
    index["model"] = "flux"
    wrong = tmp_path / "wrong"
    shutil.copytree(emb[0].parent, wrong)
    (wrong / "index.json").write_text(json.dumps(index))
    assert main(fast_args(emb, tmp_path / "b3", data_json_path=str(wrong / "index.json"))) == 2


def test_bad_input_messages(emb, tmp_path, capsys):
    from branchgrpo.cli.train import main

    main(fast_args(emb, tmp_path / "m", tree_split_points="0,9"))
    assert "--tree_split_points: 9 is outside 0..4" in capsys.readouterr().err
    main(fast_args(emb, tmp_path / "m", reward="nonexistent"))
    assert "--reward: unknown reward 'nonexistent'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# --output_dir: one run per folder, checked before anything is loaded
# ----------------------------------------------------------------------------------------------------------------


class _Loading(Exception):
    """Raised instead of loading the reward models: the output-dir checks passed."""


@pytest.fixture
def no_loading(monkeypatch):
    import branchgrpo.runtime.trainer as trainer

    def refuse(*args, **kwargs):
        raise _Loading

    monkeypatch.setattr(trainer, "build_reward_set", refuse)


def _error_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_earlier_run_in_the_output_dir_is_refused_unless_resumed_or_overwritten(emb, tmp_path, no_loading, capsys):
    from branchgrpo.cli.train import main

    out = tmp_path / "run"
    (out / "embeddings" / "train").mkdir(parents=True)  # the toy launcher's embeddings alone are not a run
    (out / "notes.txt").write_text("mine")
    with pytest.raises(_Loading):
        main(fast_args(emb, out))
    for name in ("metrics.jsonl", "eval.jsonl"):
        (out / name).write_text("{}\n")
    (out / "config.json").write_text(json.dumps({"algo": "dancegrpo", "output_dir": str(out)}))
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "samples").mkdir()
    assert main(fast_args(emb, out)) == 2
    line = _error_line(capsys)
    assert "--output_dir" in line and "earlier run" in line and "--resume_from_checkpoint" in line
    assert "--overwrite_output_dir" in line and "metrics.jsonl" in line
    # continuing it is what --resume_from_checkpoint is for: the folder passes, but without a (complete) checkpoint
    # 'latest' would start over, which these files - another run's config.json - do not allow
    assert main(fast_args(emb, out, resume_from_checkpoint="latest")) == 2
    line = _error_line(capsys)
    assert "--resume_from_checkpoint latest" in line and "has no checkpoint" in line and "another run" in line
    assert main(fast_args(emb, out, resume_from_checkpoint="latest", overwrite_output_dir=True)) == 2
    assert "choose one" in _error_line(capsys)
    # replacing it deletes what runs of ours wrote, and only in a folder that holds nothing else: notes.txt stops it
    assert main(fast_args(emb, out, overwrite_output_dir=True)) == 2
    assert f"holds {out / 'notes.txt'}, which no run of ours wrote; nothing was deleted" in _error_line(capsys)
    assert (out / "metrics.jsonl").exists() and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").rename(tmp_path / "notes.txt")
    with pytest.raises(_Loading):
        main(fast_args(emb, out, overwrite_output_dir=True))
    assert sorted(p.name for p in out.iterdir()) == ["embeddings"]  # the run's files only


def test_an_output_dir_that_cannot_be_written_fails_before_loading(emb, tmp_path, no_loading, capsys):
    import os

    from branchgrpo.cli.train import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    unwritable = tmp_path / "read_only"
    unwritable.mkdir()
    unwritable.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere permissions allow... except where the kernel refuses
        unwritable = Path("/sys/branchgrpo-test")
    for out, reason in [(a_file, "is a file"), (a_file / "run", "not a writable folder"),
                        (unwritable / "run", "not a writable folder")]:
        assert main(fast_args(emb, out)) == 2, out
        line = _error_line(capsys)
        assert line.startswith(f"error: --output_dir: {out}") and reason in line, line

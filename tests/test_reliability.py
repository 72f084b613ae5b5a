"""Issue 21: a requeue or an overwrite never deletes results; exported weights, embedding indexes and option values
are checked when they are opened; devices are parsed strictly; every error is one line with the exit code of its
kind (2 input, 4 environment), before the expensive work. One test per class; the launchers' side is in
tests/test_launch_env.py. Faults of the machine (a full disk) are injected by making a writer raise."""

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from trainer_utils import fast_args, make_toy_embeddings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    return errors[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return make_toy_embeddings(tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def finished(emb, tmp_path_factory) -> Path:
    """A finished one-iteration toy run with its checkpoint."""
    from branchgrpo.cli.train import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(fast_args(emb, out, max_train_steps=1)) == 0
    return out


# ----- data loss ---------------------------------------------------------------------------------------------------


def test_a_requeue_of_a_finished_run_without_checkpoints_deletes_nothing(emb, finished, tmp_path, capsys):
    from branchgrpo.cli.train import main

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints")  # cleaned up after the run finished
    before = digests(out)
    assert main(fast_args(emb, out, max_train_steps=1, resume_from_checkpoint="latest")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "summary.json" in line and "--overwrite_output_dir" in line, line
    assert digests(out) == before


def test_an_empty_output_dir_is_refused_and_overwriting_spares_files_that_are_not_ours(emb, tmp_path, capsys,
                                                                                        monkeypatch):
    from branchgrpo.cli.train import main
    from branchgrpo.runtime.outputs import prepare_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')  # the user's folder happens to hold a run file
    for blank in ("", "   "):
        assert main(fast_args(emb, Path("x"), output_dir=blank, overwrite_output_dir=True)) == 2
        assert "--output_dir: empty path" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "eval_step000000.png").write_bytes(b"png")
    (out / "embeddings" / "train").mkdir(parents=True)  # the toy launcher's preprocessing output is ours too
    (out / "embeddings" / "train" / "manifest.json").write_text("{}")
    for name, text in (("thesis.tex", "mine"), ("config.json", '{"lr": 1}')):  # a user's file; a config of theirs
        (out / name).write_text(text)
        before = digests(out)
        with pytest.raises(ValueError, match=f"--overwrite_output_dir: .* holds .*{name}, which no run of ours wrote"):
            prepare_output_dir(out, resuming=False, overwrite=True, is_main=True)
        assert digests(out) == before
        (out / name).unlink()
    (out / "config.json").write_text(json.dumps({"algo": "branchgrpo", "output_dir": str(out)}))
    prepare_output_dir(out, resuming=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in out.iterdir()) == ["embeddings"]


@pytest.mark.parametrize("listed", [False, True])
def test_a_cut_export_is_refused_on_resume(finished, tmp_path, listed):
    """The export is not read back when resuming (DCP is): its own header is what catches a cut one, with or
    without a complete.json listing the cut size."""
    from branchgrpo.runtime.checkpoint import CheckpointManager

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = out / "checkpoints" / "checkpoint-1"
    weights = ckpt / "model" / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    marker = ckpt / "complete.json"
    if listed:
        listing = json.loads(marker.read_text())
        listing["files"]["model/transformer.safetensors"] = weights.stat().st_size
        marker.write_text(json.dumps(listing))
    else:
        marker.unlink()
    with pytest.raises(ValueError, match=r"transformer\.safetensors is truncated or damaged"):
        CheckpointManager(out, 0, 1).resolve("latest")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _dcp_no_space(*args, **kwargs):
    from torch.distributed.checkpoint.api import CheckpointException

    raise CheckpointException("write", {0: (OSError(errno.ENOSPC, "No space left on device"), [])})


def _safetensors_no_space(folder):
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where", ["dcp", "rank_state", "export", "safetensors", "marker"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, where):
    import branchgrpo.runtime.checkpoint as checkpoint
    from branchgrpo.runtime.entry import EnvironmentFailure

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = checkpoint.CheckpointManager(tmp_path / "run", 0, 1)
    save = lambda step, export=lambda folder: None: manager.save(step, model, optimizer, {}, {}, {"seed": 1}, export)
    first = save(1)
    before = digests(first)
    if where == "dcp":
        monkeypatch.setattr(checkpoint.dcp, "save", _dcp_no_space)
    elif where == "rank_state":
        monkeypatch.setattr(checkpoint.torch, "save", _no_space)
    elif where == "marker":
        monkeypatch.setattr(checkpoint, "_write_marker", _no_space)
    export = {"export": _no_space, "safetensors": _safetensors_no_space}.get(where, lambda folder: None)
    with pytest.raises(EnvironmentFailure) as raised:
        save(2, export)
    assert raised.value.errno == errno.ENOSPC
    text = str(raised.value)
    assert f"{tmp_path / 'run' / 'checkpoints'} has" in text and "free" in text and "needs about" in text, text
    assert "\n" not in text
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "latest"]  # no .tmp-checkpoint-2
    assert digests(first) == before and manager.latest() == first


def test_a_bug_while_saving_is_not_taken_for_a_full_disk(tmp_path):
    from branchgrpo.runtime.checkpoint import CheckpointManager

    model = torch.nn.Linear(4, 4)
    manager = CheckpointManager(tmp_path, 0, 1)

    def broken(folder):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        manager.save(1, model, torch.optim.AdamW(model.parameters()), {}, {}, {}, broken)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_in_training_exits_4_with_one_line(emb, tmp_path, capsys, monkeypatch):
    import branchgrpo.runtime.checkpoint as checkpoint
    from branchgrpo.cli.train import main

    monkeypatch.setattr(checkpoint.torch, "save", _no_space)
    out = tmp_path / "run"
    assert main(fast_args(emb, out, max_train_steps=1)) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and str(out / "checkpoints") in line and "free" in line, line
    assert not list((out / "checkpoints").iterdir())


def test_an_os_error_of_the_machine_is_one_line_with_exit_code_4(capsys):
    from branchgrpo.runtime.entry import run_cli

    def body(argv):
        raise OSError(errno.EROFS, "Read-only file system", "/data/run/metrics.jsonl")

    assert run_cli(body, []) == 4
    line = one_error_line(capsys.readouterr().err)
    assert "/data/run/metrics.jsonl: Read-only file system" in line and "writable folder" in line, line


# ----- strict devices ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "gpu0", "cuda:x", "", "CPU", "cuda0", "mps"])
def test_device_names_are_parsed_strictly(name):
    from branchgrpo.core.distributed import resolve_device

    with pytest.raises(ValueError, match="--device: .* is not a device; use auto"):
        resolve_device(name)


def test_cuda_is_refused_when_no_gpu_is_visible(monkeypatch):
    from branchgrpo.core.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"--device {name}: no CUDA device is visible"):
            resolve_device(name)


@pytest.mark.parametrize("entry", ["train", "preprocess", "eval", "bench", "compiled", "diversity"])
def test_every_entry_point_refuses_an_unknown_device(entry, emb, tmp_path, capsys):
    import importlib

    argv = {
        "train": ["branchgrpo.cli.train", *fast_args(emb, tmp_path / "out")],
        "preprocess": ["branchgrpo.cli.preprocess", "--model", "toy", "--prompts", str(tmp_path / "p.txt"),
                       "--output_dir", str(tmp_path / "out")],
        "eval": ["branchgrpo.cli.eval", "--model", "toy", "--output_dir", str(tmp_path / "out")],
        "bench": ["branchgrpo.bench.__main__", "--output", str(tmp_path / "b.json")],
        "compiled": ["branchgrpo.bench.compiled", "--output", str(tmp_path / "b.json")],
        "diversity": ["branchgrpo.cli.diversity", "--a", str(tmp_path), "--b", str(tmp_path)],
    }[entry]
    (tmp_path / "p.txt").write_text("a bold seven\n")
    assert importlib.import_module(argv[0]).main([*argv[1:], "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a device" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----- option values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,named", [
    ('{"toy": {"path": 3}}', "reward 'toy', option 'path': need a path (a string), got 3"),
    ('{"toyy": {"path": "x"}}', "'toyy' is not a reward of --reward (toy); its options would be ignored"),
    ('{"toy": {"path": "NOPE"}}', "reward 'toy', option 'path': NOPE does not exist"),
])
def test_reward_options_are_checked_against_the_factory_before_loading(emb, tmp_path, capsys, options, named):
    from branchgrpo.cli.train import main

    options = options.replace("NOPE", str(tmp_path / "nope"))
    named = named.replace("NOPE", str(tmp_path / "nope"))
    assert main(fast_args(emb, tmp_path / "out", reward_options=options)) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: --reward_options: {named}"
    assert not (tmp_path / "out").exists()  # refused by the config's validation, before the run starts


def test_reward_option_types_follow_the_signature_and_errors_name_the_flag_used(tmp_path, capsys):
    from branchgrpo.cli.eval import main as eval_main
    from branchgrpo.rewards.base import build_reward

    for name, options, problem in (("temporal_consistency", {"batch_size": "2"}, 'need an integer, got "2"'),
                                   ("hps", {"batch_size": True}, "need an integer, got true"),
                                   ("videoalign", {"source_fps": "x"}, 'need a number, got "x"')):
        with pytest.raises(ValueError, match=f"reward '{name}', option '{next(iter(options))}': {problem}"):
            build_reward(name, model_dir=str(tmp_path), **options)
    with pytest.raises(FileNotFoundError, match=r"--reward_options: reward 'toy', option 'path': .*nope"):
        build_reward("toy", path=str(tmp_path / "nope"))  # the factory's own error, with the option that caused it
    assert eval_main(["--model", "toy", "--device", "cpu", "--rewards", "tooy", "--output_dir", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: --rewards: unknown reward 'tooy'")


# ----- files checked when they are opened, values before anything is loaded ---------------------------------------


@pytest.mark.parametrize("edit,message", [
    (lambda index: index["prompts"][1].pop("text"), 'prompt 1 has no "text"'),
    (lambda index: index.update(num_prompts=3), "the prompt counts disagree .*num_prompts 3"),
    (lambda index: [spec.update(dtype="F16") for spec in index["keys"].values()], "as dtype F32, the index says F16"),
])
def test_the_embedding_index_is_checked_entry_by_entry_when_the_store_opens(emb, tmp_path, edit, message):
    from branchgrpo.data.embeddings import EmbeddingStore

    folder = tmp_path / "emb"
    shutil.copytree(emb[0].parent, folder)
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"--eval_data_json_path: .*index.json.*{message}"):
        EmbeddingStore(folder / "index.json", "--eval_data_json_path")


@pytest.mark.parametrize("flags,named", [
    ({"adam_beta1": 1.0}, "--adam_beta1: need a value in [0, 1), got 1.0"),
    ({"adam_beta2": -0.1}, "--adam_beta2: need a value in [0, 1), got -0.1"),
    ({"adam_epsilon": 0.0}, "--adam_epsilon: need a positive number, got 0.0"),
    ({"weight_decay": -1.0}, "--weight_decay: need >= 0, got -1.0"),
    ({"hacking_features": "clip", "hacking_feature_weights": "TEXT"}, "--hacking_feature_weights: TEXT is not a "
                                                                      "weights file"),
])
def test_values_that_failed_after_loading_are_refused_by_validation(tmp_path, flags, named):
    from branchgrpo.config import config_from_flags

    (tmp_path / "w.pt").write_text("not weights\n")
    flags = {k: str(tmp_path / "w.pt") if v == "TEXT" else v for k, v in flags.items()}
    with pytest.raises(ValueError) as raised:
        config_from_flags(dict(flags, data_json_path=str(tmp_path / "w.pt")))
    assert str(raised.value).startswith(named.replace("TEXT", str(tmp_path / "w.pt")))


# ----- messages that name what was given ---------------------------------------------------------------------------


def test_messages_name_what_was_given(tmp_path, capsys):
    from branchgrpo.cli.plan import main as plan
    from branchgrpo.cli.preprocess import main as preprocess
    from branchgrpo.cli.train import main as train

    assert train(["--config", str(tmp_path)]) == 2
    assert f"--config: {tmp_path} is a folder, not a file" in one_error_line(capsys.readouterr().err)
    assert preprocess(["--model", "toy", "--prompts", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"--prompts: prompt file {tmp_path} is a folder" in one_error_line(capsys.readouterr().err)
    (tmp_path / "c.json").write_text("{oops")
    assert plan(["--model", "flux", "--gpus", "8", "--transformer_config", str(tmp_path / "c.json")]) == 2
    assert f"--transformer_config: {tmp_path / 'c.json'} is not valid JSON" in one_error_line(capsys.readouterr().err)
    assert train(["--learning_rate", "-1e-3", "--data_json_path", str(tmp_path / "c.json")]) == 2  # not a flag
    assert one_error_line(capsys.readouterr().err) == "error: --learning_rate: need a positive number, got -0.001"


@pytest.mark.parametrize("module,argv,named", [
    ("branchgrpo.cli.train", ["--learnig_rate", "1"], "unrecognized arguments: --learnig_rate 1 (did you mean: "
                                                       "--learnig_rate -> --learning_rate?); see branchgrpo-train"),
    ("branchgrpo.cli.eval", ["--steps", "x"], "argument --steps: invalid int value: 'x'; see python -m "
                                              "branchgrpo.cli.eval --help"),
    ("branchgrpo.cli.preprocess", ["--model", "toy"], "the following arguments are required: --prompts, --output_dir"),
    ("branchgrpo.cli.make_tiny", ["sdxl", "x"], "argument kind: invalid choice: 'sdxl'"),
])
def test_a_malformed_command_line_is_one_line_without_the_usage_text(module, argv, named, capsys):
    import importlib

    assert importlib.import_module(module).main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert named in line and line.endswith("--help"), line


# ----- repeated and empty input, a warm-up longer than the run ----------------------------------------------------


def test_repeats_empty_configs_and_a_warmup_that_never_ends_are_not_silent(tmp_path, capsys, caplog):
    from branchgrpo.cli.plan import main as plan
    from branchgrpo.config.sections import OptimConfig
    from branchgrpo.runtime.optim import build_lr_scheduler

    assert plan(["--branch_factor", "2", "--tree_split_points", "0", "--branch_factor=3"]) == 0
    assert "warning: --branch_factor is given 2 times (2, 3); the last one is used" in capsys.readouterr().err
    for text, named in (("seed: 1\nlearning_rate: 1.0e-3\nseed: 2\n", "'seed' is given twice (lines 1 and 3)"),
                        ("# only a comment\n", "holds no flag (empty, or comments only)")):
        (tmp_path / "c.yaml").write_text(text)
        assert plan(["--config", str(tmp_path / "c.yaml")]) == 2
        assert f"--config: {tmp_path / 'c.yaml'}" in (line := one_error_line(capsys.readouterr().err)) and named in line
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with caplog.at_level(logging.WARNING, logger="branchgrpo.runtime.optim"):
        build_lr_scheduler(optimizer, OptimConfig(lr_warmup_steps=500), total_steps=100)
    assert "--lr_warmup_steps 500 is not shorter than the run's 100 optimizer steps" in caplog.text

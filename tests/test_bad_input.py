"""Bad input gets one clear line naming the flag or file, exit code 2, before anything expensive (issue 11).

Each test feeds one kind of bad input to the mechanism that owns the check - a config section's `validate`, the
reward registry, the embedding store, a backbone's loader, the shared CLI boundary (`branchgrpo.runtime.entry.run_cli`), the
launchers' `bg_launch` - and asserts the message (what it names, that it is one line) and, at the command line, the
exit code and the absence of a traceback."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import REPO, free_port

# ----- helpers -------------------------------------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    """The stderr of an entry point that refused its input: exactly one `error: ...` line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    return errors[0]


def train_flags(tmp_path: Path, **flags) -> list[str]:
    """Training flags that pass validation (the index file only has to exist for that) apart from `flags`."""
    index = tmp_path / "index.json"
    index.write_text("{}")
    values = {"model": "toy", "device": "cpu", "data_json_path": str(index), "output_dir": str(tmp_path / "out"),
              "sampling_steps": 6, "tree_split_points": "0,2", "report_to": "none", **flags}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def toy_embeddings(tmp_path_factory) -> Path:
    """A small toy embedding folder written by the real preprocess step (two shards)."""
    from branchgrpo.data.preprocess import run_preprocess
    from branchgrpo.models.toy import build_prompt_encoder

    root = tmp_path_factory.mktemp("toy_embeddings")
    prompts = root / "prompts.txt"
    prompts.write_text("a bold seven\nan upright two\na thin wide zero\na bold two\na thin seven\n")
    run_preprocess(prompts, root / "emb", "toy", build_prompt_encoder(None, "cpu"), shard_size=3)
    return root / "emb"


def variant(folder: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


# ----- item 4: values accepted silently before ---------------------------------------------------------------------


def test_negative_num_threads_is_refused_by_its_section_and_the_clis(tmp_path, capsys):
    from branchgrpo.cli.eval import main as eval_main
    from branchgrpo.cli.train import main as train_main
    from branchgrpo.config.sections import ParallelConfig

    with pytest.raises(ValueError, match=r"--num_threads: need >= 0 .* got -1"):
        ParallelConfig(num_threads=-1).validate()
    assert train_main(train_flags(tmp_path, num_threads=-1)) == 2
    assert "--num_threads" in one_error_line(capsys.readouterr().err)
    assert eval_main(["--model", "toy", "--num_threads", "-2", "--output_dir", str(tmp_path / "eval")]) == 2
    assert "--num_threads: need >= 0" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_reward_weights_are_refused(weight, tmp_path, capsys):
    from branchgrpo.cli.train import main as train_main
    from branchgrpo.rewards.base import parse_reward_spec

    with pytest.raises(ValueError, match=f"--reward: weight of 'toy' must be a finite number, got '{weight}'"):
        parse_reward_spec(f"toy={weight}")
    assert train_main(train_flags(tmp_path, reward=f"toy=1.0,toy_digit={weight}")) == 2
    assert "toy_digit" in one_error_line(capsys.readouterr().err)


def test_unsorted_split_points_are_used_in_step_order_with_a_warning(caplog):
    from branchgrpo.algorithms import branchgrpo as unit
    from branchgrpo.config import algorithm_from_flags

    getattr(unit, "_REPORTED", set()).clear()  # (absent before the split points were reported)
    with caplog.at_level(logging.WARNING, logger="branchgrpo.algorithms.branchgrpo"):
        algo = algorithm_from_flags(algo="branchgrpo", sampling_steps=12, tree_split_points="6,0,3")
    assert algo.split_points == [0, 3, 6]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["--tree_split_points '6,0,3' is not in ascending order; the tree splits at steps 0,3,6"]
    assert algo.counts(0)["leaves"] == 8


def test_empty_split_points_log_the_points_used(caplog):
    from branchgrpo.algorithms import branchgrpo as unit
    from branchgrpo.config import algorithm_from_flags

    getattr(unit, "_REPORTED", set()).clear()  # (absent before the split points were reported)
    with caplog.at_level(logging.INFO, logger="branchgrpo.algorithms.branchgrpo"):
        algo = algorithm_from_flags(algo="branchgrpo", sampling_steps=16, tree_split_points="", tree_split_rounds=3)
    assert algo.split_points == [0, 5, 10]  # the official fallback k * (T // rounds), kept
    assert [r.getMessage() for r in caplog.records] == [
        "--tree_split_points is empty: splitting at steps 0,5,10 (--tree_split_rounds 3 over 16 steps)"]
    with pytest.raises(ValueError, match="--tree_split_rounds: need >= 1"):
        algorithm_from_flags(algo="branchgrpo", tree_split_points="", tree_split_rounds=0)


# ----- item 5: tracebacks before ------------------------------------------------------------------------------------


def test_unknown_reward_option_names_the_options_the_reward_takes(tmp_path, capsys):
    from branchgrpo.cli.train import main as train_main
    from branchgrpo.rewards.base import build_reward, build_reward_set

    with pytest.raises(ValueError, match=r"reward 'toy' takes no option 'bogus'; its options: model_dir, path"):
        build_reward("toy", bogus=1)
    with pytest.raises(ValueError, match=r"takes no option 'bogus'.*checkpoint, arch, model_config_dir"):
        build_reward_set("hps", "sum", "cpu", {"hps": {"bogus": 1}})  # refused before any file is looked up
    # at the command line: refused while the flags are validated, before the embeddings are opened
    assert train_main(train_flags(tmp_path, reward_options=json.dumps({"toy": {"bogus": 1}}))) == 2
    assert "--reward_options: reward 'toy' takes no option 'bogus'" in one_error_line(capsys.readouterr().err)


def test_truncated_embedding_shard_is_named_when_the_store_opens(toy_embeddings, tmp_path):
    from branchgrpo.data.embeddings import EmbeddingStore

    for name, keep in (("header", 5), ("data", None)):
        folder = variant(toy_embeddings, tmp_path, name)
        shard = folder / "shards" / "shard-00001.safetensors"
        data = shard.read_bytes()
        shard.write_bytes(data[:keep] if keep else data[: len(data) - 40])
        with pytest.raises(ValueError, match=r"embedding shard .*shard-00001\.safetensors cannot be read .*truncated"):
            EmbeddingStore(folder / "index.json")


@pytest.mark.parametrize("edit,message", [
    (lambda index: index.pop("model"), r"index\.json lacks 'model'"),
    (lambda index: index.pop("shards"), r"index\.json lacks 'shards'"),
    (lambda index: index["prompts"][4].update(row=7), r"prompt 4 points at row 7 of shard 1 of 2 rows"),
    (lambda index: index["prompts"][0].update(shard=5), r"prompt 0 points at row 0 of shard 5 \(the index lists 2"),
    (lambda index: index["shards"][0].update(num_prompts=4), r"shard-00000\.safetensors holds '\w+' of shape \[3, .*"
                                                             r"the index says \[4, "),
])
def test_an_index_that_does_not_fit_its_shards_is_named(toy_embeddings, tmp_path, edit, message):
    from branchgrpo.data.embeddings import EmbeddingStore

    folder = variant(toy_embeddings, tmp_path, "edited")
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        EmbeddingStore(folder / "index.json")


def test_train_cli_reports_a_broken_embedding_index_in_one_line(toy_embeddings, tmp_path, capsys):
    from branchgrpo.cli.train import main as train_main

    folder = variant(toy_embeddings, tmp_path, "no_model")
    index = json.loads((folder / "index.json").read_text())
    del index["model"]
    (folder / "index.json").write_text(json.dumps(index))
    flags = train_flags(tmp_path, data_json_path=folder / "index.json", eval_data_json_path=toy_embeddings,
                        max_train_steps=1, num_eval_prompts=1, eval_samples_per_prompt=1)
    assert train_main(flags) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / "index.json") in line and "lacks 'model'" in line


def _missing_prompts(tmp_path):
    return ["branchgrpo.cli.preprocess", "--model", "toy", "--device", "cpu", "--prompts",
            str(tmp_path / "none.txt"), "--output_dir", str(tmp_path / "emb")], "--prompts: prompt file"


@pytest.mark.parametrize("case", [
    _missing_prompts,
    lambda tmp: (["branchgrpo.cli.plan", "--tree_split_points", "0,x"], "--tree_split_points: 'x' is not an integer"),
    lambda tmp: (["branchgrpo.cli.make_tiny", "hps", str(REPO / "README.md")], "out_dir: " + str(REPO / "README.md") +
                 " is a file, not a folder"),
    lambda tmp: (["branchgrpo.cli.diversity", "--a", str(tmp / "absent"), "--b", str(tmp)],
                 "absent' is neither a folder nor a .pt feature file"),
    lambda tmp: (["branchgrpo.cli.compare", "--methods", "nope", "--output_dir", str(tmp / "c")], "--methods: unknown"),
    lambda tmp: (["branchgrpo.bench.__main__", "--model", "toy", "--num_threads", "-1"], "--num_threads: need >= 0"),
    lambda tmp: (["branchgrpo.cli.eval", "--model", "toy", "--prompts", str(tmp / "none.txt"), "--output_dir",
                  str(tmp / "e")], "--prompts: prompt file"),
])
def test_every_entry_point_prints_one_line_and_exits_2(case, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("BRANCHGRPO_DEBUG", raising=False)
    argv, expected = case(tmp_path)
    main = importlib.import_module(argv[0]).main
    assert main(argv[1:]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    # --debug (and BRANCHGRPO_DEBUG=1) keep the traceback above the same line
    assert main([*argv[1:], "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")
    monkeypatch.setenv("BRANCHGRPO_DEBUG", "1")
    assert main(argv[1:]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_the_alias_modules_exit_with_code_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("BRANCHGRPO_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "branchgrpo.plan", "--tree_split_points", "0,x"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == "error: --tree_split_points: 'x' is not an integer (in '0,x')"


# ----- item 6: state-dict mismatches in one line ---------------------------------------------------------------------


def test_state_dict_summary_counts_and_gives_three_examples():
    from branchgrpo.core.state_dicts import state_dict_mismatch

    expected = {f"blocks.{i}.weight": (4, 4) for i in range(6)}
    found = {"blocks.0.weight": (4, 4), "blocks.1.weight": (2, 4), "extra": (1,)}
    error = state_dict_mismatch("file.pt", "the model", found, expected, lambda s: f"{len(s)} tensors", "use `arch`")
    assert str(error) == ("file.pt does not match the model (the file: 3 tensors; expected: 6 tensors); 4 keys missing "
                          "(e.g. blocks.2.weight, blocks.3.weight, blocks.4.weight, ...), 1 unexpected (e.g. extra), 1 "
                          "of another shape (e.g. blocks.1.weight [2, 4] vs [4, 4]); use `arch`")
    assert state_dict_mismatch("f", "m", expected, dict(expected)) is None


def test_tiny_hps_file_loaded_as_vit_h_14_is_one_line(tmp_path):
    from branchgrpo.rewards.base import build_reward
    from branchgrpo.testing.clip_tiny import make_tiny_hps

    path = make_tiny_hps(str(tmp_path), seed=0)
    with pytest.raises(ValueError) as caught:
        build_reward("hps", checkpoint=str(path))  # the default arch, ViT-H-14
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1200, message
    assert "the file: image tower 2 blocks x width 32 (patch 8, 32 px), text tower 2 blocks x width 32" in message
    assert "expected: image tower 32 blocks x width 1280 (patch 14, 224 px), text tower 24 blocks x width 1024" \
        in message
    assert re.search(r"; \d+ keys missing \(e\.g\. .*\), 0 unexpected, \d+ of another shape \(e\.g\. ", message)
    assert "`arch`" in message and "`model_config_dir`" in message and "--reward_options" in message


@pytest.mark.slow
def test_imagereward_with_another_med_config_is_one_line(tmp_path):
    from branchgrpo.cli.make_tiny import make_tiny
    from branchgrpo.rewards.base import build_reward

    make_tiny("imagereward", str(tmp_path), seed=0)
    med = json.loads((tmp_path / "med_config.json").read_text())
    layers = med["num_hidden_layers"]
    (tmp_path / "other.json").write_text(json.dumps({**med, "num_hidden_layers": layers + 3}))
    with pytest.raises(ValueError) as caught:
        build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"),
                     med_config=str(tmp_path / "other.json"), tokenizer=str(tmp_path / "bert-base-uncased"))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1200, message
    assert f"text encoder {layers} layers" in message and f"med_config: text encoder {layers + 3} layers" in message
    assert "keys missing (e.g. blip.text_encoder.encoder.layer." in message and "`med_config`" in message


@pytest.mark.slow
def test_videoalign_with_another_base_config_is_one_line(tmp_path):
    from branchgrpo.rewards.base import build_reward
    from branchgrpo.testing.videoalign_tiny import make_tiny_videoalign

    reward = make_tiny_videoalign(str(tmp_path), seed=0)
    base = tmp_path / "Qwen2-VL-2B-Instruct" / "config.json"
    config = json.loads(base.read_text())
    layers = config["num_hidden_layers"]
    base.write_text(json.dumps({**config, "num_hidden_layers": layers + 2}))
    with pytest.raises(ValueError) as caught:
        build_reward("videoalign", checkpoint=str(reward))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 1200, message
    assert f"(the file: language model {layers} layers" in message
    assert f"expected: language model {layers + 2} layers" in message
    assert "keys missing (e.g. language_model.layers." in message and "`base_model`" in message


# ----- item 7: sizes the backbone cannot take, checked against its config before the weights load --------------------


def _config_only_checkpoint(root: Path, transformer: dict, vae: dict) -> Path:
    """A checkpoint folder holding only the two configs (what the size checks read)."""
    for part, config in (("transformer", transformer), ("vae", vae)):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
    return root


def test_wan_sizes_are_checked_against_the_transformer_config(tmp_path, capsys):
    from branchgrpo.cli.eval import main as eval_main
    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.testing.wan_tiny import TRANSFORMER_CONFIG

    root = _config_only_checkpoint(tmp_path / "wan", dict(TRANSFORMER_CONFIG),
                                   {"z_dim": 16, "scale_factor_temporal": 4, "scale_factor_spatial": 8})
    config = root / "transformer" / "config.json"

    def check(**sizes):
        ModelConfig.for_backbone("wan", str(root), **sizes).validate()

    check(h=480, w=512, num_frames=33)  # 30 x 32 patches, 9 latent frames: within rope_max_seq_len 32
    with pytest.raises(ValueError, match=r"--w: 832 px are 52 patches of 16 px, more than the 32 rotary positions "
                                         rf"\(rope_max_seq_len of {config}\); this checkpoint takes --w up to 512"):
        check()  # the launcher's default 480x832
    with pytest.raises(ValueError, match=r"--num_frames: 129 frames are 33 temporal patches, .* at most 125"):
        check(h=32, w=32, num_frames=129)
    with pytest.raises(ValueError, match="--num_frames: 6 is not of the form 4k"):
        check(h=32, w=32, num_frames=6)
    # the eval CLI checks before it loads anything (this folder has no weights at all)
    assert eval_main(["--model", "wan", "--pretrained_model_name_or_path", str(root), "--output_dir",
                      str(tmp_path / "e")]) == 2
    assert "--w: 832 px are 52 patches" in one_error_line(capsys.readouterr().err)


def test_flux_sizes_and_channels_are_checked_against_the_configs(tmp_path):
    from branchgrpo.config.sections import ModelConfig
    from branchgrpo.testing.flux_tiny import TRANSFORMER_CONFIG

    root = _config_only_checkpoint(tmp_path / "flux", dict(TRANSFORMER_CONFIG),
                                   {"block_out_channels": [8] * 5, "latent_channels": 16})  # a 16x VAE

    def check(**sizes):
        ModelConfig.for_backbone("flux", str(root), **sizes).validate()

    check(h=64, w=96)
    with pytest.raises(ValueError, match=r"--w: 48 is not a multiple of 32: the VAE .* downsamples 16x"):
        check(h=64, w=48)
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8] * 4, "latent_channels": 4}))
    with pytest.raises(ValueError, match="takes 64 packed channels, but the VAE has 4 latent channels"):
        check(h=64, w=48)
    (root / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"transformer[/\\]config\.json: not valid JSON"):
        check(h=64, w=64)


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory):
    from branchgrpo.cli.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_backbones")
    make_tiny("flux", str(root / "flux"))
    make_tiny("wan", str(root / "wan"))
    return root


def _load(backbone: str, root: Path):
    if backbone == "flux":
        from branchgrpo.models.flux import load_flux

        return load_flux(str(root), "cpu", height=32, width=32)
    from branchgrpo.models.wan import load_wan

    return load_wan(str(root), "cpu", height=32, width=32, num_frames=5)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["flux", "wan"])
def test_corrupt_checkpoint_files_are_named_by_the_loader(tiny_backbones, tmp_path, backbone):
    good = tiny_backbones / backbone
    assert _load(backbone, good).transformer is not None

    corrupt = variant(good, tmp_path, "corrupt_config")
    (corrupt / "transformer" / "config.json").write_text('{"_class_name": "Tr')
    with pytest.raises(ValueError, match=r"transformer[/\\]config\.json: not valid JSON"):
        _load(backbone, corrupt)

    for name, cut in (("truncated_header", lambda data: data[:100]), ("truncated", lambda data: data[:len(data) // 2])):
        truncated = variant(good, tmp_path, name)
        weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: cannot be read .*truncated"):
            _load(backbone, truncated)

    vae = variant(good, tmp_path, "corrupt_vae_weights")  # the VAE: diffusers' own error, in one line
    weights = vae / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"vae: cannot load the .* VAE \(.*\); expected a diffusers AutoencoderKL"):
        _load(backbone, vae)

    # a config that does not describe the weights: diffusers would fill the extra block with random weights
    deeper = variant(good, tmp_path, "deeper")
    config = json.loads((deeper / "transformer" / "config.json").read_text())
    key = "num_layers"
    config[key] += 1
    (deeper / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as caught:
        _load(backbone, deeper)
    message = str(caught.value)
    assert "\n" not in message and "transformer (its weights) does not match the" in message
    assert "keys missing" in message and "0 unexpected" in message and "same checkpoint or export" in message


@pytest.mark.slow
def test_wan_default_size_on_the_tiny_checkpoint_fails_before_loading(tiny_backbones):
    from branchgrpo.models.wan import load_wan

    with pytest.raises(ValueError, match=r"--w: 832 px are 52 patches .*rope_max_seq_len"):
        load_wan(str(tiny_backbones / "wan"), "cpu", height=480, width=832, num_frames=33)


# ----- item 8: under torchrun the failing rank's error ends the output ---------------------------------------------

FAILING_MODULE = '''
import os, sys
if os.environ.get("RANK", "0") == "1":
    if sys.argv[1] == "message":
        print("error: --flag: bad value on rank 1", file=sys.stderr)
        sys.exit(2)
    raise RuntimeError("boom on rank 1")
print("rank", os.environ.get("RANK", "0"), "done")
'''


def _bg_launch(tmp_path: Path, nproc: int, mode: str) -> subprocess.CompletedProcess:
    (tmp_path / "failing_rank.py").write_text(FAILING_MODULE)
    script = (f'set -euo pipefail; REPO_ROOT="{REPO}"; source "$REPO_ROOT/scripts/lib/common.sh"; '
              f'PY="{sys.executable}"; bg_launch failing_rank {mode}')
    env = dict(os.environ, NPROC=str(nproc), MASTER_PORT=str(free_port()), LOG_DIR=str(tmp_path / "logs"),
               PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode,last_line", [("message", "error: --flag: bad value on rank 1"),
                                            ("traceback", "RuntimeError: boom on rank 1")])
def test_torchrun_failure_ends_with_the_failing_ranks_first_error_line(tmp_path, mode, last_line):
    proc = _bg_launch(tmp_path, 2, mode)
    assert proc.returncode == 1  # torchrun's, as before
    lines = proc.stderr.strip().splitlines()
    assert "ChildFailedError" in proc.stderr  # torchrun's report is still there, above
    assert lines[-1] == last_line, proc.stderr[-3000:]
    log = tmp_path / "logs" / lines[-2].split("its full log: ")[1]
    assert lines[-2].startswith("[bg_launch] rank 1 failed first; its full log: ") and log.is_file()
    assert last_line in log.read_text() and f"[rank 1]: {last_line}" in proc.stderr


@pytest.mark.slow
def test_single_process_launch_prints_as_before(tmp_path):
    proc = _bg_launch(tmp_path, 1, "message")  # NPROC=1: plain python, rank 0's output, nothing added
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "rank 0 done\n", "")
    assert not (tmp_path / "logs").exists()

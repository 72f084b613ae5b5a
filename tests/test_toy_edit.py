"""The edit toy: instruction grammar, exact edits of real digits, the edit reward on real computed values (and the
two known hacks), the source-conditioned network and its backbone unit, and one short training run."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.models import get_backbone
from branchgrpo.models.spec import SOURCE_IMAGE_KEY
from branchgrpo.models.toy_edit import ToyEditAdapter, build_edit_encoder, source_pixels
from branchgrpo.models.toy import load_toy
from branchgrpo.rewards.base import build_reward
from branchgrpo.toy import data, edit

ATTRIBUTE_EDITS = [i for i in edit.all_instructions() if not i.is_class_edit]


@pytest.fixture(scope="module")
def held_out():
    """Held-out real digits (never pretraining sources), quantised as stored sources are."""
    images, labels = data.load_real_digits()
    _, held = data.holdout_split(len(labels))
    return edit.quantise(images[held]), labels[held]


@pytest.fixture(scope="module")
def reward():
    return build_reward("toy_edit")


def as_source(images):
    return {SOURCE_IMAGE_KEY: (images * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)}


def test_instruction_grammar_round_trip_and_refusals():
    for instruction in edit.all_instructions():
        assert edit.parse_instruction(edit.render_instruction(instruction)) == instruction
    assert edit.parse_instruction("Turn it into an eight.") == edit.Instruction(digit=8)
    for bad in ("make it purple", "turn it into seven", "make it bolder please", ""):
        with pytest.raises(ValueError, match="toy edit instruction"):
            edit.parse_instruction(bad)


@pytest.mark.parametrize("instruction", ATTRIBUTE_EDITS, ids=edit.render_instruction)
def test_exact_edits_move_the_asked_attribute_of_every_real_digit(held_out, instruction):
    images, _ = held_out
    before = data.measure_attributes(images)[instruction.axis]
    after = data.measure_attributes(edit.attribute_edit(images, instruction.axis, instruction.sign))[instruction.axis]
    assert (instruction.sign * (after - before) > 0).all()


def test_nearest_in_style_picks_the_asked_class_and_the_closest_style(held_out):
    images, labels = held_out
    digit = (labels + 1) % 10
    picked = edit.nearest_in_style(images[:20], images, labels, digit[:20])
    assert torch.equal(labels[picked], digit[:20])
    style = edit.style_vectors(images)
    for n in range(20):
        same_class = (labels == digit[n]).nonzero()[:, 0]
        distances = (style[same_class] - style[n]).norm(dim=1)
        assert distances.min() == pytest.approx((style[picked[n]] - style[n]).norm().item(), abs=1e-5)


@pytest.mark.parametrize("instruction", ATTRIBUTE_EDITS, ids=edit.render_instruction)
def test_reward_scores_the_exact_edit_high_and_both_hacks_low(reward, held_out, instruction):
    images, _ = held_out
    prompts = [edit.render_instruction(instruction)] * len(images)
    cond = as_source(images)
    target = edit.attribute_edit(images, instruction.axis, instruction.sign)
    overdone = target
    for _ in range(3):
        overdone = edit.attribute_edit(overdone, instruction.axis, instruction.sign)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    assert reward(target, prompts, cond).mean() > 0.75
    assert reward(images, prompts, cond).max() == 0.0  # the source returned unchanged: no edit
    assert reward(overdone, prompts, cond).mean() < 0.4  # over-edited
    assert reward(torch.zeros_like(images), prompts, cond).max() < 0.05
    assert reward(noise, prompts, cond).max() < 0.05


def test_reward_of_class_edits(reward, held_out):
    images, labels = held_out
    pool, pool_labels = edit.quantise(data.load_real_digits()[0]), data.load_real_digits()[1]
    digit = (labels + 3) % 10
    prompts = [edit.render_instruction(edit.Instruction(digit=int(d))) for d in digit]
    cond = as_source(images)
    target = pool[edit.nearest_in_style(images, pool, pool_labels, digit)]
    assert reward(target, prompts, cond).mean() > 0.7
    assert reward(images, prompts, cond).mean() < 0.05  # unchanged: still the source's digit
    assert reward(torch.zeros_like(images), prompts, cond).mean() < 0.05
    parts = reward.components(target, prompts, cond)
    assert set(parts) == {"toy_edit", "edit_done", "class_kept", "style_kept", "pixels_kept"}
    assert torch.equal(parts["class_kept"], torch.ones(len(images)))


def test_reward_needs_the_source(reward, held_out):
    images, _ = held_out
    with pytest.raises(ValueError, match="conditions\\['source_image'\\]"):
        reward(images[:2], ["make it bolder"] * 2)
    with pytest.raises(ValueError, match="toy edit instruction"):
        reward(images[:1], ["make it purple"], as_source(images[:1]))


def test_network_without_cond_channels_refuses_a_condition_and_vice_versa():
    from branchgrpo.toy.network import FlowConfig, ToyFlowTransformer

    x, sigmas = torch.zeros(2, 1, 8, 8), torch.ones(2)
    text, pooled = torch.zeros(2, 3, 32), torch.zeros(2, 32)
    with pytest.raises(ValueError, match="cond_channels is 0"):
        ToyFlowTransformer(FlowConfig())(x, sigmas, text, pooled, x)
    with pytest.raises(ValueError, match="cond_channels is 1"):
        ToyFlowTransformer(FlowConfig(cond_channels=1))(x, sigmas, text, pooled)


@pytest.fixture(scope="module")
def edits():
    """The shipped held-out edits through the backbone's own encoder."""
    from branchgrpo.data.preprocess import read_prompts

    spec = get_backbone("toy_edit")
    records = read_prompts(edit.eval_edits_path(), spec.prompt_format, image_size=spec.image_size(None)).items
    return records, spec.prompt_encoder(None, "cpu")(records)


def test_encoder_stores_the_real_source_digit(edits):
    records, cond = edits
    images, _ = data.load_real_digits()
    index = [int(r.image.stem) for r in records]
    assert cond[SOURCE_IMAGE_KEY].dtype == torch.uint8 and cond[SOURCE_IMAGE_KEY].shape == (len(records), 3, 8, 8)
    assert torch.equal(source_pixels(cond[SOURCE_IMAGE_KEY]), edit.quantise(images[index]))
    assert cond["prompt_embeds"].shape[:1] == cond["pooled_prompt_embeds"].shape[:1] == (len(records),)


def test_velocity_reads_the_source_and_is_batch_invariant(edits):
    _, cond = edits
    adapter = load_toy(None, "cpu", ToyEditAdapter)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(cond["prompt_embeds"]), 1, 8, 8, generator=gen)
    sigmas = torch.rand(len(x), generator=gen)
    with torch.no_grad():
        v = adapter.velocity(x, sigmas, cond)
        single = adapter.velocity(x[:1], sigmas[:1], {k: t[:1] for k, t in cond.items()})
        other = {**cond, SOURCE_IMAGE_KEY: cond[SOURCE_IMAGE_KEY].flip(0)}
        moved = adapter.velocity(x, sigmas, other)
    assert torch.equal(v[:1], single)
    assert (moved - v).abs().flatten(1).amax(1).min() > 1e-3  # every sample's velocity depends on its source


def test_shipped_base_edits_but_leaves_room(reward, edits):
    """The shipped base follows instructions in part (the pretraining report's held-out reward), measured here."""
    from branchgrpo.runtime.pretrain_toy import sample_latents
    from branchgrpo.core import sde

    records, cond = edits
    adapter = load_toy(None, "cpu", ToyEditAdapter)
    noise = torch.randn(len(records), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = adapter.decode(sample_latents(adapter, cond, noise, sde.make_sigmas(10, shift=3.0)))
    scores = reward(images, [r.text for r in records], cond)
    unchanged = reward(source_pixels(cond[SOURCE_IMAGE_KEY]), [r.text for r in records], cond)
    assert 0.15 < scores.mean() < 0.85 and unchanged.mean() < 0.05


@pytest.mark.slow  # a training run (in this process; about a second per iteration)
def test_branchgrpo_trains_the_edit_toy_with_the_source_at_every_node(tmp_path):
    """Two BranchGRPO iterations through the real preprocess step and trainer: every trainable weight moves, and the
    rewards the trainer logs are the edit reward of leaves conditioned on their own sources (not 0: the rollouts edit)."""
    from branchgrpo.data.preprocess import run_preprocess
    from trainer_utils import exported_weights, fast_args, metrics, train

    encode = build_edit_encoder(None, "cpu")
    emb = tuple(run_preprocess(path, tmp_path / part, "toy_edit", encode, shard_size=64, prompt_format="jsonl")
                for path, part in ((edit.train_edits_path(), "train"), (edit.eval_edits_path(), "eval")))
    out = tmp_path / "run"
    summary = train(fast_args(emb, out, model="toy_edit", reward="toy_edit"))
    assert summary["iterations"] == 2
    before = load_toy(None, "cpu", ToyEditAdapter).transformer.state_dict()
    after = exported_weights(out)
    unchanged = [k for k, v in before.items() if torch.equal(after[f"transformer/{k}"], v)]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    entries = metrics(out)
    assert len(entries) == 2 and all(e["first_ratio_min"] == e["first_ratio_max"] == 1.0 for e in entries)
    assert all(0.0 < e["reward_mean"] < 1.0 for e in entries)


def test_edit_grid_rows_are_source_base_and_runs(tmp_path):
    """The docs' before/after grid: one row per model after the sources, all from the same noise (a run equal to
    the base gives the base's row and score)."""
    from PIL import Image

    from branchgrpo.bench.edit_grid import _main, edit_rows

    load_toy(None, "cpu", ToyEditAdapter).export(str(tmp_path / "copy"))
    images, labels = edit_rows({"base": None, "copy": tmp_path / "copy"}, num_edits=3, steps=2, seed=0)
    assert images.shape == (9, 1, 8, 8) and labels[0] == "source"
    assert torch.equal(images[3:6], images[6:9]) and labels[1].split()[1] == labels[2].split()[1]
    _main(["--out", str(tmp_path / "grid.png"), "--num_edits", "3", "--steps", "2", f"copy={tmp_path / 'copy'}"])
    assert Image.open(tmp_path / "grid.png").size[0] == 3 * 8 * 8
    with pytest.raises(ValueError, match="LABEL=FOLDER"):
        _main(["--out", str(tmp_path / "g.png"), "nolabel"])
    with pytest.raises(ValueError, match="one folder per label"):
        _main(["--out", str(tmp_path / "g.png"), f"copy={tmp_path / 'copy'},{tmp_path / 'copy'}"])


def test_edit_breakdown_rows_are_per_instruction_means_of_the_held_out_edits(tmp_path, reward):
    """The per-instruction table: every held-out instruction kind with its sample count, the "all" row the
    count-weighted mean of the rows and the reward's own mean; two runs equal to the base give the base's means
    with a zero interval."""
    from branchgrpo.bench.edit_breakdown import ALL, _main, breakdown, instruction_kind
    from branchgrpo.bench.edit_grid import edit_results, held_out_edits

    load_toy(None, "cpu", ToyEditAdapter).export(str(tmp_path / "copy"))
    result = breakdown({"base": [None], "copies": [tmp_path / "copy"] * 2}, samples=1, steps=2, seed=0)
    counts, base, copies = result["counts"], result["table"]["base"], result["table"]["copies"]
    kinds = {instruction_kind(edit.render_instruction(i)) for i in edit.all_instructions()}
    assert set(counts) == kinds | {ALL} and counts[ALL] == 40 and sum(counts.values()) == 80
    assert sum(base[k][0] * counts[k] for k in kinds) / 40 == pytest.approx(base[ALL][0], abs=1e-6)
    texts, cond = held_out_edits(None, 1)
    noise = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert reward(edit_results(None, cond, noise, 2), texts, cond).mean().item() == pytest.approx(base[ALL][0])
    assert all(copies[k][0] == pytest.approx(base[k][0]) and copies[k][1] == 0.0 for k in counts)
    assert base[ALL][1] is None  # one run: no interval
    _main(["--samples", "1", "--steps", "2", "--out", str(tmp_path / "t.md"), f"copy={tmp_path / 'copy'}"])
    assert (tmp_path / "t.md").read_text().count("\n") == 2 + len(counts)
    with pytest.raises(ValueError, match="given twice"):
        _main([f"base={tmp_path / 'copy'}"])

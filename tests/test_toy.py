"""The embedded toy: grammar, text encoder, flow network (batch invariance), rewards, shipped checkpoint, samples.

CPU, offline, a few seconds in all. Numbers asserted here are properties of real data or of the shipped checkpoint,
with margins well inside what pretraining measured (branchgrpo/toy/assets/pretrain_report.json)."""

from __future__ import annotations

import json

import pytest
import torch

from branchgrpo.models import get_backbone
from branchgrpo.models.base import FlowAdapter, gather_cond
from branchgrpo.models.toy import ToyAdapter, build_prompt_encoder, load_toy
from branchgrpo.toy import data
from branchgrpo.toy.network import ToyBlock
from branchgrpo.runtime.pretrain_toy import CaptionSampler, attribute_labels, sample_images
from branchgrpo.rewards.toy import ToyReward


@pytest.fixture(scope="module")
def adapter() -> ToyAdapter:
    return load_toy()


@pytest.fixture(scope="module")
def reward() -> ToyReward:
    return ToyReward("toy")


@pytest.fixture(scope="module")
def digits():
    return data.load_real_digits()


def _random_inputs(adapter, num, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = data.train_prompts()
    cond = adapter.encode_prompts([prompts[i] for i in torch.randint(len(prompts), (num,), generator=gen)])
    latents = torch.randn(num, *adapter.latent_shape, generator=gen)
    sigmas = torch.rand(num, generator=gen)
    return latents, sigmas, cond


# ----------------------------------------------------------------------------------------------------------------
# Grammar and text encoder
# ----------------------------------------------------------------------------------------------------------------


def test_parse_prompt_and_render_round_trip():
    spec = data.parse_prompt("A thin slanted seven.")
    assert spec.digit == 7 and spec.pole("weight") == -1 and spec.pole("slant") == 1 and spec.pole("width") == 0
    specs = data.all_prompt_specs()
    assert len(specs) == 270 and len(set(specs)) == 270
    assert all(data.parse_prompt(data.render_prompt(s)) == s for s in specs)
    assert data.render_prompt(data.parse_prompt("a upright eight")) == "an upright eight"
    for bad, needle in [("a bold", "names no digit"), ("a seven two", "two digits"), ("a bold thin two", "weight"),
                        ("a fuzzy two", "unknown word 'fuzzy'")]:
        with pytest.raises(ValueError, match=needle):
            data.parse_prompt(bad)


def test_shipped_prompt_lists_are_the_grammar_split():
    train = data.read_prompts(data.train_prompts_path())
    held_out = data.read_prompts(data.eval_prompts_path())
    assert train == data.train_prompts() and held_out == data.eval_prompts()
    assert len(train) == 250 and len(held_out) == 20 and not set(train) & set(held_out)
    assert sorted(data.parse_prompt(p).digit for p in held_out) == sorted(list(range(10)) * 2)


def test_pretraining_captions_are_true_and_never_held_out(digits):
    images, labels = digits
    poles = attribute_labels(images, labels)
    sampler = CaptionSampler(labels, poles, mention_prob=1.0)
    idx = torch.arange(len(labels))
    captions = sampler(idx, torch.Generator().manual_seed(0))
    assert not sampler.held_out[captions].any()
    for i in range(0, len(labels), 7):
        spec = data.parse_prompt(sampler.texts[captions[i]])
        assert spec.digit == labels[i]
        assert all(poles[i, list(data.ATTRIBUTE_AXES).index(axis)] == sign for axis, sign in spec.poles)


def test_encode_shapes_and_unknown_words():
    encode = build_prompt_encoder(None, "cpu", None)
    out = encode(["a bold seven", "an upright two", "a thin narrow slanted nine"])
    assert out["prompt_embeds"].shape == (3, 8, 32) and out["pooled_prompt_embeds"].shape == (3, 32)
    assert out["prompt_embeds"].dtype == torch.float32 and out["pooled_prompt_embeds"].dtype == torch.float32
    assert torch.equal(out["prompt_embeds"][0, 3:], torch.zeros(5, 32))  # padding is zero
    assert not torch.allclose(out["pooled_prompt_embeds"][0], out["pooled_prompt_embeds"][1])
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*vocabulary is: a, an, thin, bold"):
        encode(["a purple seven"])


def test_preprocess_cli_writes_toy_embeddings(tmp_path):
    from branchgrpo.cli import preprocess
    from branchgrpo.data.embeddings import EmbeddingStore

    prompts = ["a bold seven", "an upright two", "a thin wide zero"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    preprocess.main(["--model", "toy", "--prompts", str(tmp_path / "prompts.txt"),
                     "--output_dir", str(tmp_path / "emb"), "--device", "cpu", "--batch_size", "2"])
    store = EmbeddingStore(tmp_path / "emb")
    assert store.model == "toy" and [store.text(i) for i in range(3)] == prompts
    assert store.keys["prompt_embeds"][0] == (8, 32) and store.keys["pooled_prompt_embeds"][0] == (32,)
    expected = build_prompt_encoder(None, "cpu")(prompts)
    batch = store.batch([0, 1, 2])
    assert all(torch.equal(batch[k], expected[k]) for k in ToyAdapter.embedding_keys)


# ----------------------------------------------------------------------------------------------------------------
# Flow network
# ----------------------------------------------------------------------------------------------------------------


def test_adapter_contract(adapter):
    assert isinstance(adapter, FlowAdapter)
    assert adapter.name == "toy" and get_backbone("toy").media == "image" and adapter.latent_shape == (1, 8, 8)
    num_params = sum(p.numel() for p in adapter.transformer.parameters())
    assert num_params < 500_000
    assert all(p.requires_grad for p in adapter.trainable_parameters())
    text_params = {id(p) for p in adapter.text_encoder.parameters()}
    assert not text_params & {id(p) for p in adapter.transformer.parameters()}  # the text encoder is separate
    blocks = adapter.blocks()
    assert len(blocks) == 4 and all(isinstance(b, ToyBlock) for b in blocks)
    linears = adapter.transformer.named_modules()
    names = {name.rsplit(".", 1)[-1] for name, m in linears if isinstance(m, torch.nn.Linear)}
    assert set(adapter.default_lora_targets) <= names
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in adapter.transformer.modules())


def test_velocity_shapes_and_per_sample_sigmas(adapter):
    latents, sigmas, cond = _random_inputs(adapter, 5)
    with torch.no_grad():
        v = adapter.velocity(latents, sigmas, cond)
        assert v.shape == latents.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
        changed = sigmas.clone()
        changed[2] = 1.0 - sigmas[2]
        v2 = adapter.velocity(latents, changed, cond)
    assert not torch.allclose(v[2], v2[2])  # sample 2 sees its own sigma ...
    keep = [0, 1, 3, 4]
    assert torch.equal(v[keep], v2[keep])  # ... and only sample 2 does
    images = adapter.decode(latents)
    assert images.shape == (5, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="sigmas must be"):
        adapter.velocity(latents, sigmas[0], cond)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.slow
def test_velocity_is_bitwise_batch_invariant(adapter, threads):
    """GRPO's first ratio must be exactly 1: a sample's velocity may not depend on its batch (CPU, fp32)."""
    latents, sigmas, cond = _random_inputs(adapter, 64, seed=threads)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            alone = torch.cat([
                adapter.velocity(latents[i : i + 1], sigmas[i : i + 1], gather_cond(cond, torch.tensor([i])))
                for i in range(64)
            ])
        for size in (1, 2, 3, 5, 17, 64):
            idx = torch.randperm(64, generator=torch.Generator().manual_seed(size))[:size]
            with torch.enable_grad():  # training re-scores with autograd on
                v = adapter.velocity(latents[idx], sigmas[idx], gather_cond(cond, idx))
            if not torch.equal(v.detach(), alone[idx]):
                diff = (v.detach() - alone[idx]).abs().max().item()
                pytest.fail(f"{threads} threads: a batch of {size} differs from per-sample results "
                            f"(max |diff| {diff:.2e})")
    finally:
        torch.set_num_threads(old_threads)


def test_export_round_trip_is_bitwise(adapter, tmp_path):
    adapter.export(str(tmp_path / "ckpt"))
    again = load_toy(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(adapter.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(adapter.text_encoder.state_dict().items(), again.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name
    latents, sigmas, cond = _random_inputs(adapter, 3)
    with torch.no_grad():
        assert torch.equal(adapter.velocity(latents, sigmas, cond), again.velocity(latents, sigmas, cond))
    modified = {k: v + 1.0 for k, v in adapter.transformer.state_dict().items()}
    adapter.export(str(tmp_path / "mod"), state_dict=modified)
    assert torch.equal(load_toy(tmp_path / "mod").transformer.proj_out.bias, modified["proj_out.bias"])
    with pytest.raises(ValueError, match="does not match the toy network"):
        adapter.export(str(tmp_path / "bad"), state_dict={"lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(FileNotFoundError):
        load_toy(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------


def test_rewards_are_registered(reward, digits):
    from branchgrpo.rewards import build_reward

    images = digits[0][:6]
    prompts = ["a bold zero", "a one", "a thin two", "a wide three", "an upright four", "a slanted five"]
    scores = {name: build_reward(name, device="cpu")(images, prompts) for name in ("toy", "toy_digit", "toy_style")}
    for name, s in scores.items():
        assert s.shape == (6,) and s.dtype == torch.float32 and (s >= 0).all() and (s <= 1).all(), name
    assert torch.allclose(scores["toy"], scores["toy_digit"] * scores["toy_style"])
    assert scores["toy_style"][1] == 1.0  # nothing asked, nothing missed
    assert build_reward("toy").reward_max == 1.0


def test_classifier_is_accurate_on_held_out_real_digits(reward, digits):
    images, labels = digits
    _, held_out = data.holdout_split(len(labels))
    accuracy = (reward.classifier.predict(images[held_out]) == labels[held_out]).float().mean().item()
    assert accuracy > 0.95


def test_digit_reward_prefers_the_prompted_digit(reward, digits):
    images, labels = digits
    _, held_out = data.holdout_split(len(labels))
    for c in range(10):
        real_c = images[held_out][labels[held_out] == c]
        own = reward.components(real_c, [f"a {data.DIGIT_WORDS[c]}"] * len(real_c))["toy_digit"].mean()
        for other in range(10):
            if other != c:
                wrong = reward.components(real_c, [f"a {data.DIGIT_WORDS[other]}"] * len(real_c))["toy_digit"].mean()
                assert own > wrong + 0.5, (c, other)


@pytest.mark.parametrize("axis", list(data.ATTRIBUTE_AXES))
def test_style_reward_follows_the_measured_attribute(reward, digits, axis):
    """Within each digit class, the top quartile of an attribute scores higher for the high word than the bottom
    quartile, and lower for the low word."""
    images, labels = digits
    low_word, high_word = data.ATTRIBUTE_AXES[axis]
    measured = data.measure_attributes(images)[axis]
    for c in range(10):
        members = torch.nonzero(labels == c)[:, 0]
        order = members[measured[members].argsort()]
        quarter = len(order) // 4
        low, high = images[order[:quarter]], images[order[-quarter:]]

        def style(imgs, word):
            return reward.components(imgs, [f"a {word} {data.DIGIT_WORDS[c]}"] * len(imgs))["toy_style"].mean()

        assert style(high, high_word) > style(low, high_word) + 0.3, (axis, c)
        assert style(low, low_word) > style(high, low_word) + 0.3, (axis, c)


# ----------------------------------------------------------------------------------------------------------------
# The shipped pretrained model
# ----------------------------------------------------------------------------------------------------------------


def test_pretrained_samples_show_the_prompted_digit(adapter, reward):
    prompts = [f"a {word}" for word in data.DIGIT_WORDS]
    images = sample_images(adapter, prompts, samples_per_prompt=4, seed=123, steps=20, shift=3.0, eta=0.0)
    digits = torch.arange(10).repeat_interleave(4)
    accuracy = (reward.classifier.predict(images) == digits).float().mean().item()
    assert accuracy > 0.8  # chance is 0.1; pretraining measured about 0.97


def test_pretrained_samples_follow_the_attribute_words(adapter):
    prompts = ["a bold eight", "a thin eight", "a wide five", "a narrow five"]
    images = sample_images(adapter, prompts, samples_per_prompt=8, seed=7, steps=20, shift=3.0, eta=0.3)
    measured = data.measure_attributes(images)
    ink, width = measured["weight"].view(4, 8).mean(1), measured["width"].view(4, 8).mean(1)
    assert ink[0] > ink[1] and width[2] > width[3]


def test_shipped_report_shows_headroom():
    report = json.loads((data.ASSETS_DIR / "pretrain_report.json").read_text())
    for kind in ("eval_ode", "eval_sde"):
        stats = report["evaluation"][kind]
        assert 0.3 < stats["reward_mean"] < 0.8 and stats["within_prompt_std"] > 0.05
        assert stats["best_of_n_mean"] > stats["reward_mean"] + 0.15

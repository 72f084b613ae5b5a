"""Pretrain the toy from real digits, reproducibly, in a few CPU minutes, and write the checkpoint it ships with.

    python -m branchgrpo.cli.pretrain_toy --out branchgrpo/toy/assets --seed 0    (or bash scripts/pretrain/pretrain_toy.sh)

Three things are fitted, all on sklearn's 1797 real 8x8 digits:
1. the reward's digit classifier (logistic regression on a fixed 80% split; accuracy reported on the other 20%)
   and its attribute ramps (class-wise percentiles of the measured attributes);
2. the text encoder and the flow network, jointly, by flow matching: x_sigma = (1 - sigma) x0 + sigma eps, target
   v = eps - x0, sigma = shift(u) with u uniform and the same static shift as the sampler (the trainer samples
   20 steps at shift 3, so training spends its effort where the sampler's steps are). Each real digit is captioned
   with a random subset of its true attributes (class-wise tertiles: low third -> thin/narrow/upright, high third
   -> bold/wide/slanted, middle -> not mentioned), never with a held-out combination;
3. an evaluation with the trainer's sampler (ODE and dance-SDE) on the held-out prompts: accuracy of the samples as
   judged by the classifier, and the reward headroom GRPO needs (mean, within-prompt std, best-of-N).

Written to --out: the checkpoint (see branchgrpo.models.toy), reward.json + reward_classifier.safetensors, the
prompt lists, and pretrain_report.json with every number above.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from branchgrpo.core import sde
from branchgrpo.models.toy import ToyAdapter
from branchgrpo.toy import data
from branchgrpo.toy.network import FlowConfig, TextEncoderConfig, ToyFlowTransformer, ToyTextEncoder
from branchgrpo.rewards.toy import ToyReward

AXES = tuple(data.ATTRIBUTE_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Reward: classifier + ramps
# ----------------------------------------------------------------------------------------------------------------


def fit_logistic_regression(x_NP: torch.Tensor, y_N: torch.Tensor, c: float, num_classes: int = 10):
    """Multinomial logistic regression, sklearn's objective (C * summed cross-entropy + 0.5 |W|^2, bias not
    penalised), minimised by full-batch L-BFGS in float64: deterministic, a few seconds."""
    x_NP = x_NP.double()
    weight_KP = torch.zeros(num_classes, x_NP.shape[1], dtype=torch.float64, requires_grad=True)
    bias_K = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight_KP, bias_K], lr=1.0, max_iter=300, tolerance_grad=1e-7,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x_NP @ weight_KP.T + bias_K
        loss = c * nn.functional.cross_entropy(logits, y_N, reduction="sum") + 0.5 * weight_KP.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight_KP.detach().float().contiguous(), bias_K.detach().float().contiguous()


def fit_reward(images_N1HW, labels_N, args) -> tuple[dict[str, torch.Tensor], dict]:
    """Logistic regression on the train split + class-wise attribute ramps -> (classifier tensors, reward.json)."""
    train_idx, held_idx = data.holdout_split(len(labels_N))
    x_NP = images_N1HW.flatten(1)
    weight_KP, bias_K = fit_logistic_regression(x_NP[train_idx], labels_N[train_idx], args.classifier_c)

    def acc(idx):
        return ((x_NP[idx] @ weight_KP.T + bias_K).argmax(1) == labels_N[idx]).float().mean().item()

    accuracy = {"train": acc(train_idx), "held_out": acc(held_idx)}
    tensors = {"weight": weight_KP, "bias": bias_K}
    qs = (100.0 - args.ramp_end, args.ramp_start, args.ramp_end)
    pct = data.class_percentiles(images_N1HW, labels_N, qs)
    ramps = {axis: {"low_end": [r[0] for r in pct[axis]], "start": [r[1] for r in pct[axis]],
                    "high_end": [r[2] for r in pct[axis]]} for axis in AXES}
    config = {
        "format": "branchgrpo-toy-reward/1",
        "classifier": {"kind": "multinomial logistic regression on the 64 pixels in [0, 1]", "C": args.classifier_c,
                       "split": "branchgrpo.toy.data.holdout_split(1797): fraction 0.2, seed 0",
                       "accuracy": accuracy},
        "ramp_percentiles": {"start": args.ramp_start, "high_end": args.ramp_end, "low_end": 100.0 - args.ramp_end},
        "ramps": ramps,
    }
    return tensors, config


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def attribute_labels(images_N1HW, labels_N) -> torch.Tensor:
    """`[N, num_axes]` in {-1, 0, +1}: the image's class-wise tertile on each axis (low, middle, high)."""
    measured = data.measure_attributes(images_N1HW)
    tertiles = data.class_percentiles(images_N1HW, labels_N, (100 / 3, 200 / 3))
    out = torch.zeros(len(labels_N), len(AXES), dtype=torch.long)
    for a, axis in enumerate(AXES):
        low_hi = torch.tensor(tertiles[axis], dtype=torch.float32)[labels_N]  # [N, 2]
        out[:, a] = (measured[axis] > low_hi[:, 1]).long() - (measured[axis] < low_hi[:, 0]).long()
    return out


class CaptionSampler:
    """Random true captions as indices into `data.all_prompt_specs()` (index = digit * 27 + sum_a choice_a 3^a,
    choice 0 = not mentioned, 1 = low pole, 2 = high pole), never a held-out prompt."""

    def __init__(self, labels_N, poles_NA, mention_prob: float):
        self.labels_N, self.poles_NA, self.mention_prob = labels_N, poles_NA, mention_prob
        specs = data.all_prompt_specs()
        self.texts = [data.render_prompt(s) for s in specs]
        self.held_out = torch.tensor([data.is_held_out(s) for s in specs])
        self.place_A = torch.tensor([3 ** a for a in range(len(AXES))])

    def __call__(self, idx_B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        poles_BA = self.poles_NA[idx_B]
        mention_BA = torch.rand(poles_BA.shape, generator=gen) < self.mention_prob
        choice_BA = torch.where(mention_BA & (poles_BA != 0), torch.where(poles_BA > 0, 2, 1), 0)
        prompt_B = self.labels_N[idx_B] * 27 + (choice_BA * self.place_A).sum(1)
        # a held-out caption mentions all axes: forget one of them (chosen at random)
        drop_B = torch.randint(len(AXES), (len(idx_B),), generator=gen)
        dropped_B = prompt_B - choice_BA.gather(1, drop_B[:, None])[:, 0] * self.place_A[drop_B]
        return torch.where(self.held_out[prompt_B], dropped_B, prompt_B)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------------------


def train_flow(args, images_N1HW, labels_N, poles_NA) -> tuple[ToyFlowTransformer, ToyTextEncoder, dict]:
    """Jointly train text encoder + flow network; returns their EMA copies and the loss history."""
    torch.manual_seed(args.seed)
    nets = nn.ModuleDict({"flow": ToyFlowTransformer(FlowConfig()), "text": ToyTextEncoder(TextEncoderConfig())})
    captions = CaptionSampler(labels_N, poles_NA, args.mention_prob)
    x0_N1HW = data.images_to_latents(images_N1HW)

    def draw_batch(gen: torch.Generator):
        idx_B = torch.randint(len(labels_N), (args.batch_size,), generator=gen)
        prompt_B = captions(idx_B, gen)
        return x0_N1HW[idx_B], prompt_B, None

    return fit_flow(nets, captions.texts, draw_batch, args)


def fit_flow(nets: nn.ModuleDict, texts: list[str], draw_batch, args) -> tuple[ToyFlowTransformer, ToyTextEncoder,
                                                                             dict]:
    """Flow matching of nets["flow"] and nets["text"] jointly (AdamW, warm-up + cosine, EMA): each step
    `draw_batch(gen)` gives clean latents `[B, 1, 8, 8]`, their prompts (indices into `texts`) and the conditioning
    image latents (None without); returns the EMA copies and the loss history."""
    gen = torch.Generator().manual_seed(args.seed)
    ema = copy.deepcopy(nets).requires_grad_(False)
    ids_PL, mask_PL = nets["text"].tokenizer(texts)
    optimizer = torch.optim.AdamW(nets.parameters(), lr=args.lr, weight_decay=0.0)
    params, ema_params = list(nets.parameters()), list(ema.parameters())
    history, window, start = [], [], time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, prompt_B, cond_latents = draw_batch(gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma_B = sde.static_shift(torch.rand(args.batch_size, generator=gen), args.train_shift)
        x_sigma = (1 - sigma_B.view(-1, 1, 1, 1)) * x0 + sigma_B.view(-1, 1, 1, 1) * eps
        embeds_PLD, pooled_PD = nets["text"](ids_PL, mask_PL)  # every prompt: cheaper than per-sample
        v = nets["flow"](x_sigma, sigma_B, embeds_PLD[prompt_B], pooled_PD[prompt_B], cond_latents)
        loss = (v - (eps - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "loss": sum(window) / len(window), "lr": lr,
                            "elapsed_s": round(time.time() - start, 1)})
            print(f"step {step + 1:5d}  loss {history[-1]['loss']:.4f}  lr {lr:.2e}  {time.time() - start:.0f}s",
                  flush=True)
            window = []
    metrics = {"loss_history": history, "final_loss": history[-1]["loss"], "train_time_s": time.time() - start}
    return ema["flow"].requires_grad_(True).eval(), ema["text"].eval(), metrics


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation (the trainer's sampler: sde.make_sigmas, sde.ode_step, sde.sde_step)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_latents(adapter: ToyAdapter, cond: dict, noise_B1HW, sigmas, eta: float = 0.0, gen=None) -> torch.Tensor:
    """Euler ODE (eta = 0) or dance SDE from `noise`; the last step (to sigma = 0) is always the ODE step."""
    kernel = sde.Kernel("dance", eta)
    x = noise_B1HW.float()
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = adapter.velocity(x, torch.full((x.shape[0],), sigma), cond)
        if eta == 0.0 or i == num_steps - 1:
            x = sde.ode_step(x, v, sigma, sigma_next)
        else:
            x = sde.sde_step(x, v, sigma, sigma_next, kernel, noise=torch.randn(x.shape, generator=gen)).sample
    return x


def sample_images(adapter, prompts, samples_per_prompt, seed, steps=20, shift=3.0, eta=0.0) -> torch.Tensor:
    """`[P * S, 1, 8, 8]` images in [0, 1], prompt-major (rows p*S .. p*S+S-1 belong to prompts[p])."""
    gen = torch.Generator().manual_seed(seed)
    cond = adapter.encode_prompts(list(prompts))
    cond = {k: v.repeat_interleave(samples_per_prompt, dim=0) for k, v in cond.items()}
    noise = torch.randn(len(prompts) * samples_per_prompt, *adapter.latent_shape, generator=gen)
    return adapter.decode(sample_latents(adapter, cond, noise, sde.make_sigmas(steps, shift=shift), eta, gen))


def headroom(adapter, reward: ToyReward, prompts, num_samples, seed, steps, shift, eta) -> dict:
    """Reward statistics of `num_samples` samples per prompt: what GRPO has to learn from."""
    images = sample_images(adapter, prompts, num_samples, seed, steps, shift, eta)
    expanded = [p for p in prompts for _ in range(num_samples)]
    scores = reward.components(images, expanded)
    toy_PS = scores["toy"].view(len(prompts), num_samples)
    digits = torch.tensor([data.parse_prompt(p).digit for p in expanded])
    return {
        "reward_mean": toy_PS.mean().item(),
        "within_prompt_std": toy_PS.std(dim=1).mean().item(),
        "best_of_n_mean": toy_PS.max(dim=1).values.mean().item(),
        "worst_of_n_mean": toy_PS.min(dim=1).values.mean().item(),
        "digit_prob_mean": scores["toy_digit"].mean().item(),
        "style_mean": scores["toy_style"].mean().item(),
        "sample_accuracy": (reward.classifier.predict(images) == digits).float().mean().item(),
    }


def evaluate(adapter, reward, args) -> dict:
    report = {}
    for split, prompts, n in (("eval", data.eval_prompts(), args.eval_samples), ("train", data.train_prompts(), 4)):
        for name, eta in (("ode", 0.0), ("sde", args.eval_eta)):
            stats = headroom(adapter, reward, prompts, n, args.seed + 1, args.eval_steps, args.eval_shift, eta)
            report[f"{split}_{name}"] = {k: round(v, 4) for k, v in stats.items()}
            print(f"{split:5s} {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    return report


def speed(adapter: ToyAdapter, batch_size: int = 256, repeats: int = 10) -> dict:
    """Median milliseconds of one velocity forward (no grad) and forward+backward at `batch_size`."""
    gen = torch.Generator().manual_seed(0)
    cond = adapter.encode_prompts(data.train_prompts()[:batch_size])
    cond = {k: v[torch.arange(batch_size) % v.shape[0]] for k, v in cond.items()}
    x = torch.randn(batch_size, *adapter.latent_shape, generator=gen)
    sigmas = torch.rand(batch_size, generator=gen)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(1000 * sorted(times)[len(times) // 2], 1)

    with torch.no_grad():
        forward_ms = median_ms(lambda: adapter.velocity(x, sigmas, cond))
    backward_ms = median_ms(lambda: adapter.velocity(x, sigmas, cond).square().mean().backward())
    adapter.transformer.zero_grad(set_to_none=True)
    return {"forward_ms": forward_ms, "forward_backward_ms": backward_ms}


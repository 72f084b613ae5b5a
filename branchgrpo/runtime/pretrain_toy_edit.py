"""Pretrain the edit toy (models/toy_edit.py) from real digits and write what it ships with:

    python -m branchgrpo.cli.pretrain_toy --task edit --out branchgrpo/toy/edit_assets --seed 0 --steps 600

1. Pairs (toy/edit.py), all from sklearn's real digits, sources quantised to uint8 as stored: an attribute edit's
   target is the exact transform of the source; a class edit's is the real digit of the asked class nearest in
   style. Sources come from the toy's fixed 80% split (data.holdout_split); the held-out 20% give the evaluation
   sources, so evaluation edits digits the model never saw.
2. The reward's thresholds (rewards/toy_edit.py `fit_reward_config`), measured on the exact edits of the training
   sources -> reward_edit.json.
3. Text encoder + flow network (cond_channels 1: the source latents join the noisy latents per patch), trained
   jointly by flow matching, half attribute edits and half class edits, for deliberately few steps: the base
   follows instructions only partly, which leaves GRPO room (pretrain_report.json: its reward on the held-out
   edits, ODE and SDE, with the within-prompt spread GRPO learns from).
4. The built-in prompt lists (JSONL + the source PNGs they name).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from branchgrpo.models.spec import SOURCE_IMAGE_KEY
from branchgrpo.models.toy_edit import ToyEditAdapter
from branchgrpo.rewards.toy_edit import CLASS_EDIT, REWARD_CONFIG, ToyEditReward, edit_changes, fit_reward_config
from branchgrpo.runtime.pretrain_toy import fit_flow, sample_latents
from branchgrpo.core import sde
from branchgrpo.toy import data, edit
from branchgrpo.toy.network import FlowConfig, TextEncoderConfig, ToyFlowTransformer, ToyTextEncoder

SOURCES_PER_CLASS = (8, 2)  # sources per digit class in the built-in (train, eval) prompt lists
CLASS_EDITS_PER_SOURCE = 3  # train list: class edits per source (to other digits), besides its 6 attribute edits


class EditPairs:
    """Every training pair's target, precomputed: `targets[i, n]` for instruction i of all_instructions() and
    training source n (a class edit to the source's own class is never drawn)."""

    def __init__(self, sources_N1HW: torch.Tensor, labels_N: torch.Tensor):
        self.sources, self.labels = sources_N1HW, labels_N
        self.instructions = edit.all_instructions()
        self.num_attribute_edits = sum(not i.is_class_edit for i in self.instructions)
        nearest_ND = torch.stack([edit.nearest_in_style(sources_N1HW, sources_N1HW, labels_N,
                                                        torch.full_like(labels_N, d)) for d in range(10)], dim=1)
        attribute = [edit.attribute_edit(sources_N1HW, i.axis, i.sign) for i in self.instructions
                     if not i.is_class_edit]
        classes = [sources_N1HW[nearest_ND[:, d]] for d in range(10)]
        self.targets = torch.stack(attribute + classes)  # [16, N, 1, 8, 8]

    def reward_changes(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the exact edits change (rewards/toy_edit.py `edit_changes`), per instruction key."""
        changes = {edit.render_instruction(i): edit_changes(self.targets[k], self.sources)
                   for k, i in enumerate(self.instructions[: self.num_attribute_edits])}
        other = torch.arange(10)[None] != self.labels[:, None]  # [N, 10]: class edits that change the class
        n_idx, digit_idx = other.nonzero(as_tuple=True)
        changes[CLASS_EDIT] = edit_changes(self.targets[self.num_attribute_edits + digit_idx, n_idx],
                                           self.sources[n_idx])
        return changes

    def draw(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target latents, instruction indices, source latents) of `batch_size` random pairs: half attribute edits,
        half class edits to another digit."""
        n_B = torch.randint(len(self.labels), (batch_size,), generator=gen)
        attribute_B = torch.randint(self.num_attribute_edits, (batch_size,), generator=gen)
        other_digit_B = (self.labels[n_B] + 1 + torch.randint(9, (batch_size,), generator=gen)) % 10
        is_class_B = torch.rand(batch_size, generator=gen) < 0.5
        instruction_B = torch.where(is_class_B, self.num_attribute_edits + other_digit_B, attribute_B)
        x0 = data.images_to_latents(self.targets[instruction_B, n_B])
        return x0, instruction_B, data.images_to_latents(self.sources[n_B])


def builtin_edits(labels_N: torch.Tensor, indices_N: torch.Tensor, per_class: int, train: bool) -> list[tuple]:
    """(instruction text, digit index) lines of a built-in list: the first `per_class` digits of each class among
    `indices_N`; train: each with its 6 attribute edits and CLASS_EDITS_PER_SOURCE class edits; eval: one
    attribute edit and one class edit each, cycling through the instructions."""
    lines, instructions = [], edit.all_instructions()
    attribute = [i for i in instructions if not i.is_class_edit]
    for digit in range(10):
        chosen = indices_N[labels_N[indices_N] == digit][:per_class].tolist()
        for k, index in enumerate(chosen):
            if train:
                picks = attribute + [edit.Instruction(digit=(digit + 1 + 3 * j + k) % 10)
                                     for j in range(CLASS_EDITS_PER_SOURCE)]
            else:
                step = digit * per_class + k
                picks = [attribute[step % len(attribute)], edit.Instruction(digit=(digit + 1 + step % 9) % 10)]
            lines += [(edit.render_instruction(i), index) for i in picks]
    return lines


def write_builtin_prompts(out, images_N1HW, labels_N, train_idx, held_idx) -> None:
    for name, indices, per_class, train in ((edit.TRAIN_EDITS_FILE, train_idx, SOURCES_PER_CLASS[0], True),
                                            (edit.EVAL_EDITS_FILE, held_idx, SOURCES_PER_CLASS[1], False)):
        lines = builtin_edits(labels_N, indices, per_class, train)
        edit.write_edit_prompts(out / name, lines)
        for index in sorted({i for _, i in lines}):
            edit.write_source_png(images_N1HW[index], out / edit.SOURCES_DIR / f"{index:04d}.png")


@torch.no_grad()
def evaluate_edits(adapter: ToyEditAdapter, reward: ToyEditReward, out, args) -> dict:
    """Reward statistics of the base on the built-in held-out edits (`eval_samples` samples each, ODE and SDE)."""
    from branchgrpo.data.preprocess import read_prompts
    from branchgrpo.models.toy_edit import build_edit_encoder

    records = read_prompts(out / edit.EVAL_EDITS_FILE, "jsonl").items
    cond = build_edit_encoder(out, "cpu")(records)
    n = args.eval_samples
    cond = {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}
    texts = [r.text for r in records for _ in range(n)]
    report = {}
    for name, eta in (("ode", 0.0), ("sde", args.eval_eta)):
        gen = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn(len(texts), *adapter.latent_shape, generator=gen)
        latents = sample_latents(adapter, cond, noise, sde.make_sigmas(args.eval_steps, shift=args.eval_shift), eta,
                                 gen)
        scores = reward.components(adapter.decode(latents), texts, {SOURCE_IMAGE_KEY: cond[SOURCE_IMAGE_KEY]})
        total_PS = scores["toy_edit"].view(len(records), n)
        stats = {"reward_mean": total_PS.mean().item(), "within_prompt_std": total_PS.std(dim=1).mean().item(),
                 "best_of_n_mean": total_PS.max(dim=1).values.mean().item(),
                 **{f"{k}_mean": v.mean().item() for k, v in scores.items() if k != "toy_edit"}}
        report[f"eval_{name}"] = {k: round(v, 4) for k, v in stats.items()}
        print(f"eval {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    return report


def pretrain_edit(args, out) -> dict:
    """Everything of the module docstring into `out`; returns the report (also written)."""
    start = time.time()
    images_N1HW, labels_N = data.load_real_digits()
    images_N1HW = edit.quantise(images_N1HW)
    train_idx, held_idx = data.holdout_split(len(labels_N))
    pairs = EditPairs(images_N1HW[train_idx], labels_N[train_idx])
    spread = {axis: values.std().item() for axis, values in data.measure_attributes(pairs.sources).items()}
    thresholds = fit_reward_config(pairs.reward_changes(), spread)
    (out / REWARD_CONFIG).write_text(json.dumps({"format": "branchgrpo-toy-edit-reward/1", "thresholds": thresholds},
                                                indent=1) + "\n")
    write_builtin_prompts(out, images_N1HW, labels_N, train_idx, held_idx)

    texts = [edit.render_instruction(i) for i in pairs.instructions]
    torch.manual_seed(args.seed)
    nets = nn.ModuleDict({"flow": ToyFlowTransformer(FlowConfig(cond_channels=1)),
                          "text": ToyTextEncoder(TextEncoderConfig(vocab_size=len(edit.EDIT_VOCAB)), edit.EDIT_VOCAB)})
    flow, text, train_metrics = fit_flow(nets, texts, lambda gen: pairs.draw(args.batch_size, gen), args)
    adapter = ToyEditAdapter(flow, text)
    adapter.export(str(out))
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("mention_prob", "ramp_start", "ramp_end",
                                                                         "classifier_c")},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "num_params": sum(p.numel() for p in flow.parameters()),
              "num_text_encoder_params": sum(p.numel() for p in text.parameters()),
              "num_training_sources": len(train_idx), **train_metrics}
    report["evaluation"] = evaluate_edits(adapter, ToyEditReward(out), out, args)
    report["total_time_s"] = round(time.time() - start, 1)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report

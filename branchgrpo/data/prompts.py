"""Which prompts each rank trains on, iteration by iteration, resumably.

Every iteration consumes `world_size * batch_size` prompts of an epoch permutation (seeded by (seed, epoch)); rank r
takes its slice. An epoch's tail too short for a full iteration is skipped, so every rank always gets a full batch
(equal shapes keep the collectives of DDP/FSDP in step). The state is two integers (epoch, offset).

Each sampled prompt also gets a `key`: its global sample number since the start of training, unique across ranks
and iterations, which seeds that prompt's rollout noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchgrpo.data.embeddings import EmbeddingStore
from branchgrpo.core.seeding import keyed_permutation, mix_key


@dataclass
class PromptBatch:
    indices: list[int]  # rows of the embedding store
    keys: tuple[int, ...]  # noise keys (global sample numbers)
    texts: list[str]
    embeddings: dict[str, torch.Tensor]  # {key: [B, ...]} on the CPU, as stored


class PromptSampler:
    def __init__(self, store: EmbeddingStore, batch_size: int, rank: int, world_size: int, seed: int):
        self.store, self.batch_size, self.rank, self.world_size, self.seed = store, batch_size, rank, world_size, seed
        self.per_iteration = batch_size * world_size
        if len(store) < self.per_iteration:
            raise ValueError(
                f"--data_json_path: {len(store)} prompts cannot fill one iteration of --train_batch_size "
                f"{batch_size} x {world_size} processes"
            )
        self.epoch, self.offset, self.consumed = 0, 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        return keyed_permutation(len(self.store), mix_key(self.seed, "prompt-order", epoch))

    def next_batch(self) -> PromptBatch:
        if self.offset + self.per_iteration > len(self.store):
            self.epoch, self.offset = self.epoch + 1, 0
        order = self._order(self.epoch)
        start = self.offset + self.rank * self.batch_size
        indices = order[start : start + self.batch_size].tolist()
        keys = tuple(self.consumed + self.rank * self.batch_size + j for j in range(self.batch_size))
        self.offset += self.per_iteration
        self.consumed += self.per_iteration
        return PromptBatch(indices, keys, [self.store.text(i) for i in indices], self.store.batch(indices))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "consumed": self.consumed,
                "num_prompts": len(self.store), "per_iteration": self.per_iteration, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_prompts"], state["seed"]) != (len(self.store), self.seed):
            raise ValueError(
                f"resume: the prompt set or --sampler_seed changed since the checkpoint "
                f"({state['num_prompts']} prompts, seed {state['seed']} -> {len(self.store)}, {self.seed})"
            )
        if state["per_iteration"] != self.per_iteration:
            raise ValueError(
                f"resume: prompts per iteration changed ({state['per_iteration']} -> {self.per_iteration}); resume "
                "with the same --train_batch_size and number of processes"
            )
        self.epoch, self.offset, self.consumed = state["epoch"], state["offset"], state["consumed"]


def eval_prompts(store: EmbeddingStore, num_prompts: int, samples_per_prompt: int, rank: int, world_size: int):
    """The fixed evaluation set: the first `num_prompts` prompts x `samples_per_prompt` seeds, split evenly over
    ranks (padded by repeating the last sample so every rank runs the same number of forwards; padding is
    flagged and excluded from scores). Returns (rows, sample ids, is_padding) for this rank."""
    num_prompts = min(num_prompts, len(store))
    samples = [(p, s) for p in range(num_prompts) for s in range(samples_per_prompt)]
    per_rank = -(-len(samples) // world_size)
    padded = samples + [samples[-1]] * (per_rank * world_size - len(samples))
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    is_pad = [rank * per_rank + i >= len(samples) for i in range(len(mine))]
    return [p for p, _ in mine], [p * samples_per_prompt + s for p, s in mine], is_pad

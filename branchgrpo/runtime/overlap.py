"""Scoring that overlaps the rollout (--overlap_scoring, --overlap_chunks).

Sequentially, an iteration rolls out all its prompts, then decodes and scores their leaves: the transformer idles
while a reward server works, and the other way round. Overlapped, the batch's prompts are rolled out in
--overlap_chunks chunks of near-equal size, one after the other; the leaves of each finished chunk are decoded and scored on a worker
thread while the next chunk is rolled out (for a remote reward: its requests are in flight while the transformer
works), and the chunks' graphs are joined into the batch's graph (`core.graph.concat_graphs`).

Same results as sequential scoring: a prompt's rollout depends on its own noise keys only (core.rollout), the
leaves come out in the same prompt-major order, and they are scored in the same batches of --reward_batch_size
(`LeafScorer` cuts the stream of finished leaves where sequential scoring cuts the whole list), so every reward
model sees the same inputs - bitwise the same rewards on CPU, where the velocity of a row does not depend on the
other rows of its batch. With K chunks the wait for the last chunk's scores is about 1/K of the scoring time, but
smaller rollout batches cost transformer throughput (and, on CPU, the scoring thread's Python work competes with the
rollout's): K trades one against the other (docs/benchmarks.md measures it). On with "auto" only when a reward scores in another process (`RewardSet.out_of_process`):
in-process rewards share the device and the cores with the rollout, so there is little to overlap.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from branchgrpo.core.graph import RolloutGraph, concat_graphs

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
# (latents [n, ...], prompts, conditions {key: [n, ...]}) -> ({reward: [n]}, media [n, ...]): one reward batch
ScoreBatch = Callable[[torch.Tensor, Sequence[str], dict], tuple[dict[str, torch.Tensor], torch.Tensor]]


def overlap_chunks(mode: str, num_chunks: int, out_of_process: bool, separable: bool, is_main: bool) -> int:
    """Chunks of prompts rolled out in turn, 0 for sequential scoring. `separable`: the algorithm's rollout of a batch is its
    prompts' rollouts side by side (else chunks would change it: "on" is refused, "auto" stays sequential)."""
    if mode not in MODES:
        raise ValueError(f"--overlap_scoring: expected one of {', '.join(MODES)}, got '{mode}'")
    if mode == "off" or (mode == "auto" and not out_of_process):
        return 0
    if not separable:
        if mode == "on":
            raise ValueError("--overlap_scoring on: this algorithm's rollout couples the batch's prompts (dynamic "
                             "branching), so chunks of prompts cannot be rolled out alone; use off or auto")
        return 0
    if is_main:
        log.info("scoring overlaps the rollout: the prompts rolled out in %d chunks (--overlap_chunks)", num_chunks)
    return num_chunks


class LeafScorer:
    """Decodes and scores leaves on one worker thread as they are handed in (`add`), cut into batches of
    `batch_size` exactly as sequential scoring cuts the whole list; `result()` waits for them all."""

    def __init__(self, pool: ThreadPoolExecutor, score_batch: ScoreBatch, batch_size: int):
        self.pool, self.score_batch, self.batch_size = pool, score_batch, batch_size
        self.latents: list[torch.Tensor] = []  # handed in, not yet submitted
        self.prompts: list[str] = []
        self.conditions: list[dict] = []
        self.futures: list[Future] = []

    def add(self, latents: torch.Tensor, prompts: Sequence[str], conditions: dict) -> None:
        self.latents.append(latents)
        self.prompts.extend(prompts)
        self.conditions.append(conditions)
        while len(self.prompts) >= self.batch_size:
            self._submit(self.batch_size)

    def _submit(self, num: int) -> None:
        latents, conditions = torch.cat(self.latents), _cat_rows(self.conditions)
        batch = (latents[:num], self.prompts[:num], {k: v[:num] for k, v in conditions.items()})
        self.futures.append(self.pool.submit(self.score_batch, *batch))
        self.latents, self.prompts = [latents[num:]], self.prompts[num:]
        self.conditions = [{k: v[num:] for k, v in conditions.items()}]

    def raise_failure(self) -> None:
        for future in self.futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.prompts:
            self._submit(len(self.prompts))
        parts = [future.result() for future in self.futures]  # a reward's error is raised here
        names = parts[0][0].keys()
        return {name: torch.cat([p[0][name] for p in parts]) for name in names}, torch.cat([p[1] for p in parts])


def _cat_rows(dicts: list[dict]) -> dict:
    keys = dicts[0].keys() if dicts else ()
    return {key: torch.cat([d[key] for d in dicts]) for key in keys}


def rollout_while_scoring(num_prompts: int, num_chunks: int, rollout: Callable[[slice], RolloutGraph],
                          leaf_inputs: Callable[..., tuple], scorer: LeafScorer
                          ) -> tuple[RolloutGraph, float, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Roll out the batch's prompts in `num_chunks` chunks of near-equal size (at most one per prompt), one after the
    other (`rollout(prompts)`), handing each finished chunk's leaves to `scorer` (`leaf_inputs(graph, first)`:
    their latents, prompts and conditions, the chunk's prompts being the batch's from row `first`) before the next
    chunk starts. Returns the batch's graph, the time (time.time()) its last chunk was rolled out, and the scores and
    media of its leaves in order."""
    graphs = []
    num_chunks = min(num_chunks, num_prompts)
    for chunk in range(num_chunks):
        prompts = slice(chunk * num_prompts // num_chunks, (chunk + 1) * num_prompts // num_chunks)
        graphs.append(rollout(prompts))
        scorer.add(*leaf_inputs(graphs[-1], first=prompts.start))
        scorer.raise_failure()  # a reward that failed stops the iteration now, not after the whole rollout
    rolled_out = time.time()
    return concat_graphs(graphs), rolled_out, scorer.result()

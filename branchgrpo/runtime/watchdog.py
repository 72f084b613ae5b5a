"""Stall watchdog: a rank that makes no progress for a while says where it waits and which rank is behind.

From the start of training, the trainer marks progress at every cut point (rollout forward, reward chunk,
micro-batch, ...) and the collectives of `branchgrpo.core.distributed` record which one a rank is in (and who called it).
With several processes, a daemon thread per rank publishes its last progress to the process group's store every few
seconds, and when its own rank has made no progress for `stall_s` (a quarter of --collective_timeout_s) it logs one
line such as

    rank 0: no progress for 150 s (iteration 12, since 'rollout forward'), waiting in all_reduce_max (from
    Preemption.cut_point); behind: rank 1 (heartbeat 149 s old: stopped, hung or dead; last 'reward chunk')

The process group gives up after --collective_timeout_s: the collective raises, and the trainer ends with that line.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from branchgrpo.core.distributed import PROGRESS
from branchgrpo.runtime.entry import RunHalted

log = logging.getLogger(__name__)

KEY = "branchgrpo/progress/{rank}"
LONG = ("checkpoint",)  # phases without progress marks that may take long (a stall there is one in a collective)


class Watchdog:
    """The daemon thread of one rank (started only with several processes)."""

    def __init__(self, rank: int, world_size: int, collective_timeout_s: float):
        self.rank, self.world_size, self.collective_timeout_s = rank, world_size, collective_timeout_s
        self.stall_s = collective_timeout_s / 4
        self.period = max(0.5, min(10.0, self.stall_s / 4))
        self.stalled: str | None = None  # the line logged for the last stall
        self._stalled_at = 0.0
        self._warned_count = -1
        self._stop = threading.Event()
        self._store = _default_store()
        self._thread = threading.Thread(target=self._run, name="branchgrpo-watchdog", daemon=True)

    @classmethod
    def for_run(cls, info, collective_timeout_s: float) -> "Watchdog | None":
        """Started with several processes (a single one has no peer to wait for): stalls of a quarter of the
        timeout are reported."""
        if info.world_size < 2:
            return None
        watchdog = cls(info.rank, info.world_size, collective_timeout_s)
        try:
            watchdog._publish()  # at once: a rank that stops right away has a heartbeat to be named by
        except Exception:
            pass
        watchdog._thread.start()
        return watchdog

    def explain(self, err: BaseException) -> BaseException:
        """An exception raised while this rank was stalled (the collective timing out) as one line naming where it
        waited and which rank was behind; any other exception unchanged."""
        if not self.stalled or time.monotonic() - self._stalled_at > 1.5 * self.collective_timeout_s:
            return err
        stalled = StalledError(f"a collective timed out after --collective_timeout_s {self.collective_timeout_s:g}: "
                               f"{self.stalled}")
        stalled.__cause__ = err
        return stalled

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._publish()
                self._check()
            except Exception:  # never let the watchdog take the run down (e.g. the store is gone at exit)
                pass

    def _publish(self) -> None:
        if self._store is not None:
            p = PROGRESS
            self._store.set(KEY.format(rank=self.rank), json.dumps({
                "wall": time.time(), "what": p.what, "iteration": p.iteration, "count": p.count,
                "idle_s": time.monotonic() - p.since, "collective": p.collective}))

    def _check(self) -> None:
        p = PROGRESS
        idle = time.monotonic() - p.since
        if idle < self.stall_s or self._warned_count == p.count or (p.what in LONG and p.collective is None):
            return
        self._warned_count = p.count
        where = (f"waiting in {p.collective}" if p.collective else
                 f"not in a branchgrpo collective (last: {p.last_collective or 'none'})")
        self.stalled = (f"rank {self.rank}: no progress for {idle:.0f} s (iteration {p.iteration}, since "
                        f"'{p.what}'), {where}; {self._peers()}")
        self._stalled_at = time.monotonic()
        log.warning("stalled: %s; the process group gives up after --collective_timeout_s", self.stalled)

    def _peers(self) -> str:
        """The ranks that are behind: a stale heartbeat (stopped, hung or dead) or an older last progress."""
        if self._store is None:
            return "the other ranks' progress is unknown (no store)"
        now, behind = time.time(), []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = KEY.format(rank=r)
            if not self._store.check([key]):
                behind.append((float("inf"), f"rank {r} (no heartbeat since training started: stopped, hung or "
                                             "dead)"))
                continue
            peer = json.loads(self._store.get(key))
            age = now - peer["wall"]
            if age > 3 * self.period:
                behind.append((age, f"rank {r} (heartbeat {age:.0f} s old: stopped, hung or dead; last "
                                    f"'{peer['what']}' of iteration {peer['iteration']})"))
            elif peer["collective"] is None:
                behind.append((peer["idle_s"], f"rank {r} (alive, not in a collective, last progress "
                                               f"{peer['idle_s']:.0f} s ago: '{peer['what']}' of iteration "
                                               f"{peer['iteration']})"))
        behind.sort(reverse=True)
        return "behind: " + ", ".join(t for _, t in behind[:8]) if behind else "every other rank waits as well"


class StalledError(RunHalted):
    """A collective timed out after the watchdog had seen this rank stall (one line naming where and who; exit code
    3, not an input error)."""


def _default_store():
    try:
        import torch.distributed as dist

        return dist.distributed_c10d._get_default_store()  # the rendezvous store (torchrun's, or env://)
    except Exception:
        return None

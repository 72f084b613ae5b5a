"""Preemption: a stop signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) always leaves a loadable checkpoint.

Who receives it does not matter: the launchers `exec` python or forward the signal to torchrun, torchrun forwards it
to every rank, and a rank that alone received it (a scheduler signalling one process) tells the others through a
collective, so every rank stops at the same point.

What is saved. The iteration in progress is finished if it can be within `--preempt_save_deadline_s` of the signal,
and the checkpoint is the state after it, as at any checkpoint. Otherwise the iteration is cut at its next cut point -
before a rollout forward, a decode-and-reward chunk, a training micro-batch or an evaluation forward - and the
checkpoint is the state of the last iteration boundary: the small states captured there (data position, algorithm
schedules, LR schedule, RNG, ...) are put back, and so are the trainable weights and the optimizer state if the
iteration had already taken an optimizer step. With one optimizer step per iteration every cut point comes before
it; with several, the weights and the optimizer state are copied to host memory before the first one (the price of a
bounded save time: one copy of the trainable state per iteration in CPU memory). No partial update is ever saved.
An evaluation that is cut is saved as pending and runs first when the run resumes, so a resumed run equals an
unbroken one exactly. `--preempt_save_deadline_s -1`: never cut (no copy); the signal waits for the iteration's end.

Repeated signals - torchrun forwards the scheduler's SIGTERM to ranks that the scheduler signalled itself, a second
Ctrl-C - are noted and ignored until the checkpoint is written (SIGKILL stops without one). A signal before training
starts (models still loading) stops at once: nothing is trained yet, and a requeued job given
`--resume_from_checkpoint latest` starts fresh.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import torch

from branchgrpo.core import distributed
from branchgrpo.core.distributed import mark

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised at a cut point once the deadline has passed: the trainer saves the last boundary's state and stops."""


class Preemption:
    """Stop signals, cut points, and the state of the last iteration boundary. Checkpointed (an evaluation that a
    cut left pending)."""

    STATE_OPTIONAL = True  # checkpoints written before it existed have no pending evaluation

    def __init__(self, deadline_s: float, world_size: int, rank: int):
        self.deadline_s, self.world_size, self.rank = deadline_s, world_size, rank
        self.signal_name: str | None = None
        self.since: float | None = None  # time.monotonic() of the first signal
        self.armed = False  # training has started: a signal stops at a boundary instead of at once
        self.repeats = 0
        self.pending_evaluation: int | None = None  # the step of an evaluation in progress (saved if it is cut)
        self._states: dict = {}
        self._saved: dict = {}
        self._weights: HostCopy | None = None
        self._previous: dict = {}

    # -- signals ------------------------------------------------------------------------------------------------
    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}

    def uninstall(self) -> None:
        """When training is over: the handlers from before (the trainer run in-process, e.g. in a notebook), or, if
        a stop signal came, ignore the late repeats - torchrun's forwarded copy must not kill a process that is
        exiting cleanly."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else previous)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.since is not None:
            self.repeats += 1
            if self.repeats == 1:
                _say(self.rank, f"{name} again: ignored until the checkpoint is written (SIGKILL stops without one)")
            return
        self.since, self.signal_name = time.monotonic(), name
        if not self.armed:
            _say(self.rank, f"{name} before training started: stopping; nothing is trained yet, nothing to save")
            raise SystemExit(128 + signum)
        when = ("at the end of this iteration" if self.deadline_s < 0 else
                f"at the end of this iteration, or within {self.deadline_s:g} s at the state of the last iteration "
                "boundary (--preempt_save_deadline_s)")
        _say(self.rank, f"{name}: writing a checkpoint {when}, then exiting")

    def arm(self) -> None:
        self.armed = True

    @property
    def requested(self) -> bool:
        return self.since is not None

    def stop_agreed(self) -> bool:
        """Collective (at the end of every iteration): did any rank receive a signal?"""
        return bool(distributed.all_reduce_max(torch.tensor(int(self.requested))).item())

    def cut_point(self, what: str = "micro-batch") -> None:
        """Raise Preempted when the deadline of a signal on any rank has passed. Collective when several processes
        run: every rank calls it at the same points (per rollout forward, reward chunk, micro-batch). Also marks
        progress for the stall watchdog."""
        mark(what)
        if self.deadline_s < 0:
            return
        due = self.since is not None and time.monotonic() - self.since >= self.deadline_s
        if self.world_size > 1:
            due = bool(distributed.all_reduce_max(torch.tensor(int(due))).item())
        if due:
            raise Preempted

    def guarded(self, fn, what: str):
        """`fn` with a cut point before each call."""

        def cut_point_then(*args, **kwargs):
            self.cut_point(what)
            return fn(*args, **kwargs)

        return cut_point_then

    def describe(self, step: int) -> str:
        """What a stop left behind, for the last log line."""
        if step == 0:
            return "nothing trained, nothing saved"
        pending = self.pending_evaluation
        return f"checkpoint-{step} holds {step} iteration(s)" + (
            f"; its evaluation at step {pending} runs first when the run resumes" if pending is not None else "")

    # -- the last iteration boundary ------------------------------------------------------------------------------
    def capture(self, states: dict) -> None:
        """Copies of the small states at an iteration boundary (`states`: name -> object with state_dict); drops the
        previous iteration's weights copy."""
        self._states = states
        self._saved = {name: copy.deepcopy(obj.state_dict()) for name, obj in states.items() if obj is not None}
        self._weights = None

    def keep_weights(self, params: list, optimizer: torch.optim.Optimizer) -> None:
        """Before the first of several optimizer steps of an iteration: the trainable state as it is at the boundary,
        in host memory, so that a cut after a step can still save the boundary."""
        if self.deadline_s >= 0:
            self._weights = HostCopy(params, optimizer)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Back to the last boundary after a cut."""
        for name, state in self._saved.items():
            self._states[name].load_state_dict(copy.deepcopy(state))
        if self._weights is not None:
            self._weights.restore(optimizer)
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"pending_evaluation": self.pending_evaluation}

    def load_state_dict(self, state: dict) -> None:
        self.pending_evaluation = state.get("pending_evaluation")


class HostCopy:
    """The trainable parameters (this rank's shards with FSDP2), their optimizer state and the optimizer's
    hyper-parameters (the LR the schedule sets), copied to CPU memory and copied back in place."""

    def __init__(self, params: list, optimizer: torch.optim.Optimizer):
        self.params = list(params)
        with torch.no_grad():
            self.values = [_local(p).to("cpu", copy=True) for p in self.params]
            self.states = [None if not optimizer.state.get(p) else
                           {k: _local(v).to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                            for k, v in optimizer.state[p].items()} for p in self.params]
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer, hyper_parameters: bool = True) -> None:
        """Copy back the weights and their optimizer state, and (`hyper_parameters`) the group's LR and the like."""
        for p, value, state in zip(self.params, self.values, self.states):
            _local(p).copy_(value)
            if state is None:
                optimizer.state.pop(p, None)
                continue
            current = optimizer.state[p]
            for key, saved in state.items():
                if torch.is_tensor(saved) and torch.is_tensor(current.get(key)):
                    _local(current[key]).copy_(saved)
                else:
                    current[key] = saved
        if hyper_parameters:
            for group, saved in zip(optimizer.param_groups, self.groups):
                group.update(copy.deepcopy(saved))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's storage on this rank: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def _say(rank: int, text: str) -> None:
    """One line on stderr from a signal handler (os.write: no lock that the interrupted code might hold)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(2, f"{stamp} [rank {rank}] WARNING branchgrpo.runtime.preemption: {text}\n".encode())

"""Test-only behaviour for trainer processes that a test starts through a launcher or torchrun (this folder is put on
PYTHONPATH; Python imports `sitecustomize` at start-up). Inert unless one of these variables is set, and only in a
trainer process (`-m branchgrpo.cli.train`, not torchrun's agent):

    BG_TEST_SLOW_FROM=N, BG_TEST_SLOW_S=s   from iteration N on, every reward chunk takes s seconds longer (an
                                            iteration longer than torchrun's grace, without minutes of compute)
    BG_TEST_MARKER=path                     written (with the rank) when the first slow chunk starts
    BG_TEST_SAVE_MARKER=path                written when a checkpoint save starts, which then waits 2 s first
    BG_TEST_STOP_RANK=r, BG_TEST_STOP_AT=N  rank r stops itself (SIGSTOP) at the start of iteration N
"""

import os
import sys

_argv = getattr(sys, "orig_argv", sys.argv)
_ACTIVE = ("branchgrpo.cli.train" in _argv and "torch.distributed.run" not in _argv
           and any(k.startswith("BG_TEST_") for k in os.environ))

if _ACTIVE:
    import signal
    import time
    from pathlib import Path

    import branchgrpo.runtime.checkpoint as _checkpoint
    import branchgrpo.rewards.base as _rewards
    import branchgrpo.runtime.trainer as _trainer

    _rank = os.environ.get("RANK", "0")
    _now = {"iteration": -1}
    _iteration, _score, _save = _trainer.Trainer.iteration, _rewards.RewardSet.score, _checkpoint.CheckpointManager.save

    def _patched_iteration(self, it):
        _now["iteration"] = it
        if os.environ.get("BG_TEST_STOP_RANK") == _rank and int(os.environ.get("BG_TEST_STOP_AT", "-1")) == it:
            os.kill(os.getpid(), signal.SIGSTOP)
        return _iteration(self, it)

    def _patched_score(self, media, prompts, *rest):
        slow_from = os.environ.get("BG_TEST_SLOW_FROM")
        if slow_from is not None and _now["iteration"] >= int(slow_from):
            marker = os.environ.get("BG_TEST_MARKER")
            if marker and not Path(marker).exists():
                Path(marker).write_text(_rank)
            time.sleep(float(os.environ.get("BG_TEST_SLOW_S", "1")))
        return _score(self, media, prompts, *rest)

    def _patched_save(self, *args, **kwargs):
        marker = os.environ.get("BG_TEST_SAVE_MARKER")
        if marker:
            Path(marker).write_text(_rank)
            time.sleep(2)
        return _save(self, *args, **kwargs)

    _trainer.Trainer.iteration = _patched_iteration
    _rewards.RewardSet.score = _patched_score
    _checkpoint.CheckpointManager.save = _patched_save

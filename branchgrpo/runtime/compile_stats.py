"""How many graphs torch.compile has built so far in this process (`--compile`).

Dynamo counts every graph it compiles (`counters["stats"]["unique_graphs"]`): one per block class and batch-size
class at the start (batch 1 is always its own graph: dynamo specialises sizes 0 and 1; the toy's row padding below
16 rows is another branch), plus the backward graphs the training builds. A count that stops growing after the first
iteration means no recompiles; one that grows with every tree depth or iteration means a recompile per batch size.
"""

from __future__ import annotations

import logging


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (forward graphs; each backward is compiled with its forward)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def recompile_limit_hits() -> int:
    """Frames dynamo gave up on after `torch._dynamo.config.recompile_limit` recompiles (they then run eagerly)."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in str(reason).lower())


_last_logged = 0


def log_new_graphs(log: logging.Logger) -> int:
    """Log "compiled N graphs" when the count changed since the last call; returns the count."""
    global _last_logged
    count = compiled_graphs()
    if count != _last_logged:
        log.info("torch.compile: %d graphs compiled so far (+%d)%s", count, count - _last_logged,
                 f"; {recompile_limit_hits()} frames over the recompile limit run eagerly"
                 if recompile_limit_hits() else "")
        _last_logged = count
    return count

"""The entry-point harness every command runs through (`branchgrpo.cli`, the benchmarks).

Every entry point runs its body through `run_cli`: bad input - a `ValueError` or a missing, misplaced or unreadable
file, whose messages name the flag or file - is printed as one line `error: <message>` on stderr and exits with code
2, before anything expensive where the checks allow it. `--debug` (every entry point takes it) or the environment
variable `BRANCHGRPO_DEBUG=1` (for launchers and torchrun) prints the traceback above that line. Any other exception
is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

#: the exceptions that mean "bad input" (their messages are written for users), not "bug"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
#: exit code of an input error a user must fix
EXIT_INPUT = 2
#: exit code of a run a guard stopped on purpose, after saving a checkpoint (not an input error: see RunHalted)
EXIT_HALTED = 3
DEBUG_FLAG = "--debug"
DEBUG_ENV = "BRANCHGRPO_DEBUG"


class RunHalted(RuntimeError):
    """A run stopped on purpose by one of its guards (non-finite rewards, skipped or diverged optimizer steps, the
    reward-hacking monitor, a stalled rank) after saving what it could: printed as one `error:` line like an input
    error, but with exit code EXIT_HALTED, so that a requeue script can tell it from a flag it must fix."""


def add_debug_flag(parser) -> None:
    """Declare `--debug` (read by `run_cli` before parsing, so it also covers errors found while parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"print the traceback of an input error (or set {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """The message of an input error on one line (the lines of a multi-line message joined)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def run_cli(body: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)`; an input error becomes `error: <message>` on stderr and exit code EXIT_INPUT, a halted run
    the same line and EXIT_HALTED. Returns the exit code: `body`'s own if it returns an int, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = body(argv)
    except (RunHalted, *USER_ERRORS) as err:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
        return EXIT_HALTED if isinstance(err, RunHalted) else EXIT_INPUT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0

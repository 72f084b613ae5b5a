"""The entry-point harness every command runs through (`branchgrpo.cli`, the benchmarks).

Every entry point runs its body through `run_cli`, which prints every error it knows as one line `error: <message>`
on stderr and exits with the code of its kind (the table is in the README, "Exit codes"):

    0  done (or stopped by a signal after saving a checkpoint)
    2  EXIT_INPUT        bad input a user must fix: a `ValueError` or a missing, misplaced or unreadable file, whose
                         message names the flag, file or variable; also a malformed command line (argparse's error,
                         without its usage text, and a pointer to --help) - before anything expensive where the
                         checks allow it
    3  EXIT_HALTED       a guard stopped the run on purpose after saving a checkpoint (`RunHalted`)
    4  EXIT_ENVIRONMENT  the machine failed the run: an `OSError` while reading or writing once the checks at start-up
                         passed (disk full, quota, read-only or failing file system), with the path and what to do

`--debug` (every entry point takes it) or the environment variable `BRANCHGRPO_DEBUG=1` (for launchers and torchrun)
prints the traceback above that line. Any other exception is a bug and keeps Python's traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import re
import sys
import traceback
from typing import Callable, Sequence

#: the exceptions that mean "bad input" (their messages are written for users), not "bug"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
#: exit code of an input error a user must fix
EXIT_INPUT = 2
#: exit code of a run a guard stopped on purpose, after saving a checkpoint (not an input error: see RunHalted)
EXIT_HALTED = 3
#: exit code of a run the machine failed: an OSError (disk full, read-only file system, ...) after start-up's checks
EXIT_ENVIRONMENT = 4
DEBUG_FLAG = "--debug"
DEBUG_ENV = "BRANCHGRPO_DEBUG"


class RunHalted(RuntimeError):
    """A run stopped on purpose by one of its guards (non-finite rewards, skipped or diverged optimizer steps, the
    reward-hacking monitor, a stalled rank) after saving what it could: printed as one `error:` line like an input
    error, but with exit code EXIT_HALTED, so that a requeue script can tell it from a flag it must fix."""


class EnvironmentFailure(OSError):
    """An OSError whose message is already written for users (what failed, where, what to do): printed as it is,
    exit code EXIT_ENVIRONMENT."""

    def __init__(self, code: int | None, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class CommandLineError(ValueError):
    """argparse's error about the command line (an unknown flag, a missing or malformed value), as an input error."""


def add_debug_flag(parser) -> None:
    """Declare `--debug` (read by `run_cli` before parsing, so it also covers errors found while parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"print the traceback of an input error (or set {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """The message of an input error on one line (the lines of a multi-line message joined)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


# what to do about an OSError of the machine, by errno (the message names the path and the error)
_ENVIRONMENT_ADVICE = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space in your quota there",
    errno.EROFS: "the file system is mounted read-only: choose a writable folder",
    errno.EIO: "the disk or network file system failed: check it",
}


def environment_line(err: OSError) -> str:
    """An OSError of the machine on one line: the path, the error and what to do about it."""
    if isinstance(err, EnvironmentFailure):
        return error_line(err)
    where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    what = err.strerror or error_line(err)
    advice = _ENVIRONMENT_ADVICE.get(err.errno, "check the file system")
    return (f"{where + ': ' if where else ''}{what} ({advice}; then run the same command again - a training run "
            "continues from its last checkpoint with --resume_from_checkpoint latest)")


def _argparse_error(parser: argparse.ArgumentParser, message: str):
    """Instead of argparse's usage text and exit: an input error naming the flag, with a likely intended flag name
    for an unknown one, and where the flags are listed."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        guesses = [f"{word} -> {close[0]}?" for word in unknown.group(1).split()
                   if word.startswith("--") and (close := difflib.get_close_matches(word.split("=")[0], options, 1))]
        if guesses:
            message += f" (did you mean: {', '.join(guesses)})"
    raise CommandLineError(f"{message}; see {parser.prog} --help")


@contextlib.contextmanager
def _argparse_raises():
    """Every parser's `error` raises CommandLineError while the body runs (one place for every entry point)."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """`--flag -1e-3` -> `--flag=-1e-3`: argparse reads a token like -1e-3, -.5e2 or -inf as a flag ("expected one
    argument"); no flag name starts with a digit, so such a token after a flag is its value."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE_VALUE.match(token) and out[-1].startswith("--") and "=" not in out[-1] \
                and out[-1] != "--":
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def warn_repeated_flags(argv: Sequence[str]) -> None:
    """A flag given more than once takes its last value - on purpose where a launcher appends the user's flags to its
    defaults - but never silently: one warning line per such flag, on the main rank."""
    given: dict[str, list[str]] = {}
    for i, token in enumerate(argv):
        if token == "--":  # what follows is handed to another command, which says so itself
            break
        if not token.startswith("--"):
            continue
        name, _, value = token.partition("=")
        name = "--" + name[len("--no-"):] if name.startswith("--no-") else name  # --x and --no-x: one flag
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        given.setdefault(name, []).append(value or token)
    if os.environ.get("RANK", "0") != "0":
        return
    for name, values in given.items():
        if len(values) > 1 and name != DEBUG_FLAG:
            print(f"warning: {name} is given {len(values)} times ({', '.join(values)}); the last one is used",
                  file=sys.stderr, flush=True)


def run_cli(body: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)`; an input error becomes `error: <message>` on stderr and exit code EXIT_INPUT, a halted run
    the same line and EXIT_HALTED, an OSError of the machine the same line and EXIT_ENVIRONMENT. Returns the exit
    code: `body`'s own if it returns an int, else 0."""
    argv = attach_negative_values(sys.argv[1:] if argv is None else argv)
    warn_repeated_flags(argv)
    try:
        with _argparse_raises():
            result = body(argv)
    except (RunHalted, *USER_ERRORS, OSError) as err:
        if debug_requested(argv):
            traceback.print_exc()
        environment = isinstance(err, OSError) and not isinstance(err, USER_ERRORS)
        print(f"error: {environment_line(err) if environment else error_line(err)}", file=sys.stderr, flush=True)
        return EXIT_ENVIRONMENT if environment else EXIT_HALTED if isinstance(err, RunHalted) else EXIT_INPUT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0

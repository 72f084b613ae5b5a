"""`python -m branchgrpo.make_tiny KIND DIR`: an alias of branchgrpo.cli.make_tiny (the README, the docs and the
launcher tests call it by this name)."""

import sys

from branchgrpo.cli.make_tiny import kinds, main, make_tiny  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

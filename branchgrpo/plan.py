"""`python -m branchgrpo.plan`: an alias of branchgrpo.cli.plan (the README and users call it by this name)."""

import sys

from branchgrpo.cli.plan import count, format_counts, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

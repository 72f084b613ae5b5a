"""`python -m branchgrpo.eval.diversity_cli`: an alias of branchgrpo.cli.diversity (the README and users call it by
this name)."""

import sys

from branchgrpo.cli.diversity import main, run  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

"""`python -m branchgrpo.bench`: an alias of branchgrpo.cli.bench (the throughput benchmark's command line; the
README and docs/benchmarks.md call it by this name)."""

import sys

from branchgrpo.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())

import sys

from branchgrpo.cli.plan import main

sys.exit(main())

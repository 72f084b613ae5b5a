import sys

from branchgrpo.cli.make_tiny import main

sys.exit(main())

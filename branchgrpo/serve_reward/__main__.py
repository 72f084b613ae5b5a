import sys

from branchgrpo.serve_reward.server import main

sys.exit(main())

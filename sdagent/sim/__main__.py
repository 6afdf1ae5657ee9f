import sys

from sdagent.sim.cli import main

sys.exit(main())

import sys

from sdagent.cli import main

sys.exit(main())

"""`python -m cones.cli`: the `cones` command, for launchers that start a module (torchrun, accelerate)."""

import sys

from cones.cli import main

sys.exit(main())

import sys

from cones.cli import main

sys.exit(main())

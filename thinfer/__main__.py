"""`python -m thinfer` runs the command line."""

import sys

from thinfer.cli import main

sys.exit(main())

"""`python -m thinfer` runs the command line."""

import sys

from thinfer.cli import main

if __name__ == "__main__":  # not when a spawned tensor-parallel rank imports it
    sys.exit(main())

"""`python -m litpipe`: the `litpipe` command."""

import sys

from litpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())

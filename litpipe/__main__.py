"""`python -m litpipe`: the `litpipe` command."""

import sys

from litpipe.cli import main

sys.exit(main())

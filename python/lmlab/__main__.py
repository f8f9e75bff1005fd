"""`python -m lmlab ...`: the same as the `lmlab` command."""

import sys

from .cli import main

sys.exit(main())

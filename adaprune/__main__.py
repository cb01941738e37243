"""`python -m adaprune ...` (and `torchrun ... -m adaprune ...`) runs the command line."""

import sys

from .tools.cli import main

sys.exit(main())

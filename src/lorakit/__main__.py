"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`) run the command-line tool."""

import sys

from .cli import main

sys.exit(main())

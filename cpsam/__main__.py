"""`python -m cpsam` is the `cpsam` command."""

import sys

from cpsam.cli import main

sys.exit(main())

"""`python -m specdec.cli` runs the `specdec` command."""

import sys

from specdec.cli import main

sys.exit(main())

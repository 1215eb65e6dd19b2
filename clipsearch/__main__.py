"""`python -m clipsearch` runs the CLI (the tests and the UI start subprocesses this way)."""

import sys

from clipsearch.ui.cli import main

sys.exit(main())

"""``python -m runner``: the same as ``didomagic-runner``."""

import sys

from runner.cli import main

sys.exit(main())

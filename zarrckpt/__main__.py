"""``python -m zarrckpt`` runs the command line."""

import sys

from zarrckpt.cli import main

sys.exit(main())

"""``python -m dynas``: the command line."""

import sys

from dynas.cli import main

sys.exit(main())

"""``python -m faxbridge``: the command line."""

import sys

from faxbridge._src.cli import main

sys.exit(main())

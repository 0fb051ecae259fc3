"""``python -m faxbridge``: the command line."""

import sys

from faxbridge.cli import main

sys.exit(main())

"""Starts the runner: ``python path/to/tff_runner ARGS`` (how the core side starts it) or, with the
folder above on ``PYTHONPATH``, ``python -m tff_runner ARGS``."""

import os
import sys

if not __package__:
  # Started by path: sys.path[0] is this folder, which is no import root. Import the package from
  # the folder above instead, appended last: that folder also holds the core side's modules
  # (client.py, ...), which must shadow nothing and are never imported here.
  _here = os.path.dirname(os.path.abspath(__file__))
  if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
    del sys.path[0]
  sys.path.append(os.path.dirname(_here))

# The package is always top-level in .venv-tff (never faxbridge.converters...): nothing from
# faxbridge, whose __init__ needs numpy 2 and modern JAX, is imported.
from tff_runner.cli import run_and_exit

if __name__ == "__main__":
  run_and_exit()

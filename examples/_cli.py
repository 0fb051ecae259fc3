"""The command line of every example: ``python -m examples.NAME [--rounds N] [--clients N] ...``.

The flags are read off the example's entry point, so an example's command line and its Python API
are one thing: each keyword parameter of ``main`` with an ``int`` default becomes ``--name N`` (its
help shows the default), and ``--help`` prints the module's docstring. Unknown flags are an error,
not silently ignored.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any


def run(entry: Callable[..., Any], argv: list[str] | None = None) -> Any:
  """Parse ``argv`` (default: ``sys.argv[1:]``) into ``entry``'s integer keyword parameters, call it."""
  module = sys.modules[entry.__module__]
  prog = f"python -m {module.__spec__.name if module.__spec__ else entry.__module__}"
  parser = argparse.ArgumentParser(prog=prog, description=inspect.getdoc(module),
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  for name, param in inspect.signature(entry).parameters.items():
    if isinstance(param.default, int) and not isinstance(param.default, bool):
      parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=param.default,
                          metavar="N", help=f"{name.replace('_', ' ')} (default: {param.default})")
  args = vars(parser.parse_args(argv))
  for name, value in args.items():
    if value < 1:  # every count an example takes (rounds, clients, batches) is at least one
      parser.error(f"argument --{name.replace('_', '-')}: expected at least 1, got {value}")
  return entry(**args)

"""What the processes of one pytest run share: a directory, entries made in it once, and the bundled
examples' programs.

``make test`` runs the suite on every core (pytest-xdist): each worker is its own process with its
own session fixtures, so an export two workers both need would be made twice. ``made_once`` makes
it once for the run: the first process to claim the entry (``mkdir`` is atomic, on every platform
and file system pytest's temporary directory lives on) makes it, the others wait for it.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 1800.0  # the longest an entry may take to make (char_lm's exports take about a minute)


def shared_dir(factory: pytest.TempPathFactory) -> Path:
  """A directory every process of this run sees, and no other run: with pytest-xdist each
  worker's base temporary directory is ``<run's>/popen-gwN``, so the run's is its parent."""
  base = factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
  path.mkdir(exist_ok=True)
  return path


def made_once(directory: Path, key: str, make: Callable[[Path], Any]) -> Path:
  """``directory/key``, made by ``make(path)`` in one process of the run; the others wait for it.

  The maker writes ``key.done`` when ``make`` returned, or ``key.failed`` with the error, which a
  waiter raises in turn: a broken export fails each test that needs it, naming its cause, and
  nobody waits for an entry that will never come.
  """
  path = directory / key
  done, failed = directory / f"{key}.done", directory / f"{key}.failed"
  try:
    (directory / f"{key}.claimed").mkdir()
    claimed = True
  except FileExistsError:
    claimed = False
  if claimed:
    try:
      make(path)
    except BaseException as e:
      # Written whole, then renamed: a waiter never reads half a message.
      partial = directory / f"{key}.failed.{os.getpid()}.{threading.get_ident()}"
      partial.write_text(f"{type(e).__name__}: {e}")
      os.replace(partial, failed)
      raise
    done.touch()
    return path
  deadline = time.monotonic() + WAIT_S
  while not done.exists():
    if failed.exists():
      raise RuntimeError(f"making {key} failed (in another test): {failed.read_text()}")
    if time.monotonic() > deadline:
      raise TimeoutError(f"{key} was claimed but not made within {WAIT_S:g} s")
    time.sleep(0.1)
  return path


@functools.cache
def example_program(name: str, kind: str) -> tuple[Any, tuple]:
  """A bundled example's ``computation`` and its example inputs, or its ``process`` and the
  arguments of ``next`` after the state (``kind`` "computation" or "process")."""
  module = importlib.import_module(f"examples.{name}")
  args = tuple(module.example_inputs())
  if kind == "process":
    return module.process, args[1:]
  if kind == "computation":
    return module.computation, args
  raise ValueError(f"kind {kind!r}: computation or process")

"""The logs native libraries write straight to file descriptor 2, and which of them explain nothing.

TensorFlow's C++ runtime, XLA and absl print on every start (oneDNN's notice, CPU instructions, GPU
plug-ins that are absent, "All log messages before absl::InitializeLog()"), ignoring
``TF_CPP_MIN_LOG_LEVEL`` in TF 2.21 and bypassing Python's ``sys.stderr``. A user of ``fb.export``
would see them (twice: two of TensorFlow's libraries each print them) although nothing went wrong, and
they bury the lines that do explain a failure. ``START_UP_NOISE`` is the one list of those lines;
``captured_stderr`` catches descriptor 2 around a block, and ``quiet_start_up`` is how a plug-in's
code runs: its start-up noise dropped, every other line it printed shown after it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# Printed on every start whatever happens next: GPU plug-ins registered twice, no TensorRT, no CUDA
# driver, the CPU's instructions, oneDNN's notice, absl's notice about its own initialization.
START_UP_NOISE = re.compile("|".join([
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TF-TRT Warning", r"Could not find TensorRT", r"TensorRT",
    r"oneDNN custom operations are on", r"TF_ENABLE_ONEDNN_OPTS",
    r"This TensorFlow binary is optimized", r"To enable the following instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"Could not find cuda drivers", r"failed call to cuInit", r"cuda_diagnostics",
    r"CUDA_ERROR_NO_DEVICE", r"computation placer already registered",
    r"All log messages before absl::InitializeLog\(\) is called",
    r"Unable to register cuda", r"cpu_feature_guard",
]))

# Set by ``faxbridge -v``: every native line is shown as it is written.
_show_everything = False


def show_native_logs(show: bool) -> None:
  """Show native libraries' logs unfiltered (``True``) or drop their start-up noise (the default)."""
  global _show_everything
  _show_everything = show


def without_start_up_noise(text: str) -> str:
  """``text`` without the lines of ``START_UP_NOISE``: what is left can explain something."""
  return "\n".join(line for line in text.splitlines() if not START_UP_NOISE.search(line)).strip()


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
  """Inside, file descriptor 2 writes to a scratch file; yields a function that reads what was
  written so far. Python's ``sys.stderr`` keeps writing to the real descriptor (through a copy of it)
  when it is descriptor 2, so tracebacks and progress are not captured. Without a descriptor 2 (a
  daemon) nothing is captured and the reader returns ""."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:
    yield lambda: ""
    return
  scratch = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
  os.dup2(scratch.fileno(), 2)
  python_stderr = sys.stderr
  swapped = False
  with contextlib.suppress(AttributeError, OSError, ValueError):
    # A StringIO (tests, an embedding program) has no descriptor: it is left alone.
    swapped = python_stderr.fileno() == 2
  if swapped:
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")

  def read() -> str:
    scratch.flush()
    scratch.seek(0)
    return scratch.read().decode(errors="replace")

  try:
    yield read
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    if swapped:
      sys.stderr.close()
      sys.stderr = python_stderr
    scratch.close()


@contextlib.contextmanager
def quiet_start_up() -> Iterator[None]:
  """Run a block (a plug-in's exporter or runtime, which imports TensorFlow, LiteRT, ... on first
  use) with its native start-up noise dropped; every other line it wrote to descriptor 2 is written
  there afterwards, also when it raised. Written back to the descriptor, not to ``sys.stderr``: the
  CLI, which catches descriptor 2 itself, then hides them too (and shows them if a command fails)."""
  if _show_everything:
    yield
    return
  text = ""
  try:
    with captured_stderr() as read:
      try:
        yield
      finally:
        text = read()
  finally:
    kept = without_start_up_noise(text)
    if kept:
      with contextlib.suppress(OSError):
        os.write(2, (kept + "\n").encode())


def quietly[T](function: Callable[..., T]) -> Callable[..., T]:
  """``function`` run under ``quiet_start_up`` each time it is called."""

  @functools.wraps(function)
  def run(*args: Any, **kwargs: Any) -> T:
    with quiet_start_up():
      return function(*args, **kwargs)

  return run

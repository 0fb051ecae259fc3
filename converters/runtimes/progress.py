"""Progress from a helper process: the lines it appends to a file while it runs, read as they come.

A runtime that runs an export in another process (TFF's runner in .venv-tff, the fresh process of
runtime ``jax``) cannot call this process's event listeners. It appends one JSON object a line to a
file instead; the client here waits for the process with :func:`wait`, which reads the new lines
while it waits and hands each to a callback (that emits the event). A file, not a pipe: a pipe
would stay open as long as any child the helper leaves behind (TFF's worker_binary) lives.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.1  # how often the file is read while the process runs


class ProgressFile:
  """A file of JSON lines that grows while a process runs; :meth:`read` gives the lines added
  since the last call (a line not yet finished waits for its newline)."""

  def __init__(self, path: str | Path):
    self.path, self.offset, self.partial = Path(path), 0, b""

  def read(self) -> list[dict[str, Any]]:
    try:
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        data = f.read()
    except FileNotFoundError:  # the process has not written anything yet
      return []
    self.offset += len(data)
    *lines, self.partial = (self.partial + data).split(b"\n")
    out = []
    for line in lines:
      try:
        item = json.loads(line)
      except ValueError:  # progress is a courtesy: a garbled line is no reason to fail a run
        continue
      if isinstance(item, dict):
        out.append(item)
    return out


def wait(proc: subprocess.Popen, timeout: float, progress: ProgressFile,
         on_line: Callable[[dict[str, Any]], None]) -> int:
  """Wait for ``proc`` to end, calling ``on_line`` with each progress line as it arrives (all of
  them, in order, before returning); its exit code.

  Raises:
    subprocess.TimeoutExpired: ``proc`` still runs after ``timeout`` seconds (it is left running).
  """
  deadline = time.monotonic() + timeout
  while True:
    try:
      code = proc.wait(timeout=min(POLL_S, max(deadline - time.monotonic(), 0.0)))
    except subprocess.TimeoutExpired:
      for line in progress.read():
        on_line(line)
      if time.monotonic() >= deadline:
        raise subprocess.TimeoutExpired(proc.args, timeout) from None
      continue
    for line in progress.read():
      on_line(line)
    return code

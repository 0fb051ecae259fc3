"""Process hygiene: end TFF's worker_binary (and anything else the runner started) whatever happens.

TFF's C++ context starts a ``worker_binary`` child that inherits stdout and stderr and can outlive
Python, holding a caller's pipes open forever; TFF itself only signals it from a finalizer.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import time
from typing import Any

_ENDED: list[dict[str, Any]] = []


def _proc_children(pid: int) -> list[int]:
  """Direct children of ``pid``, read from /proc (TFF runs on Linux only)."""
  children = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    # The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    fields = stat.rsplit(")", 1)[1].split()
    if int(fields[1]) == pid:
      children.append(int(entry))
  return children


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
  except OSError:
    return ""


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  if state == "Z":  # a zombie child of ours: reap it.
    with contextlib.suppress(ChildProcessError):
      os.waitpid(pid, os.WNOHANG)
    return False
  return True


def end_children() -> list[dict[str, Any]]:
  """Ends every descendant of this process: SIGINT first (TFF's own way), SIGKILL after 3 s.

  Returns every process ended so far (``{"pid", "cmdline"}``), for the status.
  """
  if not os.path.isdir("/proc"):
    return _ENDED
  pids, frontier = [], [os.getpid()]
  while frontier:
    kids = _proc_children(frontier.pop())
    pids.extend(kids)
    frontier.extend(kids)
  pids = [p for p in pids if p != os.getpid()]
  for pid in pids:
    _ENDED.append({"pid": pid, "cmdline": _cmdline(pid)})
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGINT)
  deadline = time.monotonic() + 3.0
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  for pid in pids:
    if _alive(pid):
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
  for pid in pids:
    with contextlib.suppress(ChildProcessError):  # not our direct child, or already reaped
      os.waitpid(pid, 0)
  return _ENDED


def _on_sigterm(signum: int, frame: Any) -> None:
  # Turn SIGTERM (the caller's timeout) into SystemExit so `finally` blocks end the worker.
  raise SystemExit(128 + signum)


def install_guards() -> None:
  """SIGTERM becomes a clean exit, and the workers are ended at interpreter exit too."""
  signal.signal(signal.SIGTERM, _on_sigterm)
  atexit.register(end_children)

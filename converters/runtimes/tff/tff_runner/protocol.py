"""What every part of the runner shares: the protocol version, its error, and the file formats.

Files between the environments are JSON and ``np.savez`` archives loaded with
``allow_pickle=False``: numpy 2 pickles reference ``numpy._core``, which numpy 1.25 lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np

PROTOCOL = 1


class ProtocolError(Exception):
  """The spec, manifest or inputs do not follow the protocol (exit code 2, or a failed job)."""


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
  # np.savez appends ".npz" to names without it; write to the exact path the caller asked for.
  with open(path, "wb") as f:
    by_name: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez(f, **by_name)


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"


class Progress:
  """The ``--progress`` file ("Progress" in the protocol): one JSON object a line, written and
  flushed at each step, so the core reads every step while the runner is still running. Without
  ``--progress`` nothing is written."""

  def __init__(self) -> None:
    self.file: IO[str] | None = None
    self.job: int | None = None  # the index of the job running now, in every line

  def open(self, path: str | Path) -> None:
    self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)

  def report(self, event: str, **fields: Any) -> None:
    if self.file is None:
      return
    self.file.write(json.dumps({"event": event, "job": self.job, **fields}) + "\n")
    self.file.flush()


PROGRESS = Progress()

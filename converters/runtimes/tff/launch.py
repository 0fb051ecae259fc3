"""Starting the TFF runner from the core environment: finding .venv-tff's Python, running
``tff_runner`` in it through files (never pipes) with a timeout, and reading its status back.

The runner is started by path (``python .../tff/tff_runner ARGS``), so .venv-tff imports it as the
top-level package ``tff_runner`` and never runs faxbridge's ``__init__``. The file protocol is
``docs/tff_runner_protocol.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.converters.runtimes.progress import ProgressFile, wait
from faxbridge.extend import VerificationError, without_start_up_noise

# The runner package, run by path (its __main__ puts this folder on sys.path, last).
RUNNER = Path(__file__).resolve().with_name("tff_runner")
# converters/runtimes/tff/launch.py sits three folders below the repository root (editable install).
REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_VAR = "FAXBRIDGE_TFF_PYTHON"
MAKE_COMMAND = "make .venv-tff/.ready"
DEFAULT_TIMEOUT_S = 600.0
_STDERR_TAIL = 4000


def tff_python() -> Path:
  """The Python of the TFF runtime environment: $FAXBRIDGE_TFF_PYTHON or <repo>/.venv-tff.

  Raises:
    VerificationError: the environment is missing or was not finished; the message names the
      command that creates it.
  """
  override = os.environ.get(ENV_VAR)
  if override:
    python = Path(override)
    if not python.is_file():
      raise VerificationError(
          f"{ENV_VAR}={override} does not exist. Unset it to use {REPO_ROOT / '.venv-tff'}, "
          f"or create the TFF runtime environment with `{MAKE_COMMAND}` (in {REPO_ROOT}).")
    return python
  venv = REPO_ROOT / ".venv-tff"
  python = venv / "bin" / "python"
  if not python.is_file() or not (venv / ".ready").is_file():
    state = "is incomplete (no .ready marker)" if python.is_file() else "is missing"
    raise VerificationError(
        f"the TFF runtime environment {venv} {state}. Create it with `{MAKE_COMMAND}` "
        f"(run in {REPO_ROOT}; about a minute, 2.5 GB), or point {ENV_VAR} at a Python "
        "with tensorflow-federated 0.87.")
  return python


def available() -> tuple[bool, str]:
  """The registry's availability probe: whether .venv-tff's Python is there, and where (or why
  not); nothing is started."""
  try:
    return True, str(tff_python())
  except VerificationError as e:
    return False, str(e).split(". ")[0]


# ----------------------------------------------------------------------------------------------
# Running the runner


@dataclass(frozen=True)
class Completed:
  status: dict[str, Any]
  stderr: str
  wall_s: float


def tail(text: str) -> str:
  """The end of the runner's stderr that a failure's message shows: the lines that can explain it
  (those of the core's ``without_start_up_noise``, a list that
  .venv-tff's TensorFlow 2.14 matches as well), at most the last ``_STDERR_TAIL`` characters."""
  text = without_start_up_noise(text)
  if not text:
    return "(nothing but TensorFlow's start-up log)"
  return text if len(text) <= _STDERR_TAIL else "..." + text[-_STDERR_TAIL:]


def _exit_text(returncode: int | None) -> str:
  """"exited with code N", or "was killed by SIGKILL" for a runner ended by a signal."""
  if returncode is not None and returncode < 0:
    with contextlib.suppress(ValueError):
      return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with code {returncode}"


def _end_group(pgid: int) -> None:
  """Kills whatever is left in the runner's process group (a worker_binary it failed to end)."""
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(pgid, signal.SIGKILL)


def invoke(args: Sequence[str], workdir: Path, status_path: Path, timeout: float,
           on_progress: Callable[[dict[str, Any]], None] | None = None) -> Completed:
  """Runs ``tff_runner *args`` in ``workdir``; stdout and stderr go to files, never pipes.

  A pipe would stay open as long as TFF's worker_binary lives (it inherits them); files cannot
  hang us. The runner gets its own session, so a timeout or a leftover worker is ended as a group.
  With ``on_progress``, the runner is given ``--progress`` and each line it reports is passed on
  while it runs (the protocol's "Progress").
  """
  python = tff_python()
  progress = ProgressFile(workdir / "progress.jsonl")
  if on_progress is not None:
    args = [*args, "--progress", progress.path.name]
  command = [str(python), str(RUNNER), *args]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
  out_path, err_path = workdir / "runner.stdout", workdir / "runner.stderr"
  start = time.perf_counter()
  with open(out_path, "wb") as out, open(err_path, "wb") as err:
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            cwd=workdir, env=env, start_new_session=True)
    try:
      wait(proc, timeout, progress, on_progress or (lambda line: None))
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)  # the runner turns this into a clean exit
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      _end_group(proc.pid)
      stderr = err_path.read_text(errors="replace")
      raise VerificationError(
          f"the TFF runner did not finish within {timeout:g} s and was stopped: "
          f"{' '.join(command)}\n--- runner stderr (tail) ---\n{tail(stderr)}") from None
    finally:
      _end_group(proc.pid)
  wall = time.perf_counter() - start
  stderr = err_path.read_text(errors="replace")
  try:
    status = json.loads(status_path.read_text())
  except (OSError, ValueError):
    raise VerificationError(
        f"the TFF runner {_exit_text(proc.returncode)} and wrote no status: "
        f"{' '.join(command)}\n--- runner stderr (tail) ---\n{tail(stderr)}") from None
  if status.get("error") is not None:
    raise VerificationError(
        f"the TFF runner failed (exit code {proc.returncode}): {status['error']}\n"
        f"--- runner stderr (tail) ---\n{tail(stderr)}")
  return Completed(status=status, stderr=stderr, wall_s=wall)


def load_npz(path: Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def save_npz(path: Path, arrays: Mapping[str, Any]) -> None:
  with open(path, "wb") as f:
    by_name: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez(f, **by_name)


def job_error(what: str, job: dict[str, Any], done: Completed) -> VerificationError:
  return VerificationError(
      f"{what} failed on TFF's runtime: {job.get('error')}\n"
      f"--- runner stderr (tail) ---\n{tail(done.stderr)}")

"""Runs artifacts on TFF 0.87 from the core environment, through ``tff_runner.py`` in .venv-tff.

TFF 0.87 needs TF 2.14 and numpy 1.25 and can never share the core's environment, so execution
happens in a subprocess: this module writes the inputs (``np.savez``, JSON), starts the runner with
.venv-tff's Python, waits with a timeout and reads the outputs and the status back. The file
protocol is written down in ``tff_runner.py``'s docstring and ``docs/tff_runner_protocol.md``.

Both entry points take batches, because each start of the runner costs seconds (TF 2.14's import,
TFF's on top for computations)::

  run_graph(graph_def, {"x:0": x}, ["y:0"])                 # one GraphDef in TF 2.14
  run_graphs([GraphJob(g1, {...}, [...]), ...])              # many, one process
  run_computation(export_dir, {"params": p, "data/x": xs})   # one export on TFF (TffRun)
  run_computations([ComputationJob(dir1, ...), ...])         # many, one process
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.errors import VerificationError

RUNNER = Path(__file__).resolve().with_name("tff_runner.py")
# converters/runtimes/tff.py sits two folders below the repository root (editable install).
REPO_ROOT = Path(__file__).resolve().parents[2]
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


# ----------------------------------------------------------------------------------------------
# Running the runner


@dataclass(frozen=True)
class _Completed:
  status: dict[str, Any]
  stderr: str
  wall_s: float


def _tail(text: str) -> str:
  return text if len(text) <= _STDERR_TAIL else "..." + text[-_STDERR_TAIL:]


def _end_group(pgid: int) -> None:
  """Kills whatever is left in the runner's process group (a worker_binary it failed to end)."""
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(pgid, signal.SIGKILL)


def _invoke(args: Sequence[str], workdir: Path, status_path: Path, timeout: float) -> _Completed:
  """Runs ``tff_runner.py *args``; stdout and stderr go to files, never pipes.

  A pipe would stay open as long as TFF's worker_binary lives (it inherits them); files cannot
  hang us. The runner gets its own session, so a timeout or a leftover worker is ended as a group.
  """
  python = tff_python()
  command = [str(python), str(RUNNER), *args]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
  out_path, err_path = workdir / "runner.stdout", workdir / "runner.stderr"
  start = time.perf_counter()
  with open(out_path, "wb") as out, open(err_path, "wb") as err:
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            cwd=workdir, env=env, start_new_session=True)
    try:
      proc.wait(timeout=timeout)
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
          f"{' '.join(command)}\n--- runner stderr (tail) ---\n{_tail(stderr)}") from None
    finally:
      _end_group(proc.pid)
  wall = time.perf_counter() - start
  stderr = err_path.read_text(errors="replace")
  try:
    status = json.loads(status_path.read_text())
  except (OSError, ValueError):
    raise VerificationError(
        f"the TFF runner exited with code {proc.returncode} and wrote no status: "
        f"{' '.join(command)}\n--- runner stderr (tail) ---\n{_tail(stderr)}") from None
  if status.get("error") is not None:
    raise VerificationError(
        f"the TFF runner failed (exit code {proc.returncode}): {status['error']}\n"
        f"--- runner stderr (tail) ---\n{_tail(stderr)}")
  return _Completed(status=status, stderr=stderr, wall_s=wall)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _save_npz(path: Path, arrays: Mapping[str, Any]) -> None:
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _job_error(what: str, job: dict[str, Any], done: _Completed) -> VerificationError:
  return VerificationError(
      f"{what} failed on TFF's runtime: {job.get('error')}\n"
      f"--- runner stderr (tail) ---\n{_tail(done.stderr)}")


# ----------------------------------------------------------------------------------------------
# Plain GraphDefs in TF 2.14


@dataclass(frozen=True)
class GraphJob:
  """One GraphDef to run: feeds by placeholder tensor name (``x`` means ``x:0``), fetch names."""

  graph_def: bytes
  inputs: Mapping[str, np.ndarray]
  outputs: Sequence[str]


def run_graphs(jobs: Sequence[GraphJob | tuple], *, timeout: float = DEFAULT_TIMEOUT_S,
               strict: bool = True) -> list[dict[str, np.ndarray] | VerificationError]:
  """Runs many GraphDefs in one TF 2.14 process; returns their outputs by fetch name, in order.

  With ``strict`` the first failed job raises (after all ran); otherwise a failed job's entry is the
  ``VerificationError`` describing it, so one bad graph does not hide the others' results.
  """
  jobs = [j if isinstance(j, GraphJob) else GraphJob(*j) for j in jobs]
  if not jobs:
    return []
  with tempfile.TemporaryDirectory(prefix="faxbridge-tf214-") as tmp:
    workdir = Path(tmp)
    files: dict[bytes, str] = {}  # identical graphs are written once
    spec, feeds = [], {}
    for i, job in enumerate(jobs):
      name = files.setdefault(job.graph_def, f"g{len(files)}.pb")
      if not (workdir / name).exists():
        (workdir / name).write_bytes(job.graph_def)
      spec.append({"graph": name, "inputs": {t: f"{i}/{t}" for t in job.inputs},
                   "outputs": list(job.outputs)})
      feeds.update({f"{i}/{t}": v for t, v in job.inputs.items()})
    (workdir / "spec.json").write_text(json.dumps({"jobs": spec}))
    _save_npz(workdir / "in.npz", feeds)
    done = _invoke(["graph", "--spec", "spec.json", "--inputs", "in.npz", "--outputs", "out.npz",
                    "--status", "status.json"], workdir, workdir / "status.json", timeout)
    fetched = _load_npz(workdir / "out.npz")
  results: list[dict[str, np.ndarray] | VerificationError] = []
  for i, (job, job_status) in enumerate(zip(jobs, done.status["jobs"])):
    if job_status["ok"]:
      results.append({n: fetched[f"{i}/{n}"] for n in job.outputs})
    else:
      error = _job_error(f"graph job {i} (fetching {list(job.outputs)})", job_status, done)
      if strict:
        raise error
      results.append(error)
  return results


def run_graph(graph_def: bytes, inputs: Mapping[str, np.ndarray], output_names: Sequence[str],
              *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, np.ndarray]:
  """Runs one GraphDef in TF 2.14; returns ``{output_name: array}``."""
  (result,) = run_graphs([GraphJob(graph_def, inputs, output_names)], timeout=timeout)
  return result


# ----------------------------------------------------------------------------------------------
# Exported computations on TFF


@dataclass(frozen=True)
class FormStatus:
  """Whether a form (MapReduceForm, DistributeAggregateForm) built, and its rebuild ran."""

  built: bool
  error: str | None
  ran: bool
  run_error: str | None
  outputs: dict[str, np.ndarray]
  build_s: float
  run_s: float | None


@dataclass(frozen=True)
class TffRun:
  """One export directory executed on TFF.

  ``outputs`` is keyed as in the protocol: manifest output names for a computation;
  ``initialize/NAME`` and ``round{r}/NAME`` for an iterative process (see ``round``).
  """

  outputs: dict[str, np.ndarray]
  kind: str
  context: str
  secure_intrinsics: tuple[str, ...]
  forms: dict[str, FormStatus]
  timings: dict[str, float]
  versions: dict[str, str]
  stderr: str = field(repr=False)

  def round(self, r: int) -> dict[str, np.ndarray]:
    """Outputs of round ``r`` (1-based; 0 is initialize) of an iterative process, by name."""
    prefix = "initialize/" if r == 0 else f"round{r}/"
    return {k[len(prefix):]: v for k, v in self.outputs.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class ComputationJob:
  """One export directory to execute with its inputs (npz names of the protocol)."""

  export_dir: str | os.PathLike
  inputs: Mapping[str, np.ndarray]
  rounds: int | None = None
  forms: bool = False


def _tff_run(job_status: dict, outputs: dict[str, np.ndarray], done: _Completed) -> TffRun:
  forms = {}
  for name, st in job_status.get("forms", {}).items():
    prefix = f"{name}/"
    forms[name] = FormStatus(
        built=st["built"], error=st["error"], ran=st["ran"], run_error=st["run_error"],
        outputs={k[len(prefix):]: v for k, v in outputs.items() if k.startswith(prefix)},
        build_s=st["build_s"], run_s=st.get("run_s"))
  own = {k: v for k, v in outputs.items() if not any(k.startswith(f"{n}/") for n in forms)}
  timings = {**job_status["timings"],
             "runner_import_s": done.status["timings"].get("import_s", float("nan")),
             "runner_total_s": done.status["timings"].get("total_s", float("nan")),
             "wall_s": done.wall_s}
  return TffRun(outputs=own, kind=job_status["kind"], context=job_status["context"],
                secure_intrinsics=tuple(job_status["secure_intrinsics"]), forms=forms,
                timings=timings, versions=done.status.get("versions", {}), stderr=done.stderr)


def run_computations(jobs: Sequence[ComputationJob], *, timeout: float = DEFAULT_TIMEOUT_S,
                     strict: bool = True) -> list[TffRun | VerificationError]:
  """Executes many export directories in one TFF process (TFF's import costs seconds)."""
  if not jobs:
    return []
  with tempfile.TemporaryDirectory(prefix="faxbridge-tff-") as tmp:
    workdir = Path(tmp)
    spec = []
    for i, job in enumerate(jobs):
      export_dir = Path(job.export_dir).resolve()
      if not export_dir.is_dir():
        raise VerificationError(f"no export directory at {export_dir}")
      _save_npz(workdir / f"in{i}.npz", job.inputs)
      spec.append({"dir": str(export_dir), "inputs": f"in{i}.npz", "outputs": f"out{i}.npz",
                   "rounds": job.rounds, "forms": job.forms})
    (workdir / "spec.json").write_text(json.dumps({"jobs": spec}))
    done = _invoke(["computation", "--spec", "spec.json", "--status", "status.json"], workdir,
                   workdir / "status.json", timeout)
    results: list[TffRun | VerificationError] = []
    for i, (job, job_status) in enumerate(zip(jobs, done.status["jobs"])):
      if job_status["ok"]:
        results.append(_tff_run(job_status, _load_npz(workdir / f"out{i}.npz"), done))
      else:
        error = _job_error(f"executing {job.export_dir}", job_status, done)
        if strict:
          raise error
        results.append(error)
  return results


def run_computation(export_dir: str | os.PathLike, inputs: Mapping[str, np.ndarray],
                    rounds: int | None = None, forms: bool = False, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> TffRun:
  """Executes one export directory on TFF (native context, or test context for secure sums)."""
  (result,) = run_computations([ComputationJob(export_dir, inputs, rounds, forms)],
                               timeout=timeout)
  return result

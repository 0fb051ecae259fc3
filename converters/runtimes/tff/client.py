"""Runs artifacts on TFF 0.87 from the core environment, batched, through the runner in .venv-tff.

Both kinds of entry points take batches, because each start of the runner costs seconds (TF 2.14's
import, TFF's on top for computations)::

  run_graph(graph_def, {"x:0": x}, ["y:0"])                 # one GraphDef in TF 2.14
  run_graphs([GraphJob(g1, {...}, [...]), ...])              # many, one process
  run_computation(export_dir, {"params": p, "data/x": xs})   # one export on TFF (TffRun)
  run_computations([ComputationJob(dir1, ...), ...])         # many, one process

The files they write and read are ``docs/tff_runner_protocol.md``'s.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faxbridge.extend import VerificationError, emit

from .launch import DEFAULT_TIMEOUT_S, Completed, invoke, job_error, load_npz, save_npz

# The runner's name of each deployment form (``--forms``), as TFF names it.
FORMS = {"mapreduce": "MapReduceForm", "distribute_aggregate": "DistributeAggregateForm"}


def rebuilt_run(form: str) -> str:
  """The label of the run of ``next`` rebuilt from a deployment form, the same in progress and in
  the report: ``next rebuilt from MapReduceForm``."""
  return f"next rebuilt from {FORMS.get(form, form)}"


def _progress(jobs: int):
  """What each line of the runner's ``--progress`` file becomes here: an event (see
  ``faxbridge.events``), named as this process's own (``round`` as ``run_program``'s)."""

  def on_line(line: dict) -> None:
    event, job = line.get("event"), line.get("job")
    who = "tff" if jobs == 1 or job is None else f"tff job {job}"
    if event == "imported":
      emit("tff.imported", f"{who}: {line.get('what')} imported ({line.get('seconds', 0):.1f} s)",
           who=who, seconds=line.get("seconds"))
    elif event == "forms":
      emit("tff.forms", f"{who}: building MapReduceForm and DistributeAggregateForm", who=who)
    elif event == "round":
      if line.get("form"):
        who = f"{who} ({rebuilt_run(line['form'])})"
      computation, r, rounds = line.get("computation"), line.get("round"), line.get("rounds")
      emit("round", f"{who}: round {r} of {rounds}" if computation == "next" else
           f"{who}: {computation}", who=who, computation=computation, round=r, rounds=rounds)

  return on_line


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
  graph_jobs = [j if isinstance(j, GraphJob) else GraphJob(*j) for j in jobs]
  if not graph_jobs:
    return []
  with tempfile.TemporaryDirectory(prefix="faxbridge-tf214-") as tmp:
    workdir = Path(tmp)
    files: dict[bytes, str] = {}  # identical graphs are written once
    spec, feeds = [], {}
    for i, job in enumerate(graph_jobs):
      name = files.setdefault(job.graph_def, f"g{len(files)}.pb")
      if not (workdir / name).exists():
        (workdir / name).write_bytes(job.graph_def)
      spec.append({"graph": name, "inputs": {t: f"{i}/{t}" for t in job.inputs},
                   "outputs": list(job.outputs)})
      feeds.update({f"{i}/{t}": v for t, v in job.inputs.items()})
    (workdir / "spec.json").write_text(json.dumps({"jobs": spec}))
    save_npz(workdir / "in.npz", feeds)
    emit("tff.start", f"starting TF 2.14 in .venv-tff for {len(graph_jobs)} graph(s)",
         jobs=len(graph_jobs))
    done = invoke(["graph", "--spec", "spec.json", "--inputs", "in.npz", "--outputs", "out.npz",
                    "--status", "status.json"], workdir, workdir / "status.json", timeout,
                   _progress(len(graph_jobs)))
    fetched = load_npz(workdir / "out.npz")
  results: list[dict[str, np.ndarray] | VerificationError] = []
  for i, (job, job_status) in enumerate(zip(graph_jobs, done.status["jobs"])):
    if job_status["ok"]:
      results.append({n: fetched[f"{i}/{n}"] for n in job.outputs})
    else:
      error = job_error(f"graph job {i} (fetching {list(job.outputs)})", job_status, done)
      if strict:
        raise error
      results.append(error)
  return results


def run_graph(graph_def: bytes, inputs: Mapping[str, np.ndarray], output_names: Sequence[str],
              *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, np.ndarray]:
  """Runs one GraphDef in TF 2.14; returns ``{output_name: array}``."""
  (result,) = run_graphs([GraphJob(graph_def, inputs, output_names)], timeout=timeout)
  if isinstance(result, VerificationError):  # strict: run_graphs raises it first
    raise result
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


def _tff_run(job_status: dict, outputs: dict[str, np.ndarray], done: Completed) -> TffRun:
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
      save_npz(workdir / f"in{i}.npz", job.inputs)
      spec.append({"dir": str(export_dir), "inputs": f"in{i}.npz", "outputs": f"out{i}.npz",
                   "rounds": job.rounds, "forms": job.forms})
    (workdir / "spec.json").write_text(json.dumps({"jobs": spec}))
    emit("tff.start", "starting TFF 0.87 in .venv-tff (rounds run there)"
         if len(jobs) == 1 else f"starting TFF 0.87 in .venv-tff for {len(jobs)} exports",
         jobs=len(jobs))
    done = invoke(["computation", "--spec", "spec.json", "--status", "status.json"], workdir,
                   workdir / "status.json", timeout, _progress(len(jobs)))
    results: list[TffRun | VerificationError] = []
    for i, (job, job_status) in enumerate(zip(jobs, done.status["jobs"])):
      if job_status["ok"]:
        results.append(_tff_run(job_status, load_npz(workdir / f"out{i}.npz"), done))
      else:
        error = job_error(f"executing {job.export_dir}", job_status, done)
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
  if isinstance(result, VerificationError):  # strict: run_computations raises it first
    raise result
  return result

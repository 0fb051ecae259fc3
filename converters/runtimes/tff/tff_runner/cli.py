"""The runner's command line, status file and exit code (``docs/tff_runner_protocol.md``,
"Command line" and "Status and exit code")."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .processes import end_children, install_guards
from .protocol import PROGRESS, PROTOCOL, ProtocolError, error_text, load_npz, save_npz

# TF's C++ logging (CUDA probing, CPU feature notes) would bury the errors that matter in stderr.
# TF is imported later, by the subcommands.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tff_runner",
      description="Runs exported artifacts in TFF's environment; see docs/tff_runner_protocol.md.")
  sub = parser.add_subparsers(dest="command", required=True)
  graph = sub.add_parser("graph", help="run plain-TF GraphDefs in TF 2.14")
  graph.add_argument("--spec", help="jobs JSON")
  graph.add_argument("--graph", help="GraphDef file (default graph of the spec's jobs)")
  graph.add_argument("--fetch", action="append", default=[], help="tensor to fetch (no --spec)")
  graph.add_argument("--inputs", required=True)
  graph.add_argument("--outputs", required=True)
  graph.add_argument("--status")
  graph.add_argument("--progress", help="append one JSON line per step to this file")
  comp = sub.add_parser("computation", help="execute exported computations with TFF")
  comp.add_argument("--spec", help="jobs JSON (instead of --dir/--inputs/--outputs)")
  comp.add_argument("--dir")
  comp.add_argument("--inputs")
  comp.add_argument("--outputs")
  comp.add_argument("--rounds", type=int)
  comp.add_argument("--forms", action="store_true")
  comp.add_argument("--status")
  comp.add_argument("--progress", help="append one JSON line per step to this file")
  return parser


def _status_path(args: argparse.Namespace) -> Path | None:
  if args.status:
    return Path(args.status)
  if getattr(args, "outputs", None):
    return Path(args.outputs).with_name("status.json")
  if getattr(args, "spec", None):
    return Path(args.spec).with_name("status.json")
  return None


def _read_spec(path: str) -> tuple[list[dict], Path]:
  """The spec's jobs, and the folder its relative paths start from."""
  spec_path = Path(path)
  try:
    jobs = json.loads(spec_path.read_text())["jobs"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ProtocolError(f"unreadable spec {path}: {error_text(e)}") from None
  if not isinstance(jobs, list) or not all(isinstance(job, dict) for job in jobs):
    raise ProtocolError(f"spec {path}: \"jobs\" must be a list of objects")
  return jobs, spec_path.parent


def _versions(with_tff: bool) -> dict[str, str]:
  import tensorflow as tf

  versions = {"python": sys.version.split()[0], "numpy": np.__version__,
              "tensorflow": tf.__version__}
  if with_tff:
    import tensorflow_federated as tff

    versions["tensorflow_federated"] = tff.__version__
  return versions


def _run_graph(args: argparse.Namespace, status: dict) -> None:
  timings = status["timings"]
  start = time.perf_counter()
  inputs = load_npz(args.inputs)
  graph = args.graph and str(Path(args.graph).resolve())
  if args.spec:
    jobs, base = _read_spec(args.spec)
  elif args.graph:
    if not args.fetch:
      raise ProtocolError("graph --graph needs --fetch (or use --spec)")
    # One job: the npz keys are the placeholder names.
    jobs, base = [{"inputs": {k: k for k in inputs}, "outputs": args.fetch}], Path.cwd()
  else:
    raise ProtocolError("graph needs --spec or --graph")
  import tensorflow  # noqa: F401  (timed apart from the jobs; TFF is not needed here)

  from .graphs import run_graph_jobs

  timings["import_s"] = time.perf_counter() - start
  PROGRESS.report("imported", what="tensorflow", seconds=round(timings["import_s"], 3))
  status["versions"] = _versions(with_tff=False)
  start = time.perf_counter()
  outputs, status["jobs"] = run_graph_jobs(jobs, inputs, base, graph, prefix=bool(args.spec))
  timings["run_s"] = time.perf_counter() - start
  save_npz(args.outputs, outputs)


def _run_computation(args: argparse.Namespace, status: dict) -> None:
  timings = status["timings"]
  if args.spec:
    jobs, base = _read_spec(args.spec)
  else:
    if not (args.dir and args.inputs and args.outputs):
      raise ProtocolError("computation needs --spec, or --dir, --inputs and --outputs")
    jobs = [{"dir": args.dir, "inputs": args.inputs, "outputs": args.outputs,
             "rounds": args.rounds, "forms": args.forms}]
    base = Path.cwd()
  start = time.perf_counter()
  import tensorflow_federated  # noqa: F401  (timed apart from the jobs)

  from .computations import run_computation_job
  from .contexts import CONTEXTS

  timings["import_s"] = time.perf_counter() - start
  PROGRESS.report("imported", what="tensorflow_federated", seconds=round(timings["import_s"], 3))
  status["versions"] = _versions(with_tff=True)
  start = time.perf_counter()
  for i, job in enumerate(jobs):
    PROGRESS.job = i
    status["jobs"].append(run_computation_job(job, base, CONTEXTS))
  PROGRESS.job = None
  timings["run_s"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
  """Runs one command; always writes the status (when it knows where) and returns the exit code."""
  started = time.perf_counter()
  install_guards()
  args = _parser().parse_args(argv)
  if args.progress:
    PROGRESS.open(args.progress)
  status: dict[str, Any] = {"protocol": PROTOCOL, "ok": False, "error": None, "versions": {},
                            "timings": {}, "jobs": [], "ended_children": []}
  code = 1
  try:
    (_run_graph if args.command == "graph" else _run_computation)(args, status)
    code = 0 if all(job["ok"] for job in status["jobs"]) else 3
  except ProtocolError as e:
    status["error"], code = error_text(e), 2
    print(f"tff_runner: {status['error']}", file=sys.stderr)
  except BaseException as e:
    status["error"] = error_text(e)
    status["traceback"] = traceback.format_exc()
    traceback.print_exc()
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
  finally:
    # End TFF's worker before reporting, so the status says what was ended.
    status["ended_children"] = end_children()
    status["ok"] = code == 0
    status["timings"]["total_s"] = time.perf_counter() - started
    path = _status_path(args)
    if path is not None:
      path.write_text(json.dumps(status, indent=1, default=str))
  for i, job in enumerate(status["jobs"]):
    if not job["ok"]:
      print(f"tff_runner: job {i} {job.get('dir', '')} failed: {job['error']}", file=sys.stderr)
  return code


def run_and_exit() -> None:
  exit_code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  # The workers are ended and the status is written: skip the interpreter's teardown of TF/TFF,
  # which costs about a second and makes TFF's finalizers signal workers that are already gone.
  os._exit(exit_code)

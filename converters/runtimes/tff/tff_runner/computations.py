"""Runs exported artifacts in TFF's runtime environment (.venv-tff: TFF 0.87, TF 2.14, numpy 1.25).

This script is the only code that runs in .venv-tff. It imports nothing from faxbridge and reads
and writes only JSON and ``np.savez`` archives loaded with ``allow_pickle=False`` (numpy 2 pickles
do not load under numpy 1.25). The core side (``faxbridge.converters.runtimes.tff``) writes the
files, starts this script and reads the answers back. Protocol version: 1.

Subcommands
===========

``graph``: run plain-TF GraphDefs in TF 2.14 (no TFF import, so it starts in about a second)::

  tff_runner.py graph --spec spec.json --inputs in.npz --outputs out.npz [--status status.json]
  tff_runner.py graph --graph G.pb --fetch y:0 [--fetch z:0] --inputs in.npz --outputs out.npz

``spec.json`` is ``{"jobs": [{"graph": "g0.pb", "inputs": {"x:0": "0/x"}, "outputs": ["y:0"]}]}``.
``graph`` is a path relative to the spec's folder (``--graph`` gives it to jobs that name none);
``inputs`` maps a placeholder tensor name to a key of ``in.npz``; ``outputs`` lists tensor names to
fetch. A tensor name without ``:k`` means output 0. Output ``j`` of job ``i`` is written to
``out.npz`` under the key ``"{i}/{name}"`` (exactly as listed in the job). Without ``--spec`` the
keys of ``in.npz`` are the placeholder names and the outputs are keyed by their ``--fetch`` names.
Jobs run independently: a failing job is recorded in the status and the others still run.

``computation``: load exported federated computations and execute them with TFF::

  tff_runner.py computation --dir EXPORT_DIR --inputs in.npz --outputs out.npz
                            [--rounds N] [--forms] [--status status.json]
  tff_runner.py computation --spec jobs.json [--status status.json]

``jobs.json`` is ``{"jobs": [{"dir": ..., "inputs": ..., "outputs": ..., "rounds": N|null,
"forms": bool}]}`` (paths relative to the spec's folder), so one start of TFF serves many runs.

Export directory
----------------
Either ``computation.pb`` (one computation) or ``initialize.pb`` and ``next.pb`` (an iterative
process in the shape ``tff.templates.IterativeProcess`` expects), each a serialized
``Computation`` proto (federated_language 0.5.4 or ``tensorflow_federated.proto.v0``: same bytes),
plus ``manifest.json``. Other files and other manifest fields are ignored by this runner.

The manifest describes each computation with a *signature block*::

  {"type_signature": "(<float32[3]@SERVER,{<x=float32[4,3],y=float32[4]>}@CLIENTS> -> ...)",
   "inputs":  [{"name": "params", "placement": "SERVER",  "dtype": "float32", "shape": [3],
                "path": [0]},
               {"name": "data/x", "placement": "CLIENTS", "dtype": "float32", "shape": [4, 3],
                "path": [1, "x"]}, ...],
   "outputs": [{"name": "new_params", "placement": "SERVER", "dtype": "float32", "shape": [3],
                "path": [0]}, ...]}

For ``computation.pb`` the block is the manifest itself (or ``manifest["computation"]`` if present);
for an iterative process it is ``manifest["initialize"]`` and ``manifest["next"]``.

* ``type_signature``: ``str()`` of the computation's TFF type. If present it must equal the loaded
  computation's type exactly (federated_language 0.5.4 and TFF 0.87 print types identically).
* ``path``: where the leaf sits in the parameter (inputs) or the result (outputs). Each element is a
  struct element index (int) or name (str). Federated types are transparent: the path steps through
  ``T@P`` into ``T`` without an element of its own. ``[]`` is the whole parameter or result.
  Every tensor in the parameter must be covered by exactly one input; a path must end at a tensor
  (or a federated tensor).
* ``placement``: ``"SERVER"``, ``"CLIENTS"`` or ``null`` (unplaced); checked against the type.
* ``dtype`` (numpy name) and ``shape`` (list, ``null`` for an unknown dimension): the *per-client*
  value; checked exactly against the arrays (no silent casts).
* ``name``: the key of the leaf in ``in.npz`` / ``out.npz``.

Values
------
* A value placed ``{T}@CLIENTS`` (not all-equal) has a leading client axis in the npz: its array has
  shape ``[num_clients, *shape]``. The runner passes TFF a Python list with one value per client;
  all CLIENTS inputs must agree on ``num_clients``. Client-placed outputs are stacked the same way.
* ``T@SERVER`` and all-equal ``T@CLIENTS`` values have no client axis.
* Structs are rebuilt as ``tff.structure.Struct`` with the element names of the type, so named and
  unnamed elements both work; the whole parameter is passed as one argument.

Iterative processes (``--rounds N``, default 1)
----------------------------------------------
``state = initialize()``; then ``N`` times ``state, metrics = next(state, *rest)``: element 0 of
``next``'s parameter is the state (fed back from element 0 of its result, as TFF itself does), so
``manifest["next"]["inputs"]`` lists only the other leaves (paths starting at 1 or later). An npz
key ``"round{r}/{name}"`` (r = 1..N) overrides ``name`` in round r, for data that changes per round.
Outputs: ``"initialize/{name}"`` for initialize's outputs and ``"round{r}/{name}"`` for next's.

Execution context
-----------------
The native C++ context (``tff.backends.native``) runs everything except computations that contain
secure intrinsics (any intrinsic URI with ``secure`` in it, e.g. ``federated_secure_sum_bitwidth``),
which the native context rejects: those run on ``tff.backends.test``'s C++ context, which replaces
secure sums by plain ones. The status names the context used and the secure intrinsics found.

Forms (``--forms``)
-------------------
For the computation (or ``next``) the runner builds
``tff.backends.mapreduce.get_map_reduce_form_for_computation`` and
``get_distribute_aggregate_form_for_computation``, records success or the error text, rebuilds a
computation from each form that built (``get_computation_for_map_reduce_form`` /
``get_computation_for_distribute_aggregate_form``) and runs it on the test context with the same
inputs (for an iterative process: from the same initial state, for all rounds). Their outputs are
written under ``"mapreduce/..."`` and ``"distribute_aggregate/..."`` followed by the key they would
have had. A form failure does not fail the job.

Status and exit code
--------------------
``--status`` (default: ``status.json`` beside ``--outputs``) receives a JSON object:
``{"protocol": 1, "ok": bool, "error": str|null, "versions": {...}, "timings": {...},
"jobs": [{"ok": bool, "error": str|null, ...}], "ended_children": [{"pid", "cmdline"}]}``.
Computation jobs also carry ``"kind"``, ``"context"``, ``"secure_intrinsics"``, ``"timings"`` and
``"forms": {"mapreduce": {"built", "error", "build_s", "ran", "run_error", "run_s"}, ...}``.
Exit code 0: every job ran; 3: some job failed (see the status); 2: bad command line or spec;
1: the runner itself crashed (traceback on stderr and in the status).

Process hygiene
---------------
TFF's runtime starts a ``worker_binary`` child that inherits stdout and stderr and can outlive
Python, holding the caller's pipes open. At exit (normal, error, SIGTERM or SIGINT) the runner ends
every descendant process it started (SIGINT, which TFF itself uses, then SIGKILL after 3 s) and
lists them in ``ended_children``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# TF's C++ logging (CUDA probing, CPU feature notes) would bury the errors that matter in stderr.
# TF is imported lazily, after this line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROTOCOL = 1
SECURE_MARKER = "secure"
FORMS = ("mapreduce", "distribute_aggregate")


class ProtocolError(Exception):
  """The spec, manifest or inputs do not follow the protocol above (exit code 2 or a failed job)."""


# ----------------------------------------------------------------------------------------------
# Process hygiene: end TFF's worker_binary (and anything else we started) whatever happens.

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
  """Ends every descendant of this process: SIGINT first (TFF's own way), SIGKILL after 3 s."""
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


# ----------------------------------------------------------------------------------------------
# Files


def _load_npz(path: str | Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
  # np.savez appends ".npz" to names without it; write to the exact path the caller asked for.
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"


def _tensor_name(name: str) -> str:
  return name if ":" in name else f"{name}:0"


# ----------------------------------------------------------------------------------------------
# graph: plain GraphDefs in TF 2.14


def run_graph_jobs(jobs: list[dict], inputs: dict[str, np.ndarray], base: Path,
                   default_graph: str | None,
                   prefix: bool = True) -> tuple[dict[str, np.ndarray], list[dict]]:
  """Runs each job's GraphDef in its own tf.Graph and Session; returns outputs and job statuses.

  Outputs are keyed ``"{job index}/{name}"``, or just ``name`` without ``prefix`` (one job).
  """
  import tensorflow as tf

  outputs: dict[str, np.ndarray] = {}
  statuses = []
  cache: dict[Path, Any] = {}  # jobs often share one graph file: parse it once
  for i, job in enumerate(jobs):
    start = time.perf_counter()
    try:
      graph_file = job.get("graph", default_graph)
      if graph_file is None:
        raise ProtocolError(f"job {i} names no graph and no --graph was given")
      path = base / graph_file
      if path not in cache:
        cache[path] = tf.compat.v1.GraphDef.FromString(path.read_bytes())
      graph = tf.Graph()
      with graph.as_default():
        tf.graph_util.import_graph_def(cache[path], name="")
      feeds = {}
      for tensor, key in job.get("inputs", {}).items():
        if key not in inputs:
          raise ProtocolError(f"job {i}: input {tensor!r} names npz key {key!r}, which is absent")
        feeds[graph.get_tensor_by_name(_tensor_name(tensor))] = inputs[key]
      names = list(job["outputs"])
      fetches = [graph.get_tensor_by_name(_tensor_name(n)) for n in names]
      with tf.compat.v1.Session(graph=graph) as session:
        values = session.run(fetches, feed_dict=feeds)
      for name, value in zip(names, values):
        outputs[f"{i}/{name}" if prefix else name] = np.asarray(value)
      statuses.append({"ok": True, "error": None, "seconds": time.perf_counter() - start})
    except Exception as e:
      statuses.append({"ok": False, "error": _error_text(e),
                       "seconds": time.perf_counter() - start})
  return outputs, statuses


# ----------------------------------------------------------------------------------------------
# computation: TFF types <-> npz leaves


def _placement_name(federated_type: Any) -> str:
  return str(federated_type.placement.uri).upper()


def _struct_index(struct_type: Any, element: int | str, where: str) -> int:
  from tensorflow_federated import structure

  names = structure.name_list_with_nones(struct_type)
  if isinstance(element, int) and not isinstance(element, bool):
    if not 0 <= element < len(names):
      raise ProtocolError(f"{where}: index {element} out of range for {struct_type}")
    return element
  if element in names:
    return names.index(element)
  raise ProtocolError(f"{where}: no element named {element!r} in {struct_type}")


def _struct_step(type_: Any, rest: list, path: list, where: str) -> int:
  """Consumes the next element of ``rest`` as an index into the struct ``type_``."""
  import tensorflow_federated as tff

  if not isinstance(type_, tff.StructType):
    raise ProtocolError(f"{where}: path {path} goes into {type_}, which is not a struct")
  return _struct_index(type_, rest.pop(0), where)


def _require_tensor(type_: Any, path: list, where: str) -> None:
  import tensorflow_federated as tff

  if not isinstance(type_, tff.TensorType):
    raise ProtocolError(f"{where}: path {path} ends at {type_}, not at a tensor")


def _normalize_path(type_: Any, path: list, where: str) -> tuple[tuple[int, ...], str | None]:
  """Turns a manifest path into struct indexes; returns them and the leaf's placement."""
  import tensorflow_federated as tff

  indexes: list[int] = []
  placement = None
  rest = list(path)
  while True:
    if isinstance(type_, tff.FederatedType):
      placement = _placement_name(type_)
      type_ = type_.member
      continue
    if not rest:
      break
    index = _struct_step(type_, rest, path, where)
    indexes.append(index)
    type_ = type_[index]
  _require_tensor(type_, path, where)
  return tuple(indexes), placement


def _check_leaf(entry: dict, array: np.ndarray, tensor_type: Any, clients: bool,
                where: str) -> None:
  """Checks an array against its manifest entry and TFF tensor type (no silent casts)."""
  dtype = np.dtype(tensor_type.dtype)
  if array.dtype != dtype:
    raise ProtocolError(f"{where}: {entry['name']!r} has dtype {array.dtype}, the type says "
                        f"{dtype}")
  if "dtype" in entry and np.dtype(entry["dtype"]) != dtype:
    raise ProtocolError(f"{where}: manifest dtype {entry['dtype']} of {entry['name']!r} but the "
                        f"type says {dtype}")
  shape = array.shape[1:] if clients else array.shape
  expected = tuple(tensor_type.shape) if tensor_type.shape is not None else None
  if expected is not None and (
      len(shape) != len(expected)
      or any(e is not None and e != s for s, e in zip(shape, expected))):
    axis = " per client" if clients else ""
    raise ProtocolError(f"{where}: {entry['name']!r} has shape {shape}{axis}, the type says "
                        f"{list(expected)}")
  if "shape" in entry and entry["shape"] is not None and expected is not None and (
      len(entry["shape"]) != len(expected)
      or any(m is not None and e is not None and m != e for m, e in zip(entry["shape"], expected))):
    raise ProtocolError(f"{where}: manifest shape {entry['shape']} of {entry['name']!r} but the "
                        f"type says {list(expected)}")


def build_argument(param_type: Any, entries: list[dict], arrays: dict[str, np.ndarray],
                   fixed: dict[tuple[int, ...], Any] | None = None, where: str = "inputs") -> Any:
  """Builds the Python value TFF expects for ``param_type`` from npz leaves.

  ``fixed`` maps index paths to ready-made values (an iterative process's state).
  """
  import tensorflow_federated as tff
  from tensorflow_federated import structure

  fixed = dict(fixed or {})
  leaves: dict[tuple[int, ...], tuple[dict, np.ndarray]] = {}
  for entry in entries:
    name = entry["name"]
    if name not in arrays:
      raise ProtocolError(f"{where}: no array named {name!r} in the inputs "
                          f"(have {sorted(arrays)})")
    indexes, placement = _normalize_path(param_type, entry.get("path", []), f"{where} {name!r}")
    declared = entry.get("placement")
    if declared is not None and str(declared).upper() != placement:
      raise ProtocolError(f"{where}: {name!r} declared {declared} but the type places it at "
                          f"{placement}")
    if indexes in leaves or indexes in fixed:
      raise ProtocolError(f"{where}: two inputs claim path {list(indexes)}")
    leaves[indexes] = (entry, np.asarray(arrays[name]))

  used: set[tuple[int, ...]] = set()

  def under(prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [p for p in leaves if p[:len(prefix)] == prefix]

  def build(type_: Any, path: tuple[int, ...], client: int | None) -> Any:
    if path in fixed:
      used.add(path)
      return fixed[path]
    if isinstance(type_, tff.FederatedType):
      if _placement_name(type_) == "CLIENTS" and not type_.all_equal:
        if client is not None:
          raise ProtocolError(f"{where}: nested CLIENTS placement at {list(path)}")
        counts = {leaves[p][1].shape[0] if leaves[p][1].ndim else None for p in under(path)}
        if None in counts:
          raise ProtocolError(f"{where}: a CLIENTS input at {list(path)} has no client axis")
        if len(counts) != 1:
          raise ProtocolError(f"{where}: CLIENTS inputs under {list(path)} disagree on the "
                              f"number of clients: {sorted(counts)}")
        if not counts:
          raise ProtocolError(f"{where}: no CLIENTS input under {list(path)} tells the number of "
                              "clients")
        (n,) = counts
        return [build(type_.member, path, c) for c in range(n)]
      return build(type_.member, path, client)
    if isinstance(type_, tff.StructType):
      elements = structure.to_elements(type_)
      return structure.Struct([(name, build(t, (*path, i), client))
                               for i, (name, t) in enumerate(elements)])
    if isinstance(type_, tff.TensorType):
      if path not in leaves:
        raise ProtocolError(f"{where}: the parameter's tensor at path {list(path)} ({type_}) has "
                            "no input in the manifest")
      entry, array = leaves[path]
      if client is None or client == 0:
        _check_leaf(entry, array, type_, client is not None, where)
      used.add(path)
      value = array[client] if client is not None else array
      # 0-d arrays travel as numpy scalars, which every TFF value path accepts.
      return value[()] if np.ndim(value) == 0 else value
    raise ProtocolError(f"{where}: parameters of type {type_} are not supported by this runner")

  value = build(param_type, (), None)
  unused = [leaves[p][0]["name"] for p in leaves if p not in used]
  if unused:
    raise ProtocolError(f"{where}: inputs {unused} do not reach a tensor of the parameter")
  return value


def _element(value: Any, index: int) -> Any:
  from tensorflow_federated import structure

  if not isinstance(value, structure.Struct):
    value = structure.from_container(value)
  return value[index]


def select_output(value: Any, type_: Any, path: list,
                  where: str) -> tuple[np.ndarray, str | None, bool]:
  """Reads the leaf at ``path`` from a TFF result: (array, placement, stacked on a client axis)."""
  import tensorflow_federated as tff

  rest = list(path)
  placement = None
  while True:
    if isinstance(type_, tff.FederatedType):
      placement = _placement_name(type_)
      if placement == "CLIENTS" and not type_.all_equal:
        parts = [select_output(v, type_.member, rest, where)[0] for v in value]
        if not parts:
          raise ProtocolError(f"{where}: the CLIENTS result at {path} holds no clients")
        return np.stack(parts), placement, True
      type_ = type_.member
      if isinstance(type_, tff.TensorType) and not rest:
        return np.asarray(value), placement, False
      continue
    if not rest:
      break
    index = _struct_step(type_, rest, path, where)
    value, type_ = _element(value, index), type_[index]
  _require_tensor(type_, path, where)
  return np.asarray(value), placement, False


def extract_outputs(result: Any, result_type: Any, entries: list[dict], prefix: str,
                    where: str) -> dict[str, np.ndarray]:
  out = {}
  for entry in entries:
    array, placement, stacked = select_output(result, result_type, entry.get("path", []),
                                              f"{where} {entry['name']!r}")
    declared = entry.get("placement")
    if declared is not None and str(declared).upper() != (placement or ""):
      raise ProtocolError(f"{where}: {entry['name']!r} declared {declared} but the type places it "
                          f"at {placement}")
    if "dtype" in entry and array.dtype != np.dtype(entry["dtype"]):
      raise ProtocolError(f"{where}: {entry['name']!r} came back as {array.dtype}, the manifest "
                          f"says {entry['dtype']}")
    shape = array.shape[1:] if stacked else array.shape
    if entry.get("shape") is not None and (
        len(shape) != len(entry["shape"])
        or any(m is not None and m != s for m, s in zip(entry["shape"], shape))):
      raise ProtocolError(f"{where}: {entry['name']!r} came back with shape {list(shape)}"
                          f"{' per client' if stacked else ''}, the manifest says {entry['shape']}")
    out[prefix + entry["name"]] = array
  return out


# ----------------------------------------------------------------------------------------------
# computation: loading, contexts, execution, forms


def _intrinsic_uris(message: Any, found: set[str]) -> set[str]:
  """Every intrinsic URI in a Computation proto (GraphDefs inside stay opaque Any bytes)."""
  if message.DESCRIPTOR.name == "Intrinsic":
    found.add(message.uri)
  for field, value in message.ListFields():
    if field.type == field.TYPE_MESSAGE:
      for item in value if field.label == field.LABEL_REPEATED else [value]:
        _intrinsic_uris(item, found)
  return found


class Contexts:
  """Creates TFF's execution contexts lazily, once each: every context owns a worker_binary."""

  def __init__(self) -> None:
    self._made: dict[str, Any] = {}

  def get(self, name: str) -> Any:
    import tensorflow_federated as tff

    if name not in self._made:
      if name == "native":
        self._made[name] = tff.backends.native.create_sync_local_cpp_execution_context()
      else:
        self._made[name] = tff.backends.test.create_sync_test_cpp_execution_context()
    return self._made[name]

  def run(self, name: str, fn: Any, *args: Any) -> Any:
    import tensorflow_federated as tff

    with tff.framework.get_context_stack().install(self.get(name)):
      return fn(*args)


# Module-level on purpose: the workers must stay reachable until end_children() ends them, rather
# than depend on when garbage collection happens to run TFF's own cleanup.
_CONTEXTS = Contexts()


def _load_computation(path: Path) -> tuple[Any, Any]:
  import tensorflow_federated as tff
  from tensorflow_federated.proto.v0 import computation_pb2

  proto = computation_pb2.Computation.FromString(path.read_bytes())
  comp = tff.framework.ConcreteComputation(
      computation_proto=proto, context_stack=tff.framework.get_context_stack())
  return comp, proto


def _check_signature(comp: Any, block: dict, where: str) -> None:
  expected = block.get("type_signature")
  if expected is not None and str(comp.type_signature) != expected:
    raise ProtocolError(f"{where}: manifest type_signature {expected} but the computation has "
                        f"{comp.type_signature}")


_ROUND_KEY = re.compile(r"round\d+/")


def _round_inputs(arrays: dict[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
  """Inputs for round r: "round{r}/{name}" keys override "{name}"."""
  tag = f"round{r}/"
  merged = {k: v for k, v in arrays.items() if not _ROUND_KEY.match(k)}
  merged.update({k[len(tag):]: v for k, v in arrays.items() if k.startswith(tag)})
  return merged


class Program:
  """One export directory: a single computation or an initialize/next pair, ready to execute."""

  def __init__(self, export_dir: Path) -> None:
    self.dir = export_dir
    self.manifest = json.loads((export_dir / "manifest.json").read_text())
    if (export_dir / "computation.pb").exists():
      self.kind = "computation"
      block = self.manifest.get("computation", self.manifest)
      self.comp, proto = _load_computation(export_dir / "computation.pb")
      _check_signature(self.comp, block, "computation")
      self.blocks = {"computation": block}
      protos = [proto]
    elif (export_dir / "initialize.pb").exists() and (export_dir / "next.pb").exists():
      self.kind = "iterative_process"
      for key in ("initialize", "next"):
        if key not in self.manifest:
          raise ProtocolError(f"manifest.json of an iterative process has no {key!r} block")
      self.init, init_proto = _load_computation(export_dir / "initialize.pb")
      self.comp, next_proto = _load_computation(export_dir / "next.pb")
      _check_signature(self.init, self.manifest["initialize"], "initialize")
      _check_signature(self.comp, self.manifest["next"], "next")
      self.blocks = {"initialize": self.manifest["initialize"], "next": self.manifest["next"]}
      protos = [init_proto, next_proto]
    else:
      raise ProtocolError(f"{export_dir} holds neither computation.pb nor initialize.pb + next.pb")
    uris: set[str] = set()
    for proto in protos:
      _intrinsic_uris(proto, uris)
    self.secure = sorted(u for u in uris if SECURE_MARKER in u)
    self.context = "test" if self.secure else "native"

  def execute(self, contexts: Contexts, context: str, comp: Any, arrays: dict[str, np.ndarray],
              rounds: int | None) -> dict[str, np.ndarray]:
    """Runs the program with ``comp`` as the computation (or as ``next``); returns npz leaves."""
    if self.kind == "computation":
      if rounds is not None:
        raise ProtocolError("--rounds applies to iterative processes (initialize.pb + next.pb)")
      block = self.blocks["computation"]
      param = comp.type_signature.parameter
      args = () if param is None else (build_argument(param, block.get("inputs", []), arrays),)
      result = contexts.run(context, comp, *args)
      return extract_outputs(result, comp.type_signature.result, block.get("outputs", []), "",
                             "outputs")
    init_block, next_block = self.blocks["initialize"], self.blocks["next"]
    state = contexts.run(context, self.init)
    out = extract_outputs(state, self.init.type_signature.result, init_block.get("outputs", []),
                          "initialize/", "initialize outputs")
    self.round_s = []
    for r in range(1, (rounds or 1) + 1):
      arg = build_argument(comp.type_signature.parameter, next_block.get("inputs", []),
                           _round_inputs(arrays, r), fixed={(0,): state},
                           where=f"next inputs (round {r})")
      start = time.perf_counter()
      result = contexts.run(context, comp, arg)
      self.round_s.append(time.perf_counter() - start)  # per-round TFF time, for benchmarks
      out.update(extract_outputs(result, comp.type_signature.result,
                                 next_block.get("outputs", []), f"round{r}/", "next outputs"))
      state = _element(result, 0)
    return out


def _build_forms(comp: Any) -> dict[str, tuple[Any, dict]]:
  """Builds MapReduceForm and DistributeAggregateForm; returns rebuilt computations and status."""
  import tensorflow_federated as tff

  mr = tff.backends.mapreduce
  makers = {
      "mapreduce": (mr.get_map_reduce_form_for_computation, mr.get_computation_for_map_reduce_form),
      "distribute_aggregate": (mr.get_distribute_aggregate_form_for_computation,
                               mr.get_computation_for_distribute_aggregate_form),
  }
  built = {}
  for name, (to_form, from_form) in makers.items():
    start = time.perf_counter()
    status: dict[str, Any] = {"built": False, "error": None, "ran": False, "run_error": None}
    rebuilt = None
    try:
      rebuilt = from_form(to_form(comp))
      status["built"] = True
    except Exception as e:
      status["error"] = _error_text(e)
    status["build_s"] = time.perf_counter() - start
    built[name] = (rebuilt, status)
  return built


def run_computation_job(job: dict, base: Path, contexts: Contexts) -> dict:
  """Runs one export directory; writes its outputs npz and returns its status entry."""
  status: dict[str, Any] = {"ok": False, "error": None, "dir": str(job.get("dir")), "timings": {}}
  timings = status["timings"]
  try:
    start = time.perf_counter()
    program = Program(base / job["dir"])
    arrays = _load_npz(base / job["inputs"]) if job.get("inputs") else {}
    timings["load_s"] = time.perf_counter() - start
    status.update(kind=program.kind, context=program.context, secure_intrinsics=program.secure)
    rounds = job.get("rounds")
    start = time.perf_counter()
    outputs = program.execute(contexts, program.context, program.comp, arrays, rounds)
    timings["execute_s"] = time.perf_counter() - start
    if program.kind == "iterative_process":
      timings["round_s"] = list(program.round_s)
    if job.get("forms"):
      start = time.perf_counter()
      status["forms"] = {}
      for name, (rebuilt, form_status) in _build_forms(program.comp).items():
        if rebuilt is not None:
          run_start = time.perf_counter()
          try:
            # Rebuilt forms hold secure-sum slots (empty or not): only the test context runs them.
            rebuilt_out = program.execute(contexts, "test", rebuilt, arrays, rounds)
            outputs.update({f"{name}/{k}": v for k, v in rebuilt_out.items()})
            form_status["ran"] = True
          except Exception as e:
            form_status["run_error"] = _error_text(e)
          form_status["run_s"] = time.perf_counter() - run_start
        status["forms"][name] = form_status
      timings["forms_s"] = time.perf_counter() - start
    _save_npz(base / job["outputs"], outputs)
    status["ok"] = True
  except Exception as e:
    status["error"] = _error_text(e)
    if not isinstance(e, ProtocolError):
      status["traceback"] = traceback.format_exc()
  return status


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  sub = parser.add_subparsers(dest="command", required=True)
  graph = sub.add_parser("graph", help="run plain-TF GraphDefs in TF 2.14")
  graph.add_argument("--spec", help="jobs JSON (see the module docstring)")
  graph.add_argument("--graph", help="GraphDef file (default graph of the spec's jobs)")
  graph.add_argument("--fetch", action="append", default=[], help="tensor to fetch (no --spec)")
  graph.add_argument("--inputs", required=True)
  graph.add_argument("--outputs", required=True)
  graph.add_argument("--status")
  comp = sub.add_parser("computation", help="execute exported computations with TFF")
  comp.add_argument("--spec", help="jobs JSON (instead of --dir/--inputs/--outputs)")
  comp.add_argument("--dir")
  comp.add_argument("--inputs")
  comp.add_argument("--outputs")
  comp.add_argument("--rounds", type=int)
  comp.add_argument("--forms", action="store_true")
  comp.add_argument("--status")
  return parser


def _status_path(args: argparse.Namespace) -> Path | None:
  if args.status:
    return Path(args.status)
  if getattr(args, "outputs", None):
    return Path(args.outputs).with_name("status.json")
  if getattr(args, "spec", None):
    return Path(args.spec).with_name("status.json")
  return None


def _versions(with_tff: bool) -> dict[str, str]:
  import tensorflow as tf

  versions = {"python": sys.version.split()[0], "numpy": np.__version__,
              "tensorflow": tf.__version__}
  if with_tff:
    import tensorflow_federated as tff

    versions["tensorflow_federated"] = tff.__version__
  return versions


def _run(args: argparse.Namespace, status: dict) -> int:
  timings = status["timings"]
  if args.command == "graph":
    start = time.perf_counter()
    inputs = _load_npz(args.inputs)
    graph = args.graph and str(Path(args.graph).resolve())
    if args.spec:
      spec_path = Path(args.spec)
      jobs, base = json.loads(spec_path.read_text())["jobs"], spec_path.parent
    elif args.graph:
      if not args.fetch:
        raise ProtocolError("graph --graph needs --fetch (or use --spec)")
      # One job: the npz keys are the placeholder names.
      jobs, base = [{"inputs": {k: k for k in inputs}, "outputs": args.fetch}], Path.cwd()
    else:
      raise ProtocolError("graph needs --spec or --graph")
    import tensorflow  # noqa: F401  (timed apart from the jobs)

    timings["import_s"] = time.perf_counter() - start
    status["versions"] = _versions(with_tff=False)
    start = time.perf_counter()
    outputs, status["jobs"] = run_graph_jobs(jobs, inputs, base, graph, prefix=bool(args.spec))
    timings["run_s"] = time.perf_counter() - start
    _save_npz(args.outputs, outputs)
  else:
    if args.spec:
      spec_path = Path(args.spec)
      jobs, base = json.loads(spec_path.read_text())["jobs"], spec_path.parent
    else:
      if not (args.dir and args.inputs and args.outputs):
        raise ProtocolError("computation needs --spec, or --dir, --inputs and --outputs")
      jobs = [{"dir": args.dir, "inputs": args.inputs, "outputs": args.outputs,
               "rounds": args.rounds, "forms": args.forms}]
      base = Path.cwd()
    start = time.perf_counter()
    import tensorflow_federated  # noqa: F401

    timings["import_s"] = time.perf_counter() - start
    status["versions"] = _versions(with_tff=True)
    start = time.perf_counter()
    status["jobs"] = [run_computation_job(job, base, _CONTEXTS) for job in jobs]
    timings["run_s"] = time.perf_counter() - start
  return 0 if all(job["ok"] for job in status["jobs"]) else 3


def main(argv: list[str] | None = None) -> int:
  started = time.perf_counter()
  signal.signal(signal.SIGTERM, _on_sigterm)
  atexit.register(end_children)
  args = _parser().parse_args(argv)
  status: dict[str, Any] = {"protocol": PROTOCOL, "ok": False, "error": None, "versions": {},
                            "timings": {}, "jobs": [], "ended_children": []}
  code = 1
  try:
    code = _run(args, status)
  except ProtocolError as e:
    status["error"], code = _error_text(e), 2
    print(f"tff_runner: {status['error']}", file=sys.stderr)
  except BaseException as e:
    status["error"] = _error_text(e)
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


if __name__ == "__main__":
  exit_code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  # The workers are ended and the status is written: skip the interpreter's teardown of TF/TFF,
  # which costs about a second and makes TFF's finalizers signal workers that are already gone.
  os._exit(exit_code)

"""The ``computation`` subcommand: export directories loaded and executed on TFF.

An export is one ``computation.pb`` or an ``initialize.pb`` + ``next.pb`` pair, each described by a
signature block of ``manifest.json`` (``docs/tff_runner_protocol.md``).
"""

from __future__ import annotations

import json
import re
import stat
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2

from . import forms
from .contexts import SECURE_MARKER, Contexts, default_clients, scan_proto
from .protocol import PROGRESS, ProtocolError, error_text, load_npz, save_npz
from .values import build_argument, element, extract_outputs

# Far above any real export's computation or manifest: a hostile one cannot make the runner read
# without bound (the core checks the same limits before it starts the runner).
_MAX_FILE_BYTES = 4 << 30


def _export_file(export_dir: Path, name: str) -> Path:
  """``export_dir / name``, refused unless it is a regular file there: never a symbolic link (which
  could name a file outside the export) or anything else. The runner opens only fixed names (no
  path from the export's JSON), and checks each itself: it trusts no other process's checks."""
  path = export_dir / name
  try:
    info = path.lstat()
  except FileNotFoundError:
    raise ProtocolError(f"{export_dir} has no {name}") from None
  if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
    raise ProtocolError(f"{path} is not a regular file (an export holds regular files only)")
  if info.st_size > _MAX_FILE_BYTES:
    raise ProtocolError(f"{path} is {info.st_size} bytes, over {_MAX_FILE_BYTES}")
  return path


def _load_computation(path: Path) -> tuple[Any, Any]:
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
    self.manifest = json.loads(_export_file(export_dir, "manifest.json").read_text())
    if not isinstance(self.manifest, dict):
      raise ProtocolError(f"{export_dir}/manifest.json is not a JSON object")
    if (export_dir / "computation.pb").exists():
      self.kind = "computation"
      roles = {"computation": "computation.pb"}
      self.blocks = {"computation": self.manifest.get("computation", self.manifest)}
    elif (export_dir / "initialize.pb").exists() and (export_dir / "next.pb").exists():
      self.kind = "iterative_process"
      roles = {"initialize": "initialize.pb", "next": "next.pb"}
      for key in roles:
        if key not in self.manifest:
          raise ProtocolError(f"manifest.json of an iterative process has no {key!r} block")
      self.blocks = {key: self.manifest[key] for key in roles}
    else:
      raise ProtocolError(f"{export_dir} holds neither computation.pb nor initialize.pb + next.pb")
    self.comps: dict[str, Any] = {}
    self.uses_clients: dict[str, bool] = {}
    intrinsics: set[str] = set()
    for role, file in roles.items():
      comp, proto = _load_computation(_export_file(export_dir, file))
      _check_signature(comp, self.blocks[role], role)
      placements: set[str] = set()
      scan_proto(proto, intrinsics, placements)
      self.comps[role] = comp
      self.uses_clients[role] = "clients" in placements
    # The computation run by --forms and fed the data: the computation, or next.
    self.comp = self.comps["next" if self.kind == "iterative_process" else "computation"]
    self.secure = sorted(u for u in intrinsics if SECURE_MARKER in u)
    self.context = "test" if self.secure else "native"
    self.round_s: list[float] = []

  def _call(self, contexts: Contexts, context: str, role: str, comp: Any,
            arrays: dict[str, np.ndarray], fixed: dict | None, where: str) -> Any:
    block = self.blocks[role]
    param = comp.type_signature.parameter
    args: tuple = ()
    if param is None:
      from_inputs = None
    else:
      arg, from_inputs = build_argument(param, block.get("inputs", []), arrays, fixed=fixed,
                                        where=where)
      args = (arg,)
    clients = default_clients(block, from_inputs, self.uses_clients[role], where)
    return contexts.run(context, clients, comp, *args)

  def execute(self, contexts: Contexts, context: str, comp: Any, arrays: dict[str, np.ndarray],
              rounds: int | None, form: str | None = None) -> dict[str, np.ndarray]:
    """Runs the program with ``comp`` as the computation (or as ``next``; ``form`` names the form
    it was rebuilt from, if any); returns npz leaves. Each call of a computation is reported to
    ``--progress`` as it starts."""
    if self.kind == "computation":
      if rounds is not None:
        raise ProtocolError("--rounds applies to iterative processes (initialize.pb + next.pb)")
      PROGRESS.report("round", computation="computation", round=0, rounds=0, form=form)
      result = self._call(contexts, context, "computation", comp, arrays, None, "inputs")
      return extract_outputs(result, comp.type_signature.result,
                             self.blocks["computation"].get("outputs", []), "", "outputs")
    init = self.comps["initialize"]
    PROGRESS.report("round", computation="initialize", round=0, rounds=rounds or 1, form=form)
    state = self._call(contexts, context, "initialize", init, {}, None, "initialize")
    out = extract_outputs(state, init.type_signature.result,
                          self.blocks["initialize"].get("outputs", []), "initialize/",
                          "initialize outputs")
    self.round_s = []
    for r in range(1, (rounds or 1) + 1):
      PROGRESS.report("round", computation="next", round=r, rounds=rounds or 1, form=form)
      start = time.perf_counter()
      result = self._call(contexts, context, "next", comp, _round_inputs(arrays, r),
                          {(0,): state}, f"next inputs (round {r})")
      self.round_s.append(time.perf_counter() - start)  # per-round TFF time, for benchmarks
      out.update(extract_outputs(result, comp.type_signature.result,
                                 self.blocks["next"].get("outputs", []), f"round{r}/",
                                 "next outputs"))
      state = element(result, 0)
    return out


def run_computation_job(job: dict, base: Path, contexts: Contexts) -> dict:
  """Runs one export directory; writes its outputs npz and returns its status entry."""
  status: dict[str, Any] = {"ok": False, "error": None, "dir": str(job.get("dir")), "timings": {}}
  timings = status["timings"]
  try:
    start = time.perf_counter()
    program = Program(base / job["dir"])
    arrays = load_npz(base / job["inputs"]) if job.get("inputs") else {}
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
      status["forms"] = forms.run_forms(program, contexts, arrays, rounds, outputs)
      timings["forms_s"] = time.perf_counter() - start
    save_npz(base / job["outputs"], outputs)
    status["ok"] = True
  except Exception as e:
    status["error"] = error_text(e)
    if not isinstance(e, ProtocolError):
      status["traceback"] = traceback.format_exc()
  return status

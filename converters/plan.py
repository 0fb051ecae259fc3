"""The runtime-neutral plan: how one round of a federated program is orchestrated, as JSON.

``plan.json`` (schema: ``plan.schema.json`` beside this module) describes a program exported to a
device target (stablehlo, tflite) without any Python: per computation (``computation``, or ``initialize`` and
``next`` for an iterative process) its inputs and outputs with placements, its stages (the
``server_prepare`` piece, the broadcast names, the ``client_work`` piece run once per client, the
uploads and how each is aggregated) and the ``server_result`` piece, every tensor's name, per-client
shape and dtype, and the file of each piece in each format the target wrote. An iterative process
adds ``state``: which outputs feed which ``next`` inputs.

``run_plan`` is the orchestration every runtime shares (IREE, LiteRT, jax.export): it reads only the
plan and runs it with :func:`faxbridge._src.form.interpret`, one client at a time, calling pieces through
a runtime's ``call(piece, args)``; aggregations follow their rules in
:func:`faxbridge.extend.aggregation_rule` (built-in kinds, and those of installed packages, found
through their entry points). A runtime adds nothing but "how to run one piece".
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge import SERVER
from faxbridge.extend import (
  ExportError,
  FederatedForm,
  PerClientBackend,
  RaggedSpec,
  SplitProgram,
  VerificationError,
  aggregation_rule,
  contained_file,
  interpret,
  number_of_clients,
  own_length,
  read_json,
  run_program,
)

PLAN_VERSION = 1
PLAN_FILE = "plan.json"

# (computation name, piece) -> {format: relative file path}: what a target wrote for a piece.
PieceFiles = Callable[[str, Any], dict[str, str]]
# (piece entry of the plan, argument arrays in its input order) -> output arrays in its output order.
PieceCall = Callable[[dict, list[np.ndarray]], Sequence[np.ndarray]]


# --------------------------------------------------------------------------------------------------
# Building: a split program -> plan dict.
# --------------------------------------------------------------------------------------------------
def build_plan(split: SplitProgram, piece_files: PieceFiles) -> dict:
  """``plan.json`` of a split program.

  ``piece_files(comp_name, piece)`` returns the files a target wrote for that piece (it is called
  once per piece that has outputs, in plan order, so a target can write them from there). A piece
  without outputs computes nothing anybody reads: it gets no files and runtimes skip it.
  """
  computations = {
      name: form.with_files(functools.partial(piece_files, name)).to_json()
      for name, form in split.forms.items()}
  clients = split.forms["next" if split.kind == "iterative_process" else "computation"].clients
  plan = {"plan_version": PLAN_VERSION, "name": split.name, "kind": split.kind,
          "clients": clients, "computations": computations}
  if split.state is not None:
    plan["state"] = split.state
  check_plan(plan, error=ExportError)
  return plan


def write_plan(plan: dict, out: Path) -> None:
  """Write ``plan.json`` canonically (sorted keys), so equal plans are equal bytes."""
  (out / PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Loading and checking.
# --------------------------------------------------------------------------------------------------
SCHEMA = Path(__file__).with_name("plan.schema.json")


def load_plan(export_dir: str | os.PathLike, data: bytes | None = None,
              pieces_present: bool = True) -> dict:
  """Read and check ``plan.json`` of an export, as untrusted input (faxbridge.extend.read_json):
  valid under ``plan.schema.json``, every piece's file a regular file inside the export.
  ``data``: the plan's bytes as already read (and hashed), parsed instead of a second read;
  ``pieces_present=False``: a folder that holds the plan but not its pieces (a Flower node's app).

  Raises:
    VerificationError: missing, linked, invalid under the schema (naming the JSON path), of another
      plan version, a piece file outside the export or missing, or not self-consistent (see
      check_plan).
  """
  export_dir = Path(export_dir)
  if not os.path.lexists(export_dir / PLAN_FILE):
    raise VerificationError(f"{export_dir / PLAN_FILE} is missing: export with --target=stablehlo "
                            "or --target=tflite")
  path = contained_file(export_dir, PLAN_FILE, str(export_dir))
  plan = read_json(path, SCHEMA, str(path), data)
  for name, comp in plan["computations"].items() if pieces_present else ():
    for piece in pieces({"computations": {name: comp}}):
      for fmt, rel in piece["files"].items():
        contained_file(export_dir, rel, f"{path} $.computations.{name} piece {piece['name']} {fmt}")
  check_plan(plan)
  return plan


def piece_file(export_dir: str | os.PathLike, piece: dict, fmt: str) -> Path:
  """The file of ``piece`` in format ``fmt`` (``"jax"``, ``"tflite"``, ...), checked to be a regular
  file inside the export (every runtime opens piece files through this)."""
  return contained_file(Path(export_dir), piece["files"][fmt], f"{PLAN_FILE} piece {piece['name']}")


def _sig(spec: dict) -> tuple:
  return tuple(spec["shape"]), spec["dtype"]


def _check_reads(env: dict, specs: list[dict], where: str, problems: list[str]) -> None:
  for s in specs:
    if s["name"] not in env:
      problems.append(f"{where}: reads {s['name']!r}, which nothing defines before")
    elif env[s["name"]] != _sig(s):
      problems.append(f"{where}: reads {s['name']!r} as {_sig(s)}, defined as {env[s['name']]}")


def _check_computation(name: str, comp: dict, problems: list[str]) -> None:
  server: dict[str, tuple] = {}
  client: dict[str, tuple] = {}
  for b in comp["inputs"]:
    (server if b["placement"] == "SERVER" else client)[b["name"]] = _sig(b)
  for stage in comp["stages"]:
    prep, work = stage["server_prepare"], stage["client_work"]
    _check_reads(server, prep["inputs"], f"{name}/{prep['name']}", problems)
    server.update((s["name"], _sig(s)) for s in prep["outputs"])
    for sent in stage["broadcasts"]:
      if sent not in server:
        problems.append(f"{name}: broadcast of undefined {sent!r}")
      else:
        client[sent] = server[sent]
    _check_reads(client, work["inputs"], f"{name}/{work['name']}", problems)
    client.update((s["name"], _sig(s)) for s in work["outputs"])
    for agg in stage["aggregations"]:
      try:
        declared = aggregation_rule(agg["kind"]).params
      except LookupError as e:
        problems.append(f"{name}: {e}")
      else:
        given = sorted(agg.get("params", {}))
        if given != sorted(declared):
          problems.append(f"{name}: aggregation {agg['kind']!r} of {agg['value']!r} has params "
                          f"{given}, its rule takes {sorted(declared)}")
      for key in ("value", "weight"):
        if agg.get(key) is not None and agg[key] not in client:
          problems.append(f"{name}: aggregation of undefined upload {agg[key]!r}")
      server[agg["result"]["name"]] = _sig(agg["result"])
  result = comp["server_result"]
  _check_reads(server, result["inputs"], f"{name}/server_result", problems)
  server.update((s["name"], _sig(s)) for s in result["outputs"])
  for b in comp["outputs"]:
    _check_reads(server if b["placement"] == "SERVER" else client, [b], f"{name}/outputs", problems)


def check_plan(plan: dict, error: type[Exception] = VerificationError) -> None:
  """Check that every name a piece, broadcast or aggregation reads is defined by then, with the
  shape and dtype it expects, and every output exists: the plan alone suffices to run a round.

  Raises:
    ``error`` (VerificationError by default), listing every problem found.
  """
  problems: list[str] = []
  for name, comp in plan["computations"].items():
    _check_computation(name, comp, problems)
  if problems:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise error("plan.json is not self-consistent: " + "; ".join(problems[:5]) + more)


# --------------------------------------------------------------------------------------------------
# Running: the orchestration every runtime shares.
# --------------------------------------------------------------------------------------------------
def run_plan(plan: dict, call: PieceCall, inputs: dict[str, np.ndarray],
             rounds: int, who: str = "") -> dict[str, np.ndarray]:
  """Run a whole plan one client at a time: a computation once, or an iterative process's
  ``initialize`` and ``rounds`` rounds of ``next``, the state fed back as ``plan["state"]`` says.

  Outputs are keyed as ``fb.verify`` keys them: ``NAME``, or ``initialize/NAME`` and
  ``round{r}/NAME``. ``inputs`` of an iterative process are next's inputs after the state.
  ``who`` (the runtime's name) labels the round events. A client's leaves of an ``fb.ragged``
  input (padded ``[clients, L, ...]`` arrays and the counts in ``inputs``) reach its pieces as its
  own rows, padded to whole batches (:func:`own_rows`), never the others' padding.

  Raises:
    VerificationError: a piece returns values that do not match the plan, or the number of
      clients cannot be told.
  """
  forms = {name: FederatedForm.from_json(comp, name)
           for name, comp in plan["computations"].items()}

  def run(name: str, named: dict) -> dict:
    form = forms[name]
    ragged = {b.name: b.ragged for b in form.inputs if b.ragged is not None}

    def call_piece(piece, args: list[np.ndarray]) -> Sequence[np.ndarray]:
      return call(_entry(piece), own_rows([s.name for s in piece.inputs], args, ragged)
                  if ragged else args)

    try:
      backend = PerClientBackend(number_of_clients(form, named), call_piece)
      return interpret(form, backend, backend.inputs(form, named))
    except ValueError as e:
      raise VerificationError(f"{name}: {e}") from None

  def _entry(piece) -> dict:
    return piece.to_json(SERVER)  # runtimes look pieces up by name and files

  return run_program(plan["kind"], run, inputs, rounds, plan.get("state"), who=who)


def own_rows(names: Sequence[str], args: Sequence[np.ndarray],
             ragged: Mapping[str, RaggedSpec]) -> list[np.ndarray]:
  """One client's arguments of a piece (its inputs' ``names``) with each ragged leaf (the inputs
  ``ragged`` names: the form's inputs whose ``plan.json`` binding has a ``ragged`` block, a
  ``{name: RaggedSpec}``) zero-padded from its own rows
  to ``own_length(rows, batch_size)``: whole batches, at least one, what a piece exported with
  the symbolic length ``b*k`` (``k >= 1``) takes. An empty client gets one batch of zeros (its
  count, 0, keeps them out of every value). The plan's shape of the leaf is the length it was
  traced with, not a bound: axis 0 is the client's own.
  """
  out = []
  for name, x in zip(names, args):
    r = ragged.get(name)
    if r is not None and x.shape[0] != own_length(x.shape[0], r.batch_size):
      padded = np.zeros((own_length(x.shape[0], r.batch_size), *x.shape[1:]), x.dtype)
      padded[: x.shape[0]] = x
      x = padded
    out.append(x)
  return out


def pieces(plan: dict) -> list[dict]:
  """Every piece entry of the plan that has files (what a runtime loads), in plan order."""
  out = []
  for comp in plan["computations"].values():
    for stage in comp["stages"]:
      out += [stage["server_prepare"], stage["client_work"]]
    out.append(comp["server_result"])
  return [p for p in out if p["files"]]


__all__ = ["PLAN_FILE", "PLAN_VERSION", "SCHEMA", "build_plan", "check_plan", "load_plan", "own_rows",
           "piece_file", "pieces", "run_plan", "write_plan"]

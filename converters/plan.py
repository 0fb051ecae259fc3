"""The runtime-neutral plan: how one round of a federated program is orchestrated, as JSON.

``plan.json`` (schema: ``docs/plan.schema.json``) describes a program exported to a device target
(stablehlo, tflite) without any Python: per computation (``computation``, or ``initialize`` and
``next`` for an iterative process) its inputs and outputs with placements, its stages (the
``server_prepare`` piece, the broadcast names, the ``client_work`` piece run once per client, the
uploads and how each is aggregated) and the ``server_result`` piece, every tensor's name, per-client
shape and dtype, and the file of each piece in each format the target wrote. An iterative process
adds ``state``: which outputs feed which ``next`` inputs.

``run_plan`` is the orchestration every runtime shares (IREE, LiteRT, jax.export): it reads only the
plan, calls pieces through a runtime's ``call(piece, args)`` and aggregates with numpy, so a
runtime adds nothing but "how to run one piece".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.errors import ExportError, VerificationError

PLAN_VERSION = 1
PLAN_FILE = "plan.json"
AGGREGATION_KINDS = ("sum", "mean", "weighted_mean", "secure_sum", "max", "min")

# (computation name, piece) -> {format: relative file path}: what a target wrote for a piece.
PieceFiles = Callable[[str, Any], dict[str, str]]
# (piece entry of the plan, argument arrays in its input order) -> output arrays in its output order.
PieceCall = Callable[[dict, list[np.ndarray]], Sequence[np.ndarray]]


# --------------------------------------------------------------------------------------------------
# Building: FederatedForm -> plan dict. (jax and the splitter are imported where used: the loading
# and running halves below need only numpy, and runtimes import this module.)
# --------------------------------------------------------------------------------------------------
def _piece_json(piece, placement: str, files: dict[str, str]) -> dict:
  return {"name": piece.name, "placement": placement,
          "inputs": [s.to_json() for s in piece.inputs],
          "outputs": [s.to_json() for s in piece.outputs],
          "files": dict(sorted(files.items()))}


def computation_plan(form, comp_name: str, piece_files: PieceFiles) -> dict:
  """The plan block of one split computation; ``piece_files`` names the files of each piece.

  A piece without outputs computes nothing anybody reads: it gets no files and runtimes skip it.
  """

  def files(piece) -> dict[str, str]:
    return piece_files(comp_name, piece) if piece.outputs else {}

  stages = []
  for stage in form.stages:
    stages.append({
        "index": stage.index,
        "server_prepare": _piece_json(stage.server_prepare, "SERVER", files(stage.server_prepare)),
        "broadcasts": list(stage.broadcasts),
        "client_work": _piece_json(stage.client_work, "CLIENTS", files(stage.client_work)),
        "uploads": list(stage.uploads),
        "aggregations": [a.to_json() for a in stage.aggregations],
        "bytes_per_client": stage.bytes_per_client(),
    })
  from faxbridge.split import leaf_paths

  in_paths, out_paths = leaf_paths(form.in_tree), leaf_paths(form.out_tree)
  return {
      "inputs": [{**b.to_json(), "path": p} for b, p in zip(form.inputs, in_paths)],
      "outputs": [{**b.to_json(), "path": p} for b, p in zip(form.outputs, out_paths)],
      "stages": stages,
      "server_result": _piece_json(form.server_result, "SERVER", files(form.server_result)),
  }


def _state_links(sources: list[dict], targets: list[dict], what: str) -> list[dict]:
  if len(sources) != len(targets) or any(
      (s["shape"], s["dtype"]) != (t["shape"], t["dtype"]) for s, t in zip(sources, targets)):
    show = lambda specs: [(s["name"], s["shape"], s["dtype"]) for s in specs]
    raise ExportError(f"{what} must match next's state argument: got {show(sources)}, next takes "
                      f"{show(targets)}")
  return [{"from": s["name"], "to": t["name"]} for s, t in zip(sources, targets)]


def build_plan(program, example_args: Sequence[Any], piece_files: PieceFiles) -> dict:
  """``plan.json`` of a computation or IterativeProcess for the signature of ``example_args``.

  ``piece_files(comp_name, piece)`` returns the files a target wrote for that piece (it is called
  once per piece that has outputs, in plan order, so a target can write them from there).

  Raises:
    ExportError: the program cannot be split, or next's state does not match initialize.
  """
  from faxbridge.computation import Computation
  from faxbridge.iterative import IterativeProcess
  from faxbridge.split import split

  if isinstance(program, IterativeProcess):
    init_form = split(program.initialize)
    next_form = split(program.next, program.state_spec(), *example_args)
    computations = {"initialize": computation_plan(init_form, "initialize", piece_files),
                    "next": computation_plan(next_form, "next", piece_files)}
    nxt = computations["next"]
    state_in = [s for s in nxt["inputs"] if s["path"][0] == 0]
    # next returns (state, metrics) or just the state, as IterativeProcess.run reads it.
    returns_tuple = _is_tuple(next_form.out_tree)
    state_out = [s for s in nxt["outputs"] if not returns_tuple or s["path"][0] == 0]
    state = {
        "initialize_to_next": _state_links(computations["initialize"]["outputs"], state_in,
                                           "initialize's result"),
        "next_to_next": _state_links(state_out, state_in, "next's returned state"),
    }
    kind, clients, extra = "iterative_process", next_form.clients, {"state": state}
  elif isinstance(program, Computation):
    form = split(program, *example_args)
    computations = {"computation": computation_plan(form, "computation", piece_files)}
    kind, clients, extra = "computation", form.clients, {}
  else:
    raise ExportError(f"cannot export {type(program).__name__}: expected fb.computation or "
                      "fb.IterativeProcess")
  plan = {"plan_version": PLAN_VERSION, "name": program.__name__, "kind": kind,
          "clients": clients, "computations": computations, **extra}
  check_plan(plan, error=ExportError)
  return plan


def _is_tuple(tree) -> bool:
  import jax

  return isinstance(jax.tree.unflatten(tree, [0] * tree.num_leaves), tuple)


def manifest_blocks(plan: dict) -> dict:
  """The ``fb.verify`` blocks of the manifest: every input and output leaf (for ``next``, the
  inputs after the state), the number of stages and the bytes each client moves."""

  def block(comp: dict, skip_state: bool) -> dict:
    inputs = [s for s in comp["inputs"] if not (skip_state and s["path"][0] == 0)]
    return {"inputs": inputs, "outputs": comp["outputs"], "stages": len(comp["stages"]),
            "bytes_per_client": [s["bytes_per_client"] for s in comp["stages"]]}

  comps = plan["computations"]
  if plan["kind"] == "iterative_process":
    return {"initialize": block(comps["initialize"], False), "next": block(comps["next"], True)}
  return {"computation": block(comps["computation"], False)}


def write_plan(plan: dict, out: Path) -> None:
  """Write ``plan.json`` canonically (sorted keys), so equal plans are equal bytes."""
  (out / PLAN_FILE).write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Loading and checking.
# --------------------------------------------------------------------------------------------------
def load_plan(export_dir: str | os.PathLike) -> dict:
  """Read and check ``plan.json`` of an export.

  Raises:
    VerificationError: missing, of another plan version, or not self-consistent (see check_plan).
  """
  path = Path(export_dir) / PLAN_FILE
  if not path.is_file():
    raise VerificationError(f"{path} is missing: export with --target=stablehlo or --target=tflite")
  plan = json.loads(path.read_text())
  if plan.get("plan_version") != PLAN_VERSION:
    raise VerificationError(f"{path}: plan_version {plan.get('plan_version')!r}, this faxbridge "
                            f"reads version {PLAN_VERSION}")
  check_plan(plan)
  return plan


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
      if agg["kind"] not in AGGREGATION_KINDS:
        problems.append(f"{name}: unknown aggregation kind {agg['kind']!r}")
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
    raise error("plan.json is not self-consistent:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# Running: the orchestration every runtime shares.
# --------------------------------------------------------------------------------------------------
def aggregate(kind: str, values: np.ndarray, weights: np.ndarray | None, dtype: str) -> np.ndarray:
  """Combine per-client ``values`` stacked on axis 0 (numpy; the semantics of split.aggregate).

  ``secure_sum`` is a sum: its bitwidth bounds the values a secure aggregator must carry, it does
  not change the result.
  """
  dt = np.dtype(dtype)
  if kind in ("sum", "secure_sum"):
    return np.sum(values, axis=0, dtype=values.dtype).astype(dt)
  if kind == "mean":
    return np.mean(values.astype(dt), axis=0, dtype=dt)
  if kind == "weighted_mean":
    w = weights.astype(dt).reshape(weights.shape + (1,) * (values.ndim - weights.ndim))
    return (np.sum(w * values.astype(dt), axis=0, dtype=dt) / np.sum(w, axis=0, dtype=dt)).astype(dt)
  if kind == "max":
    return np.max(values, axis=0).astype(dt)
  if kind == "min":
    return np.min(values, axis=0).astype(dt)
  raise VerificationError(f"unknown aggregation kind {kind!r}")


def _number_of_clients(plan: dict, comp: dict, inputs: dict[str, np.ndarray]) -> int:
  counts = {int(np.shape(inputs[b["name"]])[0]) for b in comp["inputs"] if b["placement"] == "CLIENTS"}
  if len(counts) > 1:
    raise VerificationError(f"CLIENTS inputs disagree on the number of clients: {sorted(counts)}")
  return counts.pop() if counts else int(plan.get("clients") or 0)


def _call(call: PieceCall, piece: dict, env: dict) -> dict:
  if not piece["outputs"]:
    return {}
  args = [np.asarray(env[s["name"]]) for s in piece["inputs"]]
  outs = list(call(piece, args))
  if len(outs) != len(piece["outputs"]):
    raise VerificationError(f"{piece['name']} returned {len(outs)} values, the plan lists "
                            f"{len(piece['outputs'])}")
  result = {}
  for spec, value in zip(piece["outputs"], outs):
    value = np.asarray(value)
    if value.shape != tuple(spec["shape"]) or value.dtype != np.dtype(spec["dtype"]):
      raise VerificationError(f"{piece['name']} output {spec['name']}: got {value.dtype}"
                              f"{list(value.shape)}, the plan says {spec['dtype']}{spec['shape']}")
    result[spec["name"]] = value
  return result


def run_computation(plan: dict, comp_name: str, call: PieceCall,
                    inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One computation of the plan for N clients: the outputs by name (CLIENTS outputs stacked).

  ``inputs``: every input by name, CLIENTS ones stacked on a leading client axis.
  """
  comp = plan["computations"][comp_name]
  n = _number_of_clients(plan, comp, inputs)
  server = {b["name"]: inputs[b["name"]] for b in comp["inputs"] if b["placement"] == "SERVER"}
  clients = [{b["name"]: inputs[b["name"]][i] for b in comp["inputs"] if b["placement"] == "CLIENTS"}
             for i in range(n)]
  for stage in comp["stages"]:
    server.update(_call(call, stage["server_prepare"], server))
    for env in clients:
      env.update({name: server[name] for name in stage["broadcasts"]})  # the broadcast
      env.update(_call(call, stage["client_work"], env))  # once per client
    for agg in stage["aggregations"]:
      result = agg["result"]
      values = np.stack([env[agg["value"]] for env in clients])
      weights = np.stack([env[agg["weight"]] for env in clients]) if agg.get("weight") else None
      server[result["name"]] = aggregate(agg["kind"], values, weights, result["dtype"])
  server.update(_call(call, comp["server_result"], server))
  return {b["name"]: server[b["name"]] if b["placement"] == "SERVER"
          else np.stack([env[b["name"]] for env in clients]) for b in comp["outputs"]}


def run_plan(plan: dict, call: PieceCall, inputs: dict[str, np.ndarray],
             rounds: int) -> dict[str, np.ndarray]:
  """Run a whole plan: a computation once, or an iterative process's ``initialize`` and ``rounds``
  rounds of ``next``, feeding the state back as ``plan["state"]`` says.

  Outputs are keyed as ``fb.verify`` keys them: ``NAME``, or ``initialize/NAME`` and
  ``round{r}/NAME``. ``inputs`` of an iterative process are next's inputs after the state.
  """
  if plan["kind"] == "computation":
    return run_computation(plan, "computation", call, inputs)
  out: dict[str, np.ndarray] = {}
  init = run_computation(plan, "initialize", call, {})
  out.update({f"initialize/{k}": v for k, v in init.items()})
  state = {link["to"]: init[link["from"]] for link in plan["state"]["initialize_to_next"]}
  for r in range(1, rounds + 1):
    result = run_computation(plan, "next", call, {**inputs, **state})
    out.update({f"round{r}/{k}": v for k, v in result.items()})
    state = {link["to"]: result[link["from"]] for link in plan["state"]["next_to_next"]}
  return out


def pieces(plan: dict) -> list[dict]:
  """Every piece entry of the plan that has files (what a runtime loads), in plan order."""
  out = []
  for comp in plan["computations"].values():
    for stage in comp["stages"]:
      out += [stage["server_prepare"], stage["client_work"]]
    out.append(comp["server_result"])
  return [p for p in out if p["files"]]


__all__ = ["PLAN_FILE", "PLAN_VERSION", "aggregate", "build_plan", "check_plan", "load_plan",
           "manifest_blocks", "pieces", "run_computation", "run_plan", "write_plan"]

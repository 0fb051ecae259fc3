"""``--target=tff``: federated_language computation protos (byte-compatible with TFF 0.87's
``tensorflow_federated.proto.v0``) with plain-TF (default) or XLA local computations.

Each federated form becomes a federated_language computation, built with that library's own tracer
and intrinsics: a lambda over one struct parameter, an element per positional argument
(``T@SERVER`` or ``{T}@CLIENTS``, ``T`` mirroring the argument's pytree). Each stage becomes::

  prepared = federated_map(server_prepare, federated_zip_at_server(<server values>))
  received = federated_broadcast(federated_zip_at_server(<values to broadcast>))
  uploaded = federated_map(client_work, federated_zip_at_clients(<client data, received, kept>))
  aggregates = federated_{sum,mean,secure_sum_bitwidth,max,min}(<uploads of that kind>)

and ``server_result`` is one more server ``federated_map``. The stages are walked by
:func:`faxbridge.form.interpret`; each aggregation's intrinsic is its rule's ``tff``. Uploads of one
aggregation kind (and weight, or bitwidth) are aggregated as one struct, so a round has one
intrinsic call per kind.

Files: ``computation.pb`` (or ``initialize.pb`` and ``next.pb`` for an iterative process) and a
readable ``.txt`` of each; the manifest gets each computation's type signature (the TFF runner,
``docs/tff_runner_protocol.md``, checks it against what it loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import federated_language as fl
import jax

from faxbridge.converters.tff import local
from faxbridge.converters.tff.local import LOCAL_FORMS, nest, struct_type_of
from faxbridge.errors import ExportError
from faxbridge.export import SplitProgram
from faxbridge.form import Backend, FederatedForm, interpret
from faxbridge.placements import CLIENTS, SERVER

# -- the federated computation of a form ---------------------------------------------------------
_PLACEMENT = {SERVER: fl.SERVER, CLIENTS: fl.CLIENTS}


def parameter_type(form: FederatedForm) -> fl.StructType:
  """One element per positional argument: ``T@SERVER`` or ``{T}@CLIENTS``, ``T`` its pytree."""
  elements = []
  for i, name in enumerate(form.arg_names):
    leaves = [b for b in form.inputs if b.path[0] == i]
    if not leaves:
      elements.append((name, fl.StructType([])))
      continue
    place = leaves[0].placement
    member = struct_type_of([b.path[1:] for b in leaves], [b.spec for b in leaves])
    elements.append((name, fl.FederatedType(member, _PLACEMENT[place], all_equal=place is SERVER)))
  return fl.StructType(elements)


def _zip(values: dict[str, Any]):
  return fl.federated_zip(dict(values))


def _select(value, path):
  for k in path:
    value = value[k]
  return value


class TffBackend(Backend):
  """Steps of the form as federated_language intrinsics, traced into one computation."""

  def __init__(self, pieces: dict[str, Any], where: str):
    self.pieces, self.where = pieces, where

  def server(self, piece, args):
    comp = self.pieces[piece.name]
    done = fl.federated_eval(comp, fl.SERVER) if not args else fl.federated_map(comp, _zip(args))
    return {s.name: done[s.name] for s in piece.outputs}

  def broadcast(self, values):
    sent = fl.federated_broadcast(_zip(values))
    return {n: sent[n] for n in values}

  def clients(self, piece, args):
    comp = self.pieces[piece.name]
    done = fl.federated_eval(comp, fl.CLIENTS) if not args else fl.federated_map(comp, _zip(args))
    return {s.name: done[s.name] for s in piece.outputs}

  def aggregate(self, aggregations, uploads):
    # Uploads of one kind (and weight, or params) are aggregated as one struct: one intrinsic call
    # per kind and round, which is what MapReduceForm expects of a round.
    groups: dict[tuple, list] = {}
    for agg in aggregations:
      groups.setdefault((agg.kind, agg.weight, agg.bitwidth), []).append(agg)
    results = {}
    for (_, weight, _), aggs in groups.items():
      values = _zip({a.value: uploads[a.value] for a in aggs})
      rule = aggs[0].rule
      combined = rule.tff(fl, values, uploads[weight] if weight else None, aggs[0].params)
      for a in aggs:
        results[a.result.name] = combined[a.value]
    return results

  def output(self, binding, value):
    return value


def to_federated_computation(
    form: FederatedForm, local_form: str = "tensorflow"
) -> fl.framework.ConcreteComputation:
  """The federated_language computation of ``form`` (type-checked as it is built)."""
  pieces = {p.name: local.local_computation(p, local_form) for p in form.pieces() if p.outputs}
  backend = TffBackend(pieces, form.name)

  def body(param):
    inputs = {b.name: _select(param[form.arg_names[b.path[0]]], b.path[1:]) for b in form.inputs}
    return _outputs(form, interpret(form, backend, inputs))

  if not form.arg_names:  # no parameter at all (e.g. an iterative process' initialize)
    return fl.federated_computation(lambda: body(None))
  return fl.federated_computation(body, parameter_type(form))


def _outputs(form: FederatedForm, values: dict):
  """The result. Each top-level element of a tuple output (or the whole output) whose leaves share
  a placement is one federated value, zipped at it, as ``tff.templates.IterativeProcess`` expects
  of ``next``; a part that mixes placements is a struct of such values, split by its keys."""
  leaves = [(list(b.path), b.placement, values[b.name]) for b in form.outputs]
  shape = jax.tree.unflatten(form.out_tree, [0] * form.out_tree.num_leaves)

  def by_first_step(items):
    groups: dict = {}
    for path, place, value in items:
      groups.setdefault(path[0], []).append((path[1:], place, value))
    return groups

  def build(items):
    if len(items) == 1 and not items[0][0]:
      return items[0][2]
    if len({place for _, place, _ in items}) == 1:
      return fl.federated_zip(nest([p for p, _, _ in items], [v for _, _, v in items],
                                   lambda v: v, _py_struct))
    return _py_struct([(k, build(sub)) for k, sub in by_first_step(items).items()])

  if isinstance(shape, tuple) and shape:
    return tuple(build(sub) for sub in by_first_step(leaves).values())
  return build(leaves)


def _py_struct(items):
  if all(isinstance(k, str) for k, _ in items):
    return dict(items)
  return [v for _, v in items]


# -- files --------------------------------------------------------------------------------------------
def _write(comp, out: Path, stem: str) -> None:
  proto = comp.to_proto()
  (out / f"{stem}.pb").write_bytes(proto.SerializeToString(deterministic=True))
  block = comp.to_building_block()
  (out / f"{stem}.txt").write_text(
      f"{stem}: {comp.type_signature}\n\n{block.formatted_representation()}\n"
  )


def export_tff(split: SplitProgram, out: Path, local: str = "tensorflow", **options: Any) -> dict:
  """Write a ``.pb`` and a ``.txt`` per computation; return the manifest part: the local form and
  each computation's TFF type signature (the runner checks it against what it loads)."""
  if options:
    raise ExportError(f"the tff target takes no options {sorted(options)}")
  if local not in LOCAL_FORMS:
    raise ExportError(f"--local must be one of {LOCAL_FORMS}, got {local!r}")
  comps = {name: to_federated_computation(form, local) for name, form in split.forms.items()}
  if split.kind == "iterative_process":
    _check_iterative(comps["initialize"], comps["next"], split.name)
  part: dict[str, Any] = {"local": local}
  for name, comp in comps.items():
    _write(comp, out, name)
    part[name] = {"type_signature": str(comp.type_signature)}
  return part


def _check_iterative(init, nxt, name: str) -> None:
  """``tff.templates.IterativeProcess`` feeds element 0 of ``next``'s result back as the state."""
  state_type = init.type_signature.result
  param, result = nxt.type_signature.parameter, nxt.type_signature.result
  is_pair = isinstance(result, fl.StructType) and len(result) == 2
  if not is_pair or not result[0].is_equivalent_to(state_type) or \
      not param[0].is_equivalent_to(state_type):
    raise ExportError(
        f"{name}: next must take the state initialize makes ({state_type}) first and "
        f"return (new_state, metrics); got {nxt.type_signature}")

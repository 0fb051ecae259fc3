"""A FederatedForm as a federated_language computation, built with its own tracer and intrinsics.

The computation is a lambda over one struct parameter, an element per positional argument
(``T@SERVER`` or ``{T}@CLIENTS``, ``T`` mirroring the argument's pytree). Each stage becomes::

  prepared = federated_apply(server_prepare, federated_zip_at_server(<server values>))
  received = federated_broadcast(federated_zip_at_server(<values to broadcast>))
  uploaded = federated_map(client_work, federated_zip_at_clients(<client data, received, kept>))
  aggregates = federated_{sum,mean,secure_sum_bitwidth,max,min}(<uploads of that kind>)

and ``server_result`` is one more ``federated_apply``. Uploads of one aggregation kind (and weight,
or bitwidth) are aggregated as one struct, so a round has one intrinsic call per kind.
"""

from __future__ import annotations

from typing import Any

import federated_language as fl
import jax

from faxbridge.converters.tff import local
from faxbridge.converters.tff.types import nest, struct_type_of
from faxbridge.errors import ExportError
from faxbridge.placements import CLIENTS, SERVER
from faxbridge.split import FederatedForm, leaf_paths

_PLACEMENT = {SERVER: fl.SERVER, CLIENTS: fl.CLIENTS}


def parameter_type(form: FederatedForm, names: list[str]) -> fl.StructType:
  paths = leaf_paths(form.in_tree)
  elements = []
  for i, name in enumerate(names):
    idx = [j for j, p in enumerate(paths) if p[0] == i]
    if not idx:
      elements.append((name, fl.StructType([])))
      continue
    place = form.inputs[idx[0]].placement
    member = struct_type_of([paths[j][1:] for j in idx], [form.inputs[j].spec for j in idx])
    elements.append((name, fl.FederatedType(member, _PLACEMENT[place], all_equal=place is SERVER)))
  return fl.StructType(elements)


def _zip(values: dict[str, Any]):
  return fl.federated_zip(dict(values))


def _select(value, path):
  for k in path:
    value = value[k]
  return value


def _apply(comp, inputs: dict[str, Any]):
  """Run a local computation at the server on named server values (no inputs: federated_eval)."""
  if not comp.type_signature.parameter:
    return fl.federated_eval(comp, fl.SERVER)
  return fl.federated_map(comp, _zip(inputs))


_AGGREGATORS = {
    "sum": lambda v, agg: fl.federated_sum(v),
    "mean": lambda v, agg: fl.federated_mean(v),
    "secure_sum": lambda v, agg: fl.federated_secure_sum_bitwidth(v, agg.bitwidth),
    "max": lambda v, agg: fl.federated_max(v),
    "min": lambda v, agg: fl.federated_min(v),
}


def _aggregate_stage(stage, uploaded) -> dict[str, Any]:
  groups: dict[tuple, list] = {}
  for agg in stage.aggregations:
    groups.setdefault((agg.kind, agg.weight, agg.bitwidth), []).append(agg)
  results = {}
  for (kind, weight, _), aggs in groups.items():
    values = _zip({a.value: uploaded[a.value] for a in aggs})
    if kind == "weighted_mean":
      combined = fl.federated_mean(values, uploaded[weight])
    else:
      combined = _AGGREGATORS[kind](values, aggs[0])
    for a in aggs:
      results[a.result.name] = combined[a.value]
  return results


def to_federated_computation(
    form: FederatedForm, local_form: str = "tensorflow"
) -> fl.framework.ConcreteComputation:
  """The federated_language computation of ``form`` (type-checked as it is built)."""
  names = list(form.arg_names)
  paths = leaf_paths(form.in_tree)
  pieces = {p.name: local.local_computation(p, local_form) for p in form.pieces()}

  def body(param):
    server, client = {}, {}
    for binding, path in zip(form.inputs, paths):
      value = _select(param[names[path[0]]], path[1:])
      (server if binding.placement is SERVER else client)[binding.spec.name] = value
    for stage in form.stages:
      prep = stage.server_prepare
      prepared = _apply(pieces[prep.name], {s.name: server[s.name] for s in prep.inputs})
      server = {s.name: prepared[s.name] for s in prep.outputs}
      received = {}
      if stage.broadcasts:
        sent = fl.federated_broadcast(_zip({n: server[n] for n in stage.broadcasts}))
        received = {n: sent[n] for n in stage.broadcasts}
      work = stage.client_work
      work_in = {s.name: received[s.name] if s.name in received else client[s.name]
                 for s in work.inputs}
      if not work_in:
        raise ExportError(f"stage {stage.index} of {form.name} has client work with no inputs")
      uploaded = fl.federated_map(pieces[work.name], _zip(work_in))
      client.update({s.name: uploaded[s.name] for s in work.outputs})
      server.update(_aggregate_stage(stage, client))
    result = form.server_result
    done = _apply(pieces[result.name], {s.name: server[s.name] for s in result.inputs})
    server.update({s.name: done[s.name] for s in result.outputs})
    return _outputs(form, server, client)

  if not names:  # no parameter at all (e.g. an iterative process' initialize), not an empty one
    return fl.federated_computation(lambda: body(None))
  return fl.federated_computation(body, parameter_type(form, names))


def _outputs(form: FederatedForm, server: dict, client: dict):
  """The result: each top-level element of a tuple output (or the whole output) is one federated
  value, zipped at its placement, as ``tff.templates.IterativeProcess`` expects of ``next``."""
  paths = leaf_paths(form.out_tree)
  shape = jax.tree.unflatten(form.out_tree, [0] * form.out_tree.num_leaves)
  tuple_output = isinstance(shape, tuple) and len(shape) > 0
  groups: dict[int | None, list[int]] = {}
  for j, p in enumerate(paths):
    groups.setdefault(p[0] if tuple_output else None, []).append(j)

  def group_value(idx: list[int], strip: int):
    places = {form.outputs[j].placement for j in idx}
    if len(places) > 1:
      raise ExportError(
          f"{form.name}: an output mixes SERVER and CLIENTS values; return them as separate "
          "elements of a tuple")
    (place,) = places
    source = server if place is SERVER else client
    leaves = [source[form.outputs[j].spec.name] for j in idx]
    sub_paths = [paths[j][strip:] for j in idx]
    if len(sub_paths) == 1 and not sub_paths[0]:
      return leaves[0]
    return fl.federated_zip(nest(sub_paths, leaves, lambda v: v, _py_struct))

  if not tuple_output:
    return group_value(groups[None], 0)
  return tuple(group_value(groups[k], 1) for k in sorted(groups))


def _py_struct(items):
  if all(isinstance(k, str) for k, _ in items):
    return dict(items)
  return [v for _, v in items]

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
:func:`faxbridge.extend.interpret`; each aggregation's intrinsic comes from this target's own table
(``intrinsics.py``, keyed by the aggregation's Primitive), and an aggregation it has none for is
refused before anything is traced. Uploads of one aggregation kind, weight and params are
aggregated as one struct, so a round has one intrinsic call per kind.

A zip's elements are whole structs where the computation already holds one (an argument, a piece's
result, a broadcast, an aggregate): e.g. ``federated_zip_at_clients(<data, received>)`` rather than a
per-leaf ``federated_map`` selection of every leaf at every client and a zip of them all, and a
piece that only forwards its inputs (a ``server_prepare`` of the values to broadcast) is not
called. For FedAvg this is the structure of the hand-written TFF round: broadcast, zip, map, mean,
zip, apply (``benchmarks/results.md`` has the profile: 41 intrinsic calls and 3 TF computations per
round before, 6 and 2 after).

Files: ``computation.pb`` (or ``initialize.pb`` and ``next.pb`` for an iterative process) and a
readable ``.txt`` of each; the manifest gets each computation's type signature (the TFF runner,
``docs/tff_runner_protocol.md``, checks it against what it loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import federated_language as fl
import jax

from faxbridge import CLIENTS, SERVER
from faxbridge.converters.tff import LOCAL_FORMS, local
from faxbridge.converters.tff.intrinsics import intrinsic
from faxbridge.converters.tff.local import lowering_computation, nest, struct_type_of
from faxbridge.extend import Backend, ExportError, FederatedForm, SplitProgram, interpret

# -- the federated computation of a form ---------------------------------------------------------
_PLACEMENT = {SERVER: fl.SERVER, CLIENTS: fl.CLIENTS}


def parameter_type(form: FederatedForm) -> fl.StructType:
  """One element per positional argument: ``T@SERVER`` or ``{T}@CLIENTS``, ``T`` its pytree (a
  ragged leaf, a client's examples, with an unknown leading dimension: ``local.py``)."""
  ragged = {b.name for b in form.ragged_inputs}
  elements = []
  for i, name in enumerate(form.arg_names):
    leaves = [b for b in form.inputs if b.path[0] == i]
    if not leaves:
      elements.append((name, fl.StructType([])))
      continue
    place = leaves[0].placement
    member = struct_type_of([b.path[1:] for b in leaves], [b.spec for b in leaves], ragged)
    elements.append((name, fl.FederatedType(member, _PLACEMENT[place], all_equal=place is SERVER)))
  return fl.StructType(elements)


def _zip(values: dict[str, Any]):
  return fl.federated_zip(dict(values))


def _select(value, path):
  for k in path:
    value = value[k]
  return value


def _passthrough(piece) -> list[int] | None:
  """For a piece whose every output is one of its inputs (a server_prepare that only forwards
  values), the input index of each output; None when the piece computes anything."""
  jaxpr = piece.jaxpr.jaxpr if piece.jaxpr is not None else None
  if jaxpr is None or not piece.inputs:
    return None
  index = {id(v): i for i, v in enumerate(jaxpr.invars)}
  found = [index.get(id(v)) for v in jaxpr.outvars]
  return [i for i in found if i is not None] if None not in found else None


class TffBackend(Backend):
  """Steps of the form as federated_language intrinsics, traced into one computation.

  The values a step passes on are structs the runtime already holds: a piece's result, a
  broadcast, an aggregate, an argument. Each leaf remembers where it came from (``origin``: the
  struct and its index there), so a step that takes all of a struct's leaves in order gets that
  struct itself, not a per-leaf selection (a ``federated_map`` per leaf and client) and a fresh
  ``federated_zip`` of them; a local computation takes its parameter grouped accordingly
  (:class:`local.ParamLayout`). A piece that only forwards its inputs is not called at all.
  """

  def __init__(self, pieces: dict[str, Any], local_form: str,
               result_names: dict[str, list[str]] | None = None,
               ragged: frozenset[str] = frozenset()):
    self.pieces, self.local_form = pieces, local_form
    self.result_names = result_names or {}
    self.ragged = ragged  # the input leaves that are a client's own examples (fb.ragged)
    self.origin: dict[int, tuple[Any, int, Any]] = {}  # id(leaf) -> (struct, index, leaf)

  # -- where a leaf came from ---------------------------------------------------------------------
  def leaf(self, struct, index: int, value=None):
    value = struct[index] if value is None else value
    self.origin[id(value)] = (struct, index, value)  # the value is kept alive with its id
    return value

  def leaves(self, struct, names) -> dict[str, Any]:
    return {n: self.leaf(struct, i) for i, n in enumerate(names)}

  def _whole(self, values: list, start: int):
    """The struct whose elements are exactly ``values[start:start + k]``, in order, and k."""
    first = self.origin.get(id(values[start]))
    if first is None or first[1] != 0 or first[2] is not values[start]:
      return None, 0
    struct = first[0]
    size = len(struct.type_signature.member)
    if size == 0 or start + size > len(values):
      return None, 0
    for k in range(size):
      got = self.origin.get(id(values[start + k]))
      if got is None or got[0] is not struct or got[1] != k or got[2] is not values[start + k]:
        return None, 0
    return struct, size

  def _arrange(self, values: list):
    """The federated value to pass for ``values`` and its :class:`local.ParamLayout`."""
    groups, parts, types, i = [], [], [], 0
    while i < len(values):
      struct, size = self._whole(values, i)
      if struct is None:
        groups.append(0)
        parts.append(values[i])
        types.append((None, values[i].type_signature.member))
        i += 1
      else:
        groups.append(size)
        parts.append(struct)
        types.append((None, struct.type_signature.member))
        i += size
    if len(parts) == 1 and groups[0]:
      return parts[0], local.ParamLayout(types[0][1], tuple(groups), whole=True)
    return fl.federated_zip(parts), local.ParamLayout(fl.StructType(types), tuple(groups))

  # -- the steps -------------------------------------------------------------------------------
  def _call(self, piece, args, placement):
    names = [s.name for s in piece.outputs]
    forwarded = _passthrough(piece)
    if forwarded is not None:
      inputs = list(args.values())
      return {n: inputs[i] for n, i in zip(names, forwarded)}
    if not args:
      comp = self.pieces.get(piece.name) or local.local_computation(piece, self.local_form)
      done = fl.federated_eval(comp, placement)
    else:
      value, layout = self._arrange(list(args.values()))
      comp = local.local_computation(piece, self.local_form, layout,
                                     self.result_names.get(piece.name), self.ragged)
      done = fl.federated_map(comp, value)
    return self.leaves(done, names)

  def server(self, piece, args):
    return self._call(piece, args, fl.SERVER)

  def clients(self, piece, args):
    return self._call(piece, args, fl.CLIENTS)

  def broadcast(self, values):
    struct, size = self._whole(list(values.values()), 0)
    if struct is None or size != len(values):
      struct = _zip(values)
    return self.leaves(fl.federated_broadcast(struct), list(values))

  def aggregate(self, aggregations, uploads):
    # Uploads of one kind (and weight, or params) are aggregated as one struct: one intrinsic call
    # per kind and round, which is what MapReduceForm expects of a round.
    groups: dict[tuple, list] = {}
    for agg in aggregations:
      groups.setdefault((agg.kind, agg.weight, tuple(agg.params.items())), []).append(agg)
    results = {}
    for (_, weight, _), aggs in groups.items():
      keys = list(dict.fromkeys(a.value for a in aggs))  # one upload may be aggregated twice
      parts = [uploads[k] for k in keys]
      struct, size = self._whole(parts, 0)
      values = struct if struct is not None and size == len(parts) else \
          _zip({k: uploads[k] for k in keys})
      combined = intrinsic(aggs[0])(values, uploads[weight] if weight else None,
                                    dict(aggs[0].params))
      for a in aggs:
        results[a.result.name] = self.leaf(combined, keys.index(a.value))
    return results

  def output(self, binding, value):
    return value


def to_federated_computation(
    form: FederatedForm, local_form: str = "tensorflow"
) -> fl.framework.ConcreteComputation:
  """The federated_language computation of ``form`` (type-checked as it is built)."""
  # Parameterless pieces are built here; the others when their argument's layout is known.
  pieces = {p.name: local.local_computation(p, local_form)
            for p in form.pieces() if p.outputs and not p.inputs}
  names = _result_names(form)
  backend = TffBackend(pieces, local_form,
                       {form.server_result.name: names} if names is not None else {},
                       frozenset(b.name for b in form.ragged_inputs))

  def body(param):
    inputs, parents = {}, {}
    for b in form.inputs:
      if len(b.path) == 1:  # the whole argument is one tensor
        inputs[b.name] = param[form.arg_names[b.path[0]]]
        continue
      # One value per struct (selecting anew makes a new value, which _whole cannot recognize).
      where = tuple(b.path[:-1])
      if where not in parents:
        parents[where] = _select(param[form.arg_names[b.path[0]]], b.path[1:-1])
      parent = parents[where]
      key = b.path[-1]
      member = parent.type_signature.member
      names = [n for n, _ in member.items()]
      index = names.index(key) if isinstance(key, str) else key
      inputs[b.name] = backend.leaf(parent, index)
    return _outputs(form, interpret(form, backend, inputs), backend)

  if not form.arg_names:  # no parameter at all (e.g. an iterative process' initialize)
    return fl.federated_computation(lambda: body(None))
  return fl.federated_computation(body, parameter_type(form))


def _result_names(form: FederatedForm) -> list[str] | None:
  """Names for server_result's result struct: the user's output keys where each of its outputs is
  an output leaf under a distinct string key, so the result is returned as it is (no per-leaf
  selection and re-zip); None (the tensor names) otherwise."""
  keys = {b.name: b.path[-1] for b in form.outputs if b.path}
  names = [keys.get(s.name) for s in form.server_result.outputs]
  strings = [n for n in names if isinstance(n, str)]
  if len(strings) != len(names) or len(set(strings)) != len(strings):
    return None
  return strings


def _outputs(form: FederatedForm, values: dict, backend: TffBackend | None = None):
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
      whole = _as_whole(items)
      if whole is not None:
        return whole
      return fl.federated_zip(nest([p for p, _, _ in items], [v for _, _, v in items],
                                   lambda v: v, _py_struct))
    return _py_struct([(k, build(sub)) for k, sub in by_first_step(items).items()])

  def _as_whole(items):
    # A struct the computation already holds, with these leaves in order under these keys.
    if backend is None or any(len(p) != 1 or not isinstance(p[0], str) for p, _, _ in items):
      return None
    struct, size = backend._whole([v for _, _, v in items], 0)
    if struct is None or size != len(items):
      return None
    names = [n for n, _ in struct.type_signature.member.items()]
    return struct if names == [p[0] for p, _, _ in items] else None

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
  _check_ragged_local(split, local)
  for form in split.forms.values():  # refuse an aggregation without intrinsic before tracing
    for stage in form.stages:
      for agg in stage.aggregations:
        intrinsic(agg)
  comps = {}
  for name, form in split.forms.items():
    with lowering_computation(name):  # names the computation in each piece's progress event
      comps[name] = to_federated_computation(form, local)
  if split.kind == "iterative_process":
    _check_iterative(comps["initialize"], comps["next"], split.name)
  part: dict[str, Any] = {"local": local}
  for name, comp in comps.items():
    _write(comp, out, name)
    part[name] = {"type_signature": str(comp.type_signature)}
  return part


def _check_ragged_local(split: SplitProgram, local: str) -> None:
  """Ragged leaves (a client's own examples) are tensors with an unknown leading dimension, which
  only TF local computations take: an XLA module's shapes are static.

  Raises:
    ExportError: ``local="xla"`` for a program with a ragged input, naming it and its count.
  """
  if local == "tensorflow":
    return
  for comp_name, form in split.forms.items():
    if form.ragged_inputs:
      leaf = form.ragged_inputs[0]
      where = "" if comp_name == "computation" else f" ({comp_name})"
      raise ExportError(
          f"{split.name}{where}: its input {leaf.name} holds each client's own number of examples "
          f"(fb.ragged, counted by {leaf.ragged.count}), a tensor whose leading dimension is "  # type: ignore[union-attr]
          f"unknown, and local={local!r} builds XLA local computations, whose shapes are static. "
          "Export with local='tensorflow' (the default).")


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

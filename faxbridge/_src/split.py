"""Split a traced federated computation into its federated form (see :mod:`faxbridge._src.form`).

Stage ``k`` holds the values that depend on exactly ``k`` earlier aggregations, so a broadcast
that depends on an aggregate opens a new stage. Server equations of depth ``k`` go to stage ``k``'s
``server_prepare`` (or ``server_result`` after the last stage), per-client maps to its
``client_work``, and each aggregation equation becomes an :class:`~faxbridge._src.form.Aggregation`
read from :data:`faxbridge._src.aggregations.AGGREGATIONS`: its kind and the params its rule declares.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

from faxbridge._src import placements, ragged
from faxbridge._src.aggregations import AGGREGATIONS
from faxbridge._src.computation import Computation, TracedComputation
from faxbridge._src.errors import ExportError
from faxbridge._src.form import (
  Aggregation,
  Binding,
  FederatedForm,
  Names,
  Piece,
  RaggedSpec,
  Stage,
  TensorSpec,
  leaf_hint,
  leaf_paths,
)
from faxbridge._src.jax_internals import PYTHON_CALLBACKS
from faxbridge._src.locations import describe, enclosing
from faxbridge._src.placements import CLIENTS, SERVER, Placement
from faxbridge._src.primitives import broadcast_p, map_p
from faxbridge._src.user_names import aggregation_names


def split(comp: Computation | TracedComputation, *example_args) -> FederatedForm:
  """The federated form of ``comp`` for the signature of ``example_args``.

  Raises:
    ExportError: for federated operations inside control flow (the number of round trips must be
      static) and Python callbacks in client work, naming the user's ``file:line``.
  """
  traced = comp if isinstance(comp, TracedComputation) else comp.trace(*example_args)
  return _Splitter(traced).run()


# --------------------------------------------------------------------------------------------------
# Implementation.
# --------------------------------------------------------------------------------------------------
def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with source_info_util.user_context(eqn.source_info.traceback,
                                     name_stack=eqn.source_info.name_stack):
    out = eqn.primitive.bind(*invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _inline_federated_calls(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
  """Inline call-like equations (jit, custom_jvp...) that hide federated primitives inside."""

  def interpret(jaxpr, consts, where, *args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]
    for eqn in jaxpr.eqns:
      invals = [read(a) for a in eqn.invars]
      body = placements.call_body(eqn)
      if body is not None and placements.has_federated(body[0]):
        outs = interpret(body[0], body[1], enclosing(eqn.source_info, where), *invals)
      else:
        if eqn.primitive is not map_p and any(
            placements.has_federated(s) for s in jcore.jaxprs_in_params(eqn.params)
        ):
          raise ExportError(
              f"federated operations inside '{eqn.primitive.name}'"
              f"{describe(eqn.source_info, where)} cannot be split into stages: the number of "
              "server/client round trips must be static. Unroll the loop in Python, or keep fb "
              "operations out of lax control flow."
          )
        outs = _bind(eqn, invals)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  if not any((body := placements.call_body(e)) is not None and placements.has_federated(body[0])
             for e in closed.jaxpr.eqns):
    return closed
  return jax.make_jaxpr(lambda *a: interpret(closed.jaxpr, closed.consts, None, *a))(
      *closed.in_avals)


def _unique(name: str, taken: set[str]) -> str:
  """``name``, or ``name #2``, ``name #3``... when taken (``fb.mean(x)`` twice in one stage)."""
  candidate, i = name, 1
  while candidate in taken:
    i += 1
    candidate = f"{name} #{i}"
  taken.add(candidate)
  return candidate


def _tensor_spec(name: str, shape, dtype) -> TensorSpec:
  """The spec of a value crossing a piece boundary; pieces exchange plain arrays only."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    # A typed PRNG key has no array dtype a target could carry (TF, StableHLO and TFLite signatures
    # take plain tensors); its raw data does, and threefry on it is exact on every target.
    raise ExportError(
        f"{name} is a typed PRNG key ({dtype}): pieces exchange plain arrays, so pass the raw key "
        "data instead (jax.random.key_data(key), uint32[2]) and, where a typed key is needed, "
        "rebuild it inside with jax.random.wrap_key_data")
  return TensorSpec(name, tuple(shape), np.dtype(dtype).name)


def _spec(name: str, aval, place: Placement) -> TensorSpec:
  shape = tuple(aval.shape[1:]) if place is CLIENTS else tuple(aval.shape)
  return _tensor_spec(name, shape, aval.dtype)


class _Splitter:
  """One pass over the (inlined) jaxpr: depths, piece membership, liveness, then the pieces."""

  def __init__(self, traced: TracedComputation):
    self.traced = traced
    self.closed = _inline_federated_calls(traced.jaxpr)
    jaxpr = self.closed.jaxpr
    _, self.place = placements.infer(jaxpr, list(traced.in_placements))
    for v in jaxpr.constvars:
      self.place[v] = SERVER
    # Constants stay constants of whichever piece reads them.
    self.consts = dict(zip(jaxpr.constvars, self.closed.consts))
    self.alias: dict = {}  # placement-preserving annotations (sharding constraints) are aliases
    self.names = Names()
    self.var_names: dict = {}

  # -- naming ----------------------------------------------------------------------------------
  def resolve(self, atom):
    while not isinstance(atom, jcore.Literal) and atom in self.alias:
      atom = self.alias[atom]
    return atom

  def name(self, var, hint: str) -> str:
    if var not in self.var_names:
      self.var_names[var] = self.names.fresh(hint)
    return self.var_names[var]

  # -- the pass --------------------------------------------------------------------------------
  def run(self) -> FederatedForm:
    jaxpr = self.closed.jaxpr
    depth: dict = {v: 0 for v in [*jaxpr.constvars, *jaxpr.invars]}
    dep = lambda a: 0 if isinstance(a, jcore.Literal) else depth[self.resolve(a)]
    # (equation, depth, role); roles: server, broadcast, client, aggregate.
    assigned: list[tuple[Any, int, str]] = []
    for eqn in jaxpr.eqns:
      d = max((dep(a) for a in eqn.invars), default=0)
      prim = eqn.primitive
      if prim in placements.PLACEMENT_PRESERVING:
        self.alias[eqn.outvars[0]] = eqn.invars[0]
        continue
      if prim in AGGREGATIONS:
        role, out_depth = "aggregate", d + 1
      elif prim is broadcast_p:
        role, out_depth = "broadcast", d
      elif prim is map_p:
        role, out_depth = "client", d
        self._check_client_work(eqn)
      else:
        role, out_depth = "server", d
      for v in eqn.outvars:
        depth[v] = out_depth
      assigned.append((eqn, d, role))

    client_places = [v for v, p in self.place.items() if p is CLIENTS and v in depth]
    stages = 1 + max((depth[v] for v in client_places), default=-1)
    return self._build(assigned, stages)

  def _check_client_work(self, eqn) -> None:
    def walk(jaxpr, where):
      for e in jaxpr.eqns:
        if e.primitive in PYTHON_CALLBACKS:  # Python cannot run on a client device or a TFF worker
          raise ExportError(
              f"client work calls back into Python ('{e.primitive.name}')"
              f"{describe(e.source_info, where)}: a client device has no Python. Compute it with "
              "JAX operations, or move it to the server side of the computation."
          )
        for sub in jcore.jaxprs_in_params(e.params):
          walk(sub, enclosing(e.source_info, where))

    walk(eqn.params["jaxpr"].jaxpr, eqn.source_info)

  def _build(self, assigned, stages: int) -> FederatedForm:
    traced, jaxpr = self.traced, self.closed.jaxpr
    # Piece order: prepare_0, client_0, agg_0, prepare_1, ..., result. Server equations of depth d
    # go to prepare_d (result when d == stages); broadcasts belong to their stage's hand-over.
    groups: dict[tuple[int, str], list] = {}
    for eqn, d, role in assigned:
      key = (d, role)
      if role == "server":
        key = (d, "prepare") if d < stages else (stages, "result")
      groups.setdefault(key, []).append(eqn)

    # Names: inputs first, then outputs, then everything inside, so the leaves the user sees keep
    # their own names whenever those are free, and every name is unique.
    arg_names = list(traced.arg_names)
    in_paths, out_paths = leaf_paths(traced.in_tree), leaf_paths(traced.out_tree)
    for v, path in zip(jaxpr.invars, in_paths):
      self.name(v, leaf_hint(arg_names[path[0]], path[1:]))
    out_names = [self.names.fresh(leaf_hint("out", p)) for p in out_paths]
    final_outs = [self.resolve(v) for v in jaxpr.outvars]
    out_places = [SERVER if isinstance(v, jcore.Literal) else self.place[v] for v in final_outs]
    client_inputs = {v for v, p in zip(jaxpr.invars, traced.in_placements) if p is CLIENTS}

    def uses(eqns) -> list:
      seen, out = set(), []
      for eqn in eqns:
        for a in eqn.invars:
          a = self.resolve(a)
          if not isinstance(a, jcore.Literal) and a not in seen:
            seen.add(a)
            out.append(a)
      return out

    def defs(eqns) -> list:
      return [v for e in eqns for v in e.outvars]

    order = [(k, r) for k in range(stages) for r in ("prepare", "broadcast", "client", "aggregate")]
    order.append((stages, "result"))
    # live_after[i]: variables read by anything after position i (final outputs count).
    live = {v for v in final_outs if not isinstance(v, jcore.Literal)}
    live_after: dict[tuple[int, str], set] = {}
    for key in reversed(order):
      live_after[key] = set(live)
      live |= set(uses(groups.get(key, [])))

    counters: dict[str, int] = {}

    def hint(kind):
      counters[kind] = counters.get(kind, 0) + 1
      return f"{kind}{counters[kind] - 1}"

    server_state = [v for v, p in zip(jaxpr.invars, traced.in_placements) if p is SERVER]
    in_client_env = set(client_inputs)  # client values every later piece can read by name
    built_stages = []
    for k in range(stages):
      prep_eqns = groups.get((k, "prepare"), [])
      bcast_eqns = groups.get((k, "broadcast"), [])
      client_eqns = groups.get((k, "client"), [])
      agg_eqns = groups.get((k, "aggregate"), [])
      # server_prepare: state -> broadcast sources + state kept (defined before or here, live later)
      prep_in = [v for v in server_state
                 if v in live_after[(k, "prepare")] or v in set(uses(prep_eqns))]
      sources = []
      for e in bcast_eqns:
        src = self.resolve(e.invars[0])
        if not isinstance(src, jcore.Literal) and src not in self.consts and src not in sources:
          sources.append(src)
      for s in sources:
        self.name(s, hint("bcast"))
      kept = [v for v in dict.fromkeys([*prep_in, *defs(prep_eqns)])
              if self.place.get(v) is SERVER and v in live_after[(k, "broadcast")]
              and v not in sources]
      for v in kept:
        self.name(v, hint("state"))
      prepare = self._server_piece(f"stage{k}_server_prepare", prep_eqns, prep_in,
                                   [(v, self.var_names[v]) for v in [*sources, *kept]])
      broadcast_to_source = {e.outvars[0]: self.resolve(e.invars[0]) for e in bcast_eqns}

      # client_work: what it reads from the client env (data, earlier carries, uploads of those)
      # and the broadcasts -> uploads and carries it defines, and (last stage) CLIENTS outputs.
      upload_vars = list(dict.fromkeys(self.resolve(a) for e in agg_eqns for a in e.invars))
      last = k == stages - 1
      client_outs = [(v, n) for v, n, p in zip(final_outs, out_names, out_places)
                     if last and p is CLIENTS]
      needed = [*uses(client_eqns), *upload_vars, *(v for v, _ in client_outs)]
      work_in = [v for v in dict.fromkeys(needed) if v in in_client_env] + sources
      defined_here = [*broadcast_to_source, *defs(client_eqns)]
      for v in upload_vars:
        self.name(v, hint("upload"))
      new_carry = [v for v in defined_here
                   if self.place.get(v) is CLIENTS and v in live_after[(k, "aggregate")]
                   and v not in upload_vars]
      for v in new_carry:
        self.name(v, hint("carry"))
      work_out = [(v, self.var_names[v]) for v in [*upload_vars, *new_carry] if v in defined_here]
      work = self._client_piece(f"stage{k}_client_work", client_eqns, work_in, sources,
                                broadcast_to_source, work_out + client_outs)
      in_client_env |= {v for v, _ in work_out}

      aggs = []
      shown: set[str] = set()  # the stage's aggregations as people read them: each name once
      for e in agg_eqns:
        result = e.outvars[0]
        value = self.resolve(e.invars[0])
        weight = self.resolve(e.invars[1]) if len(e.invars) > 1 else None
        rule = AGGREGATIONS[e.primitive]
        names = dataclasses.asdict(aggregation_names(e, rule.kind))
        shown_value = _unique(names["value"] or self.var_names[value], shown)
        names["value"] = shown_value if shown_value != self.var_names[value] else None
        aggs.append(Aggregation(
            kind=rule.kind,
            value=self.var_names[value],
            weight=None if weight is None else self.var_names[weight],
            params={k: e.params[k] for k in rule.params},
            result=_spec(self.name(result, hint("aggregate")), result.aval, SERVER),
            source_info=e.source_info,
            names={k: v for k, v in names.items() if v},
        ))
      server_state = [*sources, *kept, *(e.outvars[0] for e in agg_eqns)]
      built_stages.append(Stage(
          index=k, server_prepare=prepare, broadcasts=tuple(self.var_names[s] for s in sources),
          client_work=work, uploads=tuple(self.var_names[v] for v in upload_vars),
          aggregations=tuple(aggs),
      ))

    result_eqns = groups.get((stages, "result"), [])
    server_outs = [(v, n) for v, n, p in zip(final_outs, out_names, out_places) if p is SERVER]
    res_in = [v for v in server_state
              if v in set(uses(result_eqns)) or v in {o for o, _ in server_outs}]
    result = self._server_piece("server_result", result_eqns, res_in, server_outs)
    ragged_leaves = ragged.input_specs(traced.in_tree)

    def ragged_spec(i: int, v, place: Placement) -> RaggedSpec | None:
      if i not in ragged_leaves:
        return None
      count, batch_size = ragged_leaves[i]
      axis = 1 if place is CLIENTS else 0
      return RaggedSpec(self.var_names[jaxpr.invars[count]], int(v.aval.shape[axis]), batch_size)

    inputs = tuple(Binding(_spec(self.var_names[v], v.aval, p), p, tuple(path),
                           ragged_spec(i, v, p))
                   for i, (v, p, path) in enumerate(zip(jaxpr.invars, traced.in_placements,
                                                        in_paths)))
    outputs = tuple(
        Binding(_spec(n, v.aval, p), p, tuple(path))
        for v, n, p, path in zip(final_outs, out_names, out_places, out_paths))
    return FederatedForm(
        name=traced.name, clients=traced.clients, inputs=inputs, outputs=outputs,
        stages=tuple(built_stages), server_result=result, in_tree=traced.in_tree,
        out_tree=traced.out_tree, arg_names=tuple(arg_names),
    )

  # -- building pieces -------------------------------------------------------------------------
  def _server_piece(self, name, eqns, ins, outs) -> Piece:
    """Server equations over named server values; ``outs``: (variable or literal, name) pairs."""
    read_env = self._reader()

    def fn(*args):
      env = dict(zip(ins, args))
      for eqn in eqns:
        env.update(zip(eqn.outvars, _bind(eqn, [read_env(env, a) for a in eqn.invars])))
      return [read_env(env, v) for v, _ in outs]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in ins]
    closed = jax.make_jaxpr(fn)(*avals)
    return Piece(
        name,
        inputs=tuple(_spec(self.var_names[v], v.aval, SERVER) for v in ins),
        outputs=tuple(_tensor_spec(n, a.shape, a.dtype)
                      for (_, n), a in zip(outs, closed.out_avals)),
        jaxpr=closed,
    )

  def _client_piece(self, name, eqns, ins, sources, bcast_to_source, outs) -> Piece:
    """One client's work: every map's per-client jaxpr applied to per-client values."""
    read_env = self._reader()

    def fn(*args):
      env = dict(zip(ins, args))
      for clients_var, source in bcast_to_source.items():
        env[clients_var] = read_env(env, source)  # per client, a broadcast value is the server's
      for eqn in eqns:
        inner = eqn.params["jaxpr"]
        invals = [read_env(env, a) for a in eqn.invars]
        env.update(zip(eqn.outvars, jcore.jaxpr_as_fun(inner)(*invals)))
      return [read_env(env, v) for v, _ in outs]

    def per_client(v):
      if v in sources:  # server value received as is
        return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
      return jax.ShapeDtypeStruct(v.aval.shape[1:], v.aval.dtype)

    closed = jax.make_jaxpr(fn)(*[per_client(v) for v in ins])
    return Piece(
        name,
        inputs=tuple(_tensor_spec(self.var_names[v], a.shape, a.dtype)
                     for v, a in zip(ins, closed.in_avals)),
        outputs=tuple(_tensor_spec(n, a.shape, a.dtype)
                      for (_, n), a in zip(outs, closed.out_avals)),
        jaxpr=closed,
    )

  def _reader(self):
    def read(env, atom):
      atom = self.resolve(atom)
      if isinstance(atom, jcore.Literal):
        return atom.val
      return self.consts[atom] if atom in self.consts else env[atom]

    return read


__all__ = ["split"]

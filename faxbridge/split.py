"""Split a federated computation into the pieces a cross-device system runs.

A round trip between server and clients is a *stage*. For stage ``k``:

* ``server_prepare``: server state -> (values to broadcast, server state kept for later);
* broadcast: every client receives those values;
* ``client_work``: one client's data, the broadcast values and what the client kept from earlier
  stages -> (values to upload, values kept for later stages);
* aggregations: each uploaded leaf is combined over clients by its kind (sum, mean, weighted mean
  with its weight, secure sum with its bitwidth, max, min) and joins the server state.

After the last stage ``server_result`` maps the server state to the outputs. Stage ``k`` holds the
values that depend on exactly ``k`` earlier aggregations, so a broadcast that depends on an
aggregate opens a new stage.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from faxbridge import placements
from faxbridge._source import describe
from faxbridge.computation import Computation, TracedComputation
from faxbridge.errors import ExportError
from faxbridge.placements import CLIENTS, SERVER, Placement
from faxbridge.primitives import AGGREGATIONS, broadcast_p, map_p

# Primitives that call back into Python cannot run on a client device or a TFF worker.
_CALLBACKS = frozenset({"pure_callback", "io_callback", "debug_callback", "callback"})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A named value crossing a piece boundary (for CLIENTS values: the shape of one client's)."""

  name: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def to_json(self) -> dict:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class Piece:
  """A local (non-federated) computation: a jaxpr over named inputs and outputs."""

  name: str
  jaxpr: jcore.ClosedJaxpr
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]

  def __call__(self, *args) -> list:
    return _jitted(self.jaxpr)(*args)


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How one uploaded leaf becomes a server value: ``result = kind(value [, weight])``."""

  kind: str
  value: str
  result: TensorSpec
  weight: str | None = None
  bitwidth: int | None = None

  def to_json(self) -> dict:
    out = {"kind": self.kind, "value": self.value, "result": self.result.to_json()}
    if self.weight is not None:
      out["weight"] = self.weight
    if self.bitwidth is not None:
      out["bitwidth"] = self.bitwidth
    return out


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  server_prepare: Piece
  broadcasts: tuple[str, ...]  # outputs of server_prepare sent to every client
  client_work: Piece
  uploads: tuple[str, ...]  # outputs of client_work that are aggregated
  aggregations: tuple[Aggregation, ...]

  def bytes_per_client(self) -> dict[str, int]:
    prep = {s.name: s for s in self.server_prepare.outputs}
    work = {s.name: s for s in self.client_work.outputs}
    return {
        "download": sum(prep[n].nbytes for n in self.broadcasts),
        "upload": sum(work[n].nbytes for n in self.uploads),
    }


@dataclasses.dataclass(frozen=True)
class Binding:
  """Where a computation input or output lives: a named tensor at a placement."""

  spec: TensorSpec
  placement: Placement

  def to_json(self) -> dict:
    return {**self.spec.to_json(), "placement": self.placement.value}


@dataclasses.dataclass(frozen=True)
class FederatedForm:
  """A computation as stages of server and client pieces (see the module docstring)."""

  name: str
  clients: int
  inputs: tuple[Binding, ...]
  outputs: tuple[Binding, ...]
  stages: tuple[Stage, ...]
  server_result: Piece
  in_tree: Any
  out_tree: Any
  arg_names: tuple[str, ...] = ()

  def pieces(self) -> list[Piece]:
    out = []
    for stage in self.stages:
      out += [stage.server_prepare, stage.client_work]
    return [*out, self.server_result]

  def bytes_per_client(self) -> list[dict[str, int]]:
    """Per stage, the bytes each client downloads (broadcasts) and uploads (aggregated leaves)."""
    return [stage.bytes_per_client() for stage in self.stages]

  def run(self, *args) -> Any:
    """Run the pieces in order, natively: the same result as calling the computation."""
    leaves = jax.tree.leaves(args)
    server = {b.spec.name: v for b, v in zip(self.inputs, leaves) if b.placement is SERVER}
    client = {b.spec.name: v for b, v in zip(self.inputs, leaves) if b.placement is CLIENTS}
    for stage in self.stages:
      prep = stage.server_prepare
      server = dict(zip((s.name for s in prep.outputs), prep(*(server[s.name] for s in prep.inputs))))
      for name in stage.broadcasts:
        client[name] = server[name]
      work = stage.client_work
      in_axes = [0 if s.name not in stage.broadcasts else None for s in work.inputs]
      outs = jax.vmap(work, in_axes=in_axes)(*(client[s.name] for s in work.inputs))
      client.update(zip((s.name for s in work.outputs), outs))
      for agg in stage.aggregations:
        server[agg.result.name] = aggregate(agg, client)
    result = self.server_result(*(server[s.name] for s in self.server_result.inputs))
    server.update(zip((s.name for s in self.server_result.outputs), result))
    flat = [(server if b.placement is SERVER else client)[b.spec.name] for b in self.outputs]
    return jax.tree.unflatten(self.out_tree, flat)


def aggregate(agg: Aggregation, uploads: dict) -> jax.Array:
  """The reference semantics of each aggregation kind over stacked per-client ``uploads``."""
  x = jnp.asarray(uploads[agg.value])
  if agg.kind == "weighted_mean":
    w = jnp.asarray(uploads[agg.weight])
    w = jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim))
    return jnp.sum(w * x, axis=0) / jnp.sum(w, axis=0)
  reduce = {"sum": jnp.sum, "secure_sum": jnp.sum, "mean": jnp.mean, "max": jnp.max,
            "min": jnp.min}[agg.kind]
  return reduce(x, axis=0)


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
_jit_cache: dict[int, Callable] = {}


def _jitted(closed: jcore.ClosedJaxpr) -> Callable:
  fn = _jit_cache.get(id(closed))
  if fn is None:
    fn = _jit_cache[id(closed)] = jax.jit(jcore.jaxpr_as_fun(closed))
  return fn


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with source_info_util.user_context(eqn.source_info.traceback,
                                     name_stack=eqn.source_info.name_stack):
    out = eqn.primitive.bind(*invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _inline_federated_calls(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
  """Inline call-like equations (jit, custom_jvp...) that hide federated primitives inside."""

  def interpret(jaxpr, consts, *args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]
    for eqn in jaxpr.eqns:
      invals = [read(a) for a in eqn.invars]
      body = placements.call_body(eqn)
      if body is not None and placements.has_federated(body[0]):
        outs = interpret(body[0], body[1], *invals)
      else:
        if eqn.primitive is not map_p and any(
            placements.has_federated(s) for s in jcore.jaxprs_in_params(eqn.params)
        ):
          raise ExportError(
              f"federated operations inside '{eqn.primitive.name}'{describe(eqn.source_info)} "
              "cannot be split into stages: the number of server/client round trips must be "
              "static. Unroll the loop in Python, or keep fb operations out of lax control flow."
          )
        outs = _bind(eqn, invals)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  if not any((body := placements.call_body(e)) is not None and placements.has_federated(body[0])
             for e in closed.jaxpr.eqns):
    return closed
  return jax.make_jaxpr(lambda *a: interpret(closed.jaxpr, closed.consts, *a))(*closed.in_avals)


def _path_keys(path) -> list[str | int]:
  """A jax key path as struct steps: dict keys and attributes by name, sequence items by index."""
  out: list[str | int] = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key if isinstance(k.key, int) else str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    else:  # FlattenedIndexKey of a custom node
      out.append(int(getattr(k, "key", 0)))
  return out


def leaf_paths(tree) -> list[list[str | int]]:
  """The path of every leaf of a pytree structure (a PyTreeDef), as struct steps.

  The paths of ``FederatedForm.in_tree`` start with the argument's position; those of
  ``out_tree`` locate each output leaf. Targets use them to rebuild structured types.
  """
  dummy = jax.tree.unflatten(tree, [0] * tree.num_leaves)
  return [_path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(dummy)]


def _safe(text: str) -> str:
  text = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
  return text or "x"


def _leaf_names(prefix: str, tree_of_leaves) -> list[str]:
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree_of_leaves)]
  return [_safe(f"{prefix}{p}") for p in paths]


def _spec(name: str, aval, place: Placement) -> TensorSpec:
  shape = tuple(aval.shape[1:]) if place is CLIENTS else tuple(aval.shape)
  return TensorSpec(name, shape, np.dtype(aval.dtype).name)


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
    self.names: dict = {}

  # -- naming ----------------------------------------------------------------------------------
  def resolve(self, atom):
    while not isinstance(atom, jcore.Literal) and atom in self.alias:
      atom = self.alias[atom]
    return atom

  def name(self, var, hint: str) -> str:
    if var not in self.names:
      base, i = hint, 0
      taken = set(self.names.values())
      while (candidate := base if i == 0 else f"{base}_{i}") in taken:
        i += 1
      self.names[var] = candidate
    return self.names[var]

  # -- the pass --------------------------------------------------------------------------------
  def run(self) -> FederatedForm:
    jaxpr = self.closed.jaxpr
    depth: dict = {v: 0 for v in [*jaxpr.constvars, *jaxpr.invars]}
    dep = lambda a: 0 if isinstance(a, jcore.Literal) else depth[self.resolve(a)]
    # (stage, role) for each equation; roles: prepare, broadcast, client, aggregate, result.
    assigned: list[tuple[Any, int, str]] = []
    for eqn in jaxpr.eqns:
      d = max((dep(a) for a in eqn.invars), default=0)
      prim = eqn.primitive
      if prim.name in placements.PLACEMENT_PRESERVING:
        self.alias[eqn.outvars[0]] = eqn.invars[0]
        continue
      if prim.name in AGGREGATIONS:
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
    return self._build(assigned, stages, depth)

  def _check_client_work(self, eqn) -> None:
    def walk(jaxpr):
      for e in jaxpr.eqns:
        if e.primitive.name in _CALLBACKS:
          raise ExportError(
              f"client work calls back into Python ('{e.primitive.name}'){describe(e.source_info)}: "
              "a client device has no Python. Compute it with JAX operations, or move it to the "
              "server side of the computation."
          )
        for sub in jcore.jaxprs_in_params(e.params):
          walk(sub)

    walk(eqn.params["jaxpr"].jaxpr)

  def _build(self, assigned, stages: int, depth) -> FederatedForm:
    traced, jaxpr = self.traced, self.closed.jaxpr
    # Piece order: prepare_0, client_0, agg_0, prepare_1, ..., result. Server equations of depth d
    # go to prepare_d (result when d == stages); broadcasts belong to their stage's hand-over.
    groups: dict[tuple[int, str], list] = {}
    for eqn, d, role in assigned:
      if role == "server":
        key = (d, "prepare") if d < stages else (stages, "result")
      elif role in ("broadcast", "aggregate"):
        key = (d, role)
      else:
        key = (d, "client")
      groups.setdefault(key, []).append(eqn)

    arg_names = list(traced.arg_names)
    in_leaves_per_arg = [
        _leaf_names(name, a) for name, a in zip(arg_names, jax.tree.unflatten(
            traced.in_tree, [0] * len(traced.in_placements)))
    ]
    in_names = [n for names in in_leaves_per_arg for n in names]
    for v, n in zip(jaxpr.invars, in_names):
      self.name(v, n)
    out_names = _leaf_names("out", jax.tree.unflatten(traced.out_tree,
                                                      [0] * len(jaxpr.outvars)))
    self.arg_names = list(arg_names)
    final_outs = [self.resolve(v) for v in jaxpr.outvars]
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
    live_after, live = [], {v for v in final_outs if not isinstance(v, jcore.Literal)}
    for key in reversed(order):
      live_after.append(set(live))
      live |= set(uses(groups.get(key, [])))
    live_after.reverse()
    live_after = dict(zip(order, live_after))

    def spec(v, hint):
      return _spec(self.name(v, hint), v.aval, self.place[v])

    # Name everything that crosses a boundary, in equation order, for stable names.
    counters: dict[str, int] = {}

    def hint(kind):
      counters[kind] = counters.get(kind, 0) + 1
      return f"{kind}{counters[kind] - 1}"

    for out_v, n in zip(final_outs, out_names):
      if not isinstance(out_v, jcore.Literal) and out_v not in self.names:
        self.name(out_v, n)

    server_state = [v for v, p in zip(jaxpr.invars, traced.in_placements) if p is SERVER]
    client_carry: list = []
    built_stages = []
    for k in range(stages):
      prep_eqns = groups.get((k, "prepare"), [])
      bcast_eqns = groups.get((k, "broadcast"), [])
      client_eqns = groups.get((k, "client"), [])
      agg_eqns = groups.get((k, "aggregate"), [])
      # server_prepare: state -> broadcast sources + state kept (defined before or here, live later)
      prep_in = [v for v in server_state if v in live_after[(k, "prepare")] or
                 v in set(uses(prep_eqns))]
      sources = []
      for e in bcast_eqns:
        src = self.resolve(e.invars[0])
        if not isinstance(src, jcore.Literal) and src not in self.consts and src not in sources:
          sources.append(src)
      for s in sources:
        self.name(s, hint("bcast"))
      kept = [v for v in [*prep_in, *defs(prep_eqns)]
              if self.place.get(v) is SERVER and v in live_after[(k, "broadcast")]
              and v not in sources]
      for v in kept:
        self.name(v, hint("state"))
      prepare = self._server_piece(f"stage{k}_server_prepare", prep_eqns, prep_in,
                                   [*sources, *kept])
      broadcast_to_source = {e.outvars[0]: self.resolve(e.invars[0]) for e in bcast_eqns}

      # client_work: client inputs it uses + broadcast values + carries -> uploads + new carries.
      upload_vars = []
      for e in agg_eqns:
        for a in e.invars:
          a = self.resolve(a)
          if a not in upload_vars:
            upload_vars.append(a)
      used = uses(client_eqns) + upload_vars
      work_in = list(dict.fromkeys(v for v in used if v in client_inputs))
      work_in += [v for v in sources]
      work_in += [v for v in client_carry if v in set(used) or v in live_after[(k, "client")]]
      for v in upload_vars:
        self.name(v, hint("upload"))
      new_carry = [v for v in [*client_carry, *broadcast_to_source, *defs(client_eqns)]
                   if self.place.get(v) is CLIENTS and v in live_after[(k, "aggregate")]
                   and v not in client_inputs]
      new_carry = list(dict.fromkeys(new_carry))
      for v in new_carry:
        self.name(v, hint("carry"))
      work = self._client_piece(f"stage{k}_client_work", client_eqns, work_in, sources,
                                broadcast_to_source, [*upload_vars, *new_carry])
      client_carry = new_carry

      aggs = []
      for e in agg_eqns:
        result = e.outvars[0]
        self.name(result, hint("aggregate"))
        value = self.resolve(e.invars[0])
        weight = self.resolve(e.invars[1]) if len(e.invars) > 1 else None
        aggs.append(Aggregation(
            kind=e.primitive.name,
            value=self.names[value],
            weight=None if weight is None else self.names[weight],
            bitwidth=e.params.get("bitwidth"),
            result=spec(result, ""),
        ))
      server_state = [*sources, *kept, *(e.outvars[0] for e in agg_eqns)]
      built_stages.append(Stage(
          index=k, server_prepare=prepare, broadcasts=tuple(self.names[s] for s in sources),
          client_work=work, uploads=tuple(self.names[v] for v in upload_vars),
          aggregations=tuple(aggs),
      ))

    result_eqns = groups.get((stages, "result"), [])
    server_outs = [v for v in final_outs
                   if isinstance(v, jcore.Literal) or self.place.get(v) is SERVER]
    res_in = [v for v in server_state
              if v in set(uses(result_eqns)) or v in set(server_outs)]
    result = self._server_piece("server_result", result_eqns, res_in, server_outs,
                                out_names=[n for v, n in zip(final_outs, out_names)
                                           if isinstance(v, jcore.Literal)
                                           or self.place.get(v) is SERVER])
    inputs = tuple(Binding(spec(v, n), p)
                   for v, n, p in zip(jaxpr.invars, in_names, traced.in_placements))
    outputs = []
    result_names = iter(s.name for s in result.outputs)
    for v in final_outs:
      if isinstance(v, jcore.Literal) or self.place.get(v) is SERVER:
        name = next(result_names)
        outputs.append(Binding(next(s for s in result.outputs if s.name == name), SERVER))
      else:
        outputs.append(Binding(spec(v, ""), CLIENTS))
    return FederatedForm(
        name=traced.name, clients=traced.clients, inputs=inputs, outputs=tuple(outputs),
        stages=tuple(built_stages), server_result=result, in_tree=traced.in_tree,
        out_tree=traced.out_tree, arg_names=tuple(self.arg_names),
    )

  # -- building pieces -------------------------------------------------------------------------
  def _server_piece(self, name, eqns, ins, outs, out_names=None) -> Piece:
    read_env = self._reader()

    def fn(*args):
      env = dict(zip(ins, args))
      for eqn in eqns:
        env.update(zip(eqn.outvars, _bind(eqn, [read_env(env, a) for a in eqn.invars])))
      return [read_env(env, v) for v in outs]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in ins]
    closed = jax.make_jaxpr(fn)(*avals)
    names = out_names or [self.names[v] for v in outs]
    return Piece(
        name, closed,
        inputs=tuple(_spec(self.names[v], v.aval, SERVER) for v in ins),
        outputs=tuple(TensorSpec(n, tuple(a.shape), np.dtype(a.dtype).name)
                      for n, a in zip(names, closed.out_avals)),
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
      return [read_env(env, v) for v in outs]

    def per_client(v):
      if v in sources:  # server value received as is
        return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
      return jax.ShapeDtypeStruct(v.aval.shape[1:], v.aval.dtype)

    closed = jax.make_jaxpr(fn)(*[per_client(v) for v in ins])
    return Piece(
        name, closed,
        inputs=tuple(TensorSpec(self.names[v], tuple(a.shape), np.dtype(a.dtype).name)
                     for v, a in zip(ins, closed.in_avals)),
        outputs=tuple(TensorSpec(self.names[v], tuple(a.shape), np.dtype(a.dtype).name)
                      for v, a in zip(outs, closed.out_avals)),
    )

  def _reader(self):
    def read(env, atom):
      atom = self.resolve(atom)
      if isinstance(atom, jcore.Literal):
        return atom.val
      return self.consts[atom] if atom in self.consts else env[atom]

    return read


__all__ = ["Aggregation", "Binding", "FederatedForm", "Piece", "Stage", "TensorSpec", "leaf_paths",
           "split"]

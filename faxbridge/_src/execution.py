"""How native runs execute: ``vmap`` over all clients at once, or a stream over clients.

``fb.map`` lowers to ``vmap``: every client's intermediate values are alive together, so memory
grows with the number of clients. The *stream* strategy runs a traced computation's jaxpr through a
small interpreter instead, at XLA lowering time:

* an ``fb.map`` becomes a ``lax.scan`` over clients (``("stream", k)``: over blocks of ``k``
  clients, ``vmap`` inside a block, the ``n mod k`` remaining clients as one last block);
* each aggregation of the map's outputs is fused into that scan as one accumulator in the
  aggregation's own semantics (its :class:`~faxbridge._src.aggregations.Stream`: ``init``,
  ``accumulate``, ``finish``), so a value that only feeds aggregations is never stacked;
* map outputs used otherwise (returned CLIENTS-placed, fed to another map) are stacked as the
  scan's outputs; ``fb.broadcast`` values are read by each client, never copied ``n`` times;
* clients whose ``fb.fold`` s run their own numbers of steps (``fb.ragged`` data) are streamed in
  the order of those steps, so that each block's loops run about as far as its own clients need
  (:func:`_fold_order`; stacked outputs come back in the clients' order);
* with a mesh whose ``clients`` axis spans devices, each device streams its own clients inside
  ``jax.shard_map`` and one collective per aggregation (``psum``, ``pmax``, ``pmin``) follows.

The computation stays one primitive to JAX (``faxbridge_native``, its jaxpr the federated one), with
``fb.map``'s JVP, transpose and batching rules (``call_rules.py``): ``jax.grad``, ``jvp``, ``vjp``,
``vmap`` and ``eval_shape`` of a streamed round act on the federated jaxpr (so their jaxprs keep the
federated primitives), and only lowering streams. ``trace()``, ``split`` and exports never see it.

Strategies: ``"vmap"``, ``"stream"`` (= ``("stream", 1)``), ``("stream", k)``, or ``"auto"``
(:func:`resolve`). Set one with ``fb.computation(strategy=...)`` or for a block with
:func:`execution_strategy`; the computation's own wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.interpreters import mlir
from jax.interpreters import partial_eval as pe

from faxbridge._src import aggregations as A
from faxbridge._src import call_rules, jax_internals, placements, ragged
from faxbridge._src import primitives as P

Strategy = Any  # "auto" | "vmap" | "stream" | ("stream", k)

# -- strategies ------------------------------------------------------------------------------------
_STRATEGY: contextvars.ContextVar[Strategy | None] = contextvars.ContextVar(
    "faxbridge_strategy", default=None
)
# auto on CPU: blocks of 8 clients per scan step. Measured on a FedAvg-like round (MLP 256-512-10,
# 32 examples per client, 2 SGD steps; 2 shared, noisy cores), round time / jit+vmap's: blocks of 8
# 0.15-0.31x at 128 clients, 0.16-0.26x at 512, 0.25x at 2,048; one client per step 0.18-0.39x,
# 0.17-0.38x, 0.29x. Memory stays that of 8 clients.
CPU_BLOCK = 8
# ... and from CPU_LARGE_ROUND clients on (per device), blocks of CPU_LARGE_BLOCK while that many
# clients' values take at most CPU_LARGE_BLOCK_BYTES. A scan step has a fixed cost (the
# accumulators' adds over the whole model, the loop itself) that a larger block spreads over more
# clients, and a fixed cost per round that is larger for larger blocks (a short scan of large
# blocks runs slower per step). Measured on the anchor round (benchmarks/fedavg_round.py: 6 MiB
# per client; one process, 11-21 interleaved runs, quiet 2-core machine), ms per client for blocks
# of 8 / 16: 0.289 / 0.346 at 128 clients, 0.276 / 0.296 at 256, 0.265 / 0.272 at 512,
# 0.261 / 0.248 at 1,024, 0.264 / 0.243 at 2,048, 0.261 / 0.244 at 4,096; blocks of 32 and 64
# were slower than 16 at every size (0.261 and 0.316 at 2,048).
CPU_LARGE_ROUND = 1024
CPU_LARGE_BLOCK = 16
CPU_LARGE_BLOCK_BYTES = 256 * 2**20
# Sorted by their folds' steps, the largest clients of a stream run in blocks of k / 4. Measured on
# the ragged benchmark's step (MLP 256-512-10, a batch of 16; 2 shared cores): a loop step of 1, 2,
# 4, 8 clients takes 0.43, 0.46, 0.78, 2.2 ms, so small blocks cost about one client's step, and
# the skewed round's modelled cost over the equal one is 1.19x at 128 clients (1.32x one by one).
TOP_BLOCK_DIVISOR = 4
# auto on GPU/TPU: vmap while the clients' live values take at most this share of free memory.
MEMORY_SHARE = 0.25


# XLA's CPU compiler merges independent all-reduces into one (its ``cpu-all-reduce-combiner``
# pass). On a mesh with an axis inside each client (``data``), every client's gradient is
# all-reduced over that axis, and merged, the all-reduces of all layers and of all the clients of a
# block are live at once. Measured on the 4-layer transformer of tests/test_model_sharding.py on a
# 2 x 2 x 2 (clients, data, model) host mesh, per device: the streamed round's temporaries 19.3 MB
# with the pass, 3.1 MB without, and the round 66.9 -> 49.4 ms; vmap's 29.4 -> 13.5 MB,
# 83.9 -> 75.1 ms; the same bits. Without such an axis (2 x 4) no change (2.26 / 2.24 MB).
CPU_MESH_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}


def compiler_options() -> dict[str, str]:
  """The XLA options faxbridge compiles a native call on a mesh with, on the default backend.

  On CPU, XLA's pass that merges all-reduces is turned off: merged, the per-client all-reduces of a
  mesh axis inside each client (a ``data`` axis) keep every layer's per-client gradients live at
  once, several times the memory. Elsewhere none (``{}``). A call of a computation on a mesh
  compiles with them; under your own ``jax.jit`` your compilation is the one that counts (JAX takes
  options on the outermost jit only), so pass them there.

  Example:
    >>> step = jax.jit(lambda w: w * 2, compiler_options=fb.compiler_options())
    >>> step(np.float32(3.0)).item()
    6.0
  """
  return dict(CPU_MESH_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


def validate(strategy: Strategy) -> Strategy:
  """``strategy`` in canonical form (``"stream"`` -> ``("stream", 1)``); a clear error otherwise."""
  if strategy in ("auto", "vmap"):
    return strategy
  if strategy == "stream":
    return ("stream", 1)
  if (isinstance(strategy, tuple) and len(strategy) == 2 and strategy[0] == "stream"
      and isinstance(strategy[1], int | np.integer) and not isinstance(strategy[1], bool)
      and strategy[1] >= 1):
    return ("stream", int(strategy[1]))
  raise ValueError(
      f"strategy must be 'auto', 'vmap', 'stream' or ('stream', k) with k an int >= 1 (the clients "
      f"per scan step), got {strategy!r}"
  )


@contextlib.contextmanager
def execution_strategy(strategy: Strategy) -> Iterator[None]:
  """Run native calls of federated computations in this block with ``strategy``.

  A computation's own ``strategy=`` wins; nested blocks: the innermost wins.

  Example:
    >>> total = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
    >>> with fb.execution_strategy(("stream", 2)):
    ...   total(np.arange(5, dtype=np.int32)).tolist()
    10
  """
  token = _STRATEGY.set(validate(strategy))
  try:
    yield
  finally:
    _STRATEGY.reset(token)


_PLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("faxbridge_plain", default=False)


@contextlib.contextmanager
def plain() -> Iterator[None]:
  """Native calls in this block bind the federated primitives as traced (``vmap`` lowering), whatever
  the strategy: the reference program an export stores is the same under every strategy."""
  token = _PLAIN.set(True)
  try:
    yield
  finally:
    _PLAIN.reset(token)


def forced_plain() -> bool:
  return _PLAIN.get()


def requested(own: Strategy | None) -> Strategy:
  """The strategy in force: the computation's own, else the innermost block's, else ``"auto"``."""
  if own is not None:
    return own
  ambient = _STRATEGY.get()
  return "auto" if ambient is None else ambient


def _aval_bytes(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _live_bytes(jaxpr: jcore.Jaxpr) -> int:
  """Bytes of every value ``jaxpr`` (and the jaxprs in it) defines: an upper bound of what is live."""
  total = sum(_aval_bytes(v.aval) for v in jaxpr.invars)
  for eqn in jaxpr.eqns:
    total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
    total += sum(_live_bytes(sub) for sub in jcore.jaxprs_in_params(eqn.params))
  return total


def per_client_bytes(jaxpr: jcore.Jaxpr) -> int:
  """The largest per-client footprint of the computation's maps (their sub-jaxprs' values)."""
  best = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive is P.map_p:
      best = max(best, _live_bytes(eqn.params["jaxpr"].jaxpr))
    else:
      for sub in jcore.jaxprs_in_params(eqn.params):
        best = max(best, per_client_bytes(sub))
  return best


def _free_memory(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # backends without statistics
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def resolve(strategy: Strategy, jaxpr: jcore.Jaxpr, clients: int | None,
            devices: int = 1) -> str | tuple[str, int]:
  """What ``strategy`` means for this computation here: ``"vmap"`` or ``("stream", k)``.

  ``"auto"``: on CPU, ``("stream", CPU_BLOCK)`` = ``("stream", 8)`` (a scan is faster than vmap
  from a few dozen clients on, and its memory is flat); from ``CPU_LARGE_ROUND`` = 1,024 clients
  per device on, ``("stream", 16)`` where 16 clients' values (the same bound as below) take at
  most ``CPU_LARGE_BLOCK_BYTES`` = 256 MiB. On GPU/TPU, ``"vmap"`` while the
  per-client footprint of the largest map (every value its jaxpr defines) times the clients on one
  device fits in ``MEMORY_SHARE`` of the device's free memory, else ``("stream", k)`` with the
  largest ``k`` that does. Without maps (or a count of clients), ``"vmap"``.
  """
  strategy = validate(strategy)
  if strategy != "auto":
    return strategy
  per_client = per_client_bytes(jaxpr)
  if not clients or not per_client:
    return "vmap"
  device = jax.devices()[0]
  local = -(-clients // devices)
  if device.platform == "cpu":
    large = local >= CPU_LARGE_ROUND and per_client * CPU_LARGE_BLOCK <= CPU_LARGE_BLOCK_BYTES
    return ("stream", CPU_LARGE_BLOCK if large else CPU_BLOCK)
  free = _free_memory(device)
  if free is None:
    return "vmap"
  budget = int(free * MEMORY_SHARE)
  if per_client * local <= budget:
    return "vmap"
  return ("stream", max(1, budget // per_client))


# -- the primitive JAX sees ------------------------------------------------------------------------
native_p = jcore.Primitive("faxbridge_native")
native_p.multiple_results = True


@dataclasses.dataclass(frozen=True)
class StreamMesh:
  """The device mesh a streamed run shards its clients over (hashable, a primitive param)."""

  mesh: jax.sharding.Mesh
  # Per input and output: the clients axis of a CLIENTS-placed value (0, or further right under
  # vmap), split over the mesh; None for a SERVER value (replicated).
  in_clients: tuple[int | None, ...]
  out_clients: tuple[int | None, ...]

  @staticmethod
  def spec(axis: int | None) -> jax.sharding.PartitionSpec:
    if axis is None:
      return jax.sharding.PartitionSpec()
    return jax.sharding.PartitionSpec(*(None,) * axis, "clients")


def bind(closed: jcore.ClosedJaxpr, args: Sequence, block: int, mesh: StreamMesh | None = None) -> list:
  """Run ``closed`` (a traced federated computation) on flat ``args`` with the stream strategy."""
  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
  consts = list(closed.consts)
  if mesh is not None:
    mesh = dataclasses.replace(mesh, in_clients=(None,) * len(consts) + mesh.in_clients)
  return native_p.bind(*consts, *args, jaxpr=jcore.ClosedJaxpr(jaxpr, ()), block=block, mesh=mesh)


def _abstract_eval(*args, jaxpr, block, mesh):
  del args, block, mesh
  return jaxpr.out_avals


native_p.def_abstract_eval(_abstract_eval)


@functools.partial(jax.jit, static_argnames=("jaxpr", "block", "mesh"))
def _compiled(*args, jaxpr, block, mesh):
  return native_p.bind(*args, jaxpr=jaxpr, block=block, mesh=mesh)


def _impl(*args, jaxpr, block, mesh):
  # Bound outside jit (eagerly, or under jax.disable_jit): the stream exists only as a lowering, so
  # it is compiled, as JAX runs any primitive eagerly; one executable per jaxpr (its params are static).
  with jax.disable_jit(False):
    return _compiled(*args, jaxpr=jaxpr, block=block, mesh=mesh)


native_p.def_impl(_impl)


def _derived_mesh(params: dict, ins: Sequence[call_rules.Port],
                  outs: Sequence[call_rules.Port]) -> dict:
  """A derived call (tangents, cotangents) shards each value as the value it stands for."""
  mesh = params["mesh"]
  if mesh is None:
    return params
  axes = {"in": mesh.in_clients, "out": mesh.out_clients}
  return {**params, "mesh": dataclasses.replace(
      mesh, in_clients=tuple(axes[kind][i] for kind, i in ins),
      out_clients=tuple(axes[kind][j] for kind, j in outs))}


def _batched_mesh(params: dict, batched: Sequence[bool]) -> dict:
  """The batch axis goes first: a batched CLIENTS value's clients axis moves one to the right."""
  mesh = params["mesh"]
  if mesh is None:
    return params
  shift = lambda axis, by: None if axis is None else axis + by
  return {**params, "mesh": dataclasses.replace(
      mesh, in_clients=tuple(shift(a, b) for a, b in zip(mesh.in_clients, batched)),
      out_clients=tuple(shift(a, 1) for a in mesh.out_clients))}


# JVP, transpose and batching as fb.map's (call_rules.py): the rule of the whole computation is
# JAX's rule of its jaxpr, traced into a new jaxpr (still federated) that runs as one more stream.
call_rules.define(call_rules.CallPrimitive(native_p, "a streamed computation", derive=_derived_mesh,
                                           batch=_batched_mesh))


def _lower(*args, jaxpr, block, mesh):
  if mesh is None:
    return _Interpreter(block).run(jaxpr.jaxpr, args, jaxpr.consts)
  return _sharded(args, jaxpr, block, mesh)


mlir.register_lowering(native_p, mlir.lower_fun(_lower, multiple_results=True))


def _sharded(args, jaxpr, block, mesh: StreamMesh):
  """Each device streams its own clients; aggregations combine across the ``clients`` axis."""
  in_specs = tuple(mesh.spec(c) for c in mesh.in_clients)
  out_specs = tuple(mesh.spec(c) for c in mesh.out_clients)

  def local(*local_args):
    return tuple(_Interpreter(block, axis_name="clients").run(jaxpr.jaxpr, local_args, jaxpr.consts))

  return jax.shard_map(local, mesh=mesh.mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names={"clients"}, check_vma=False)(*args)


def _on_context_mesh(value, mesh):
  """``value`` (an equation's param) with every ``NamedSharding`` over the traced mesh moved onto
  ``mesh``, the abstract mesh in force inside ``shard_map`` (the same axes, ``clients`` Manual).

  Tracing under an Auto mesh records it in params (``dot_general``'s ``out_sharding``, a
  ``broadcast_in_dim``'s ``sharding``, a user's sharding constraint over ``model``), and JAX refuses
  a sharding whose mesh differs from the context's. Moved, a model sharding stays what it was: the
  ``model`` axis is Auto in both meshes. Nested jaxprs (``jit``, ``scan``, ``custom_jvp``) too.
  """
  if isinstance(value, jax.sharding.NamedSharding):
    if value.mesh.axis_names != mesh.axis_names or value.mesh.abstract_mesh == mesh:
      return value
    return jax.sharding.NamedSharding(mesh, value.spec, memory_kind=value.memory_kind)
  if isinstance(value, jcore.Jaxpr):
    eqns = [_eqn_on(e, mesh) for e in value.eqns]
    return value if all(a is b for a, b in zip(eqns, value.eqns)) else value.replace(eqns=eqns)
  if isinstance(value, jcore.ClosedJaxpr):  # a jit's, a custom_jvp's body
    moved = _on_context_mesh(value.jaxpr, mesh)
    return value if moved is value.jaxpr else jcore.ClosedJaxpr(moved, value.consts)
  if type(value) in (tuple, list):  # not a NamedTuple of params (GatherDimensionNumbers)
    moved = [_on_context_mesh(v, mesh) for v in value]
    return value if all(a is b for a, b in zip(moved, value)) else type(value)(moved)
  return value


def _eqn_on(eqn, mesh):
  """``eqn`` with its params and its context's mesh moved onto ``mesh`` (itself when unchanged):
  evaluating an equation enters its context, which records the mesh it was traced under."""
  params = _params_on(eqn.params, mesh)
  ctx = jax_internals.eqn_context_on(eqn.ctx, mesh)
  if params is eqn.params and ctx is eqn.ctx:
    return eqn
  return eqn.replace(params=params, ctx=ctx)


def _params_on(params: dict, mesh) -> dict:
  """``params`` itself when nothing in it names another mesh (most equations), else a moved copy."""
  moved = {k: _on_context_mesh(v, mesh) for k, v in params.items()}
  return params if all(moved[k] is v for k, v in params.items()) else moved


def spec_axes(spec, dims: slice = slice(None)) -> set[str]:
  """The mesh axes a PartitionSpec splits its ``dims`` over (an entry may name several)."""
  return {a for e in tuple(spec)[dims] for a in (e if isinstance(e, tuple) else (e,))
          if isinstance(a, str)}


# -- the streaming interpreter ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Broadcast:
  """A ``fb.broadcast`` value kept as its one server value (clients read it, nobody copies it)."""

  value: Any
  clients: int

  def stacked(self):
    return jnp.broadcast_to(self.value, (self.clients, *jnp.shape(self.value)))


@dataclasses.dataclass
class _Group:
  """Maps streamed in one scan, and the aggregations fused into it as accumulators."""

  maps: list[int]  # eqn indices: the first map, then later maps that read only its outputs
  aggregations: list[int]  # eqn indices
  stacked: list  # the maps' output Vars also needed stacked (returned, read by other eqns)


def _plan(jaxpr: jcore.Jaxpr) -> tuple[dict[int, _Group], set[int]]:
  """Which eqns run as streamed groups (keyed by the eqn index where each runs), which are skipped.

  A group starts at a map; a later map that reads only the group's outputs and values defined
  before the group (a per-client cast of a weight, say) joins it, so its input is never stacked.
  Aggregations of the group's outputs are fused. An output read by anything else is stacked.
  """
  defined_at: dict = {}
  users: dict = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for pos, v in enumerate(eqn.invars):
      if isinstance(v, jcore.Var):
        users.setdefault(v, []).append((i, pos))
    for v in eqn.outvars:
      defined_at[v] = i
  returned = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  groups: dict[int, _Group] = {}
  skip: set[int] = set()
  taken: set[int] = set()
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive is not P.map_p or i in taken:
      continue
    maps, outs = [i], set(eqn.outvars)
    for j in range(i + 1, len(jaxpr.eqns)):
      later = jaxpr.eqns[j]
      if later.primitive is not P.map_p or j in taken:
        continue
      ins = [v for v in later.invars if isinstance(v, jcore.Var)]
      if any(v in outs for v in ins) and all(v in outs or defined_at.get(v, -1) < i for v in ins):
        maps.append(j)
        outs |= set(later.outvars)
    # A later map that makes the weight of a weighted aggregation of the group's outputs from values
    # of before the group joins it too (fb.weighted_mean binds its per-client cast of the weight
    # after the value's map: FedAvg weighted by the counts), so that aggregation is fused and the
    # weighted values are never stacked.
    for j in range(i + 1, len(jaxpr.eqns)):
      later = jaxpr.eqns[j]
      if later.primitive is not P.map_p or j in taken or j in maps:
        continue
      ins = [v for v in later.invars if isinstance(v, jcore.Var)]
      weighs = any(jaxpr.eqns[u].primitive in A.AGGREGATIONS and pos == 1
                   and jaxpr.eqns[u].invars[0] in outs
                   for v in later.outvars for u, pos in users.get(v, ()))
      if weighs and all(v in outs or defined_at.get(v, -1) < i for v in ins):
        maps.append(j)
        outs |= set(later.outvars)
    members = set(maps)
    aggs = sorted({j for v in outs for j, pos in users.get(v, ())
                   if jaxpr.eqns[j].primitive in A.AGGREGATIONS and pos == 0})

    def stacked_outputs(aggs, maps=maps, members=members):
      inside = members | set(aggs)
      return [v for m in maps for v in jaxpr.eqns[m].outvars
              if v in returned or any(j not in inside for j, _ in users.get(v, ()))]

    # The scan runs at the first fused aggregation (server work after it may read its result), or
    # where the first map is when some output is needed stacked. A fused weighted_mean needs its
    # weight by then: one defined later leaves that aggregation out (its value is then stacked).
    def weight_ready(j, at, outs=outs):
      w = jaxpr.eqns[j].invars[1] if len(jaxpr.eqns[j].invars) > 1 else None
      return not isinstance(w, jcore.Var) or w in outs or defined_at.get(w, -1) < at

    while True:
      stacked = stacked_outputs(aggs)
      at = i if stacked or not aggs else aggs[0]
      ready = [j for j in aggs if weight_ready(j, at)]
      if ready == aggs:
        break
      aggs = ready
    groups[at] = _Group(maps, aggs, stacked)
    taken |= members
    skip |= (members | set(aggs)) - {at}
  return groups, skip


def _fold_order(maps: Sequence, outside: dict, fixed: dict, n: int) -> jax.Array | None:
  """The clients sorted by the steps their folds run (``fb.fold`` over a ``Ragged``), or None when
  the group's maps fold over nothing (or over counts that are no cheap function of their inputs).

  Counts are data, known only when the program runs: each map's :func:`ragged.fold_steps` (a few
  scalar operations on the client's count) is evaluated for every client, and the order is their
  stable ``argsort``. Aggregations do not depend on the order of clients (up to float summation
  order, as any stream), and stacked outputs are put back in the clients' order.
  """
  keys = None
  for m in maps:
    found = ragged.fold_steps(m.params["jaxpr"])
    if found is None:
      continue
    fn, used = found
    reads = [v for v, u in zip(m.invars, used) if u]
    if any(isinstance(v, jcore.Var) and v not in outside for v in reads):
      continue  # reads a value made inside the group: not known before the scan
    args: list = []
    axes: list[int | None] = []
    for v in reads:
      if isinstance(v, jcore.Literal):
        args.append(v.val)
        axes.append(None)
      elif v in fixed:
        args.append(fixed[v])
        axes.append(None)
      else:
        args.append(outside[v])
        axes.append(0)
    (steps,) = jax.vmap(jcore.jaxpr_as_fun(fn), in_axes=axes, axis_size=n)(*args)
    keys = steps if keys is None else keys + steps
  return None if keys is None else jnp.argsort(keys, stable=True).astype(jnp.int32)


class _Interpreter:
  """Evaluates a federated jaxpr with every ``fb.map`` streamed over clients (see the module doc).

  ``axis_name``: inside ``shard_map``, the mesh axis the clients are split over; each aggregation's
  accumulator is combined across it before its final value.
  """

  def __init__(self, block: int, axis_name: str | None = None):
    self.block = block
    self.axis_name = axis_name

  def run(self, jaxpr: jcore.Jaxpr, args: Sequence, consts: Sequence = ()) -> list:
    env: dict = {}

    def read(v, keep_broadcast=False):
      if isinstance(v, jcore.Literal):
        return v.val
      value = env[v]
      if isinstance(value, _Broadcast) and not keep_broadcast:
        return value.stacked()
      return value

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    groups, skip = _plan(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
      if i in skip:
        continue
      if i in groups:
        env.update(self._group(jaxpr, groups[i], read))
        continue
      prim = eqn.primitive
      if prim is P.broadcast_p:
        (x,) = eqn.invars
        clients = self._local_clients(eqn.params["clients"])
        env[eqn.outvars[0]] = _Broadcast(read(x), clients)
        continue
      if prim in placements.PLACEMENT_PRESERVING and any(
          isinstance(env.get(v), _Broadcast) for v in eqn.invars if isinstance(v, jcore.Var)):
        # A layout annotation of a broadcast value: the value stays the server's one copy.
        outs = [read(v, keep_broadcast=True) for v in eqn.invars][: len(eqn.outvars)]
      elif prim in A.AGGREGATIONS:
        rule = A.AGGREGATIONS[prim].streaming(eqn.params)
        outs = [self._aggregate(rule, eqn, [read(v) for v in eqn.invars])]
      elif (body := placements.call_body(eqn)) is not None and placements.has_federated(body[0]):
        outs = self.run(body[0], [read(v) for v in eqn.invars], body[1])
      elif (self.axis_name is not None and prim in placements.PLACEMENT_PRESERVING
            and self.axis_name in spec_axes(getattr(eqn.params.get("sharding"), "spec", ()))):
        # A layout over the clients axis: inside shard_map that axis is the device's own clients.
        outs = [read(v) for v in eqn.invars][: len(eqn.outvars)]
      else:
        invals = self._harmonize(eqn, [read(v) for v in eqn.invars])
        # As jax.core.eval_jaxpr binds an equation; inside shard_map, not in the equation's mesh
        # context (the traced, Auto one) but in shard_map's, with the params moved onto it.
        params = eqn.params
        if self.axis_name is None:
          ctx = eqn.ctx.manager
        else:
          ctx = contextlib.nullcontext()
          params = _params_on(params, jax.sharding.get_abstract_mesh())
        with source_info_util.user_context(eqn.source_info.traceback), ctx:
          outs = prim.bind(*invals, **prim.get_bind_params(params))
        outs = outs if prim.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  # -- pieces ------------------------------------------------------------------------------------
  def _local_clients(self, clients: int) -> int:
    if self.axis_name is None:
      return clients
    return clients // jax.lax.axis_size(self.axis_name)

  def _localize(self, x, global_clients: int):
    """This device's clients of a CLIENTS-shaped value made whole on the server (AD's zeros)."""
    if self.axis_name is None or jnp.shape(x)[:1] != (global_clients,):
      return x
    local = self._local_clients(global_clients)
    start = jax.lax.axis_index(self.axis_name) * local
    return jax.lax.dynamic_slice_in_dim(x, start, local, axis=0)

  def _harmonize(self, eqn, invals: list) -> list:
    """Server work mixing per-device CLIENTS values with whole ones (sums of cotangents): slice."""
    if self.axis_name is None:
      return invals
    local = [jnp.shape(x) != v.aval.shape for x, v in zip(invals, eqn.invars)]
    if not any(local):
      return invals
    n = next(v.aval.shape[0] for x, v, loc in zip(invals, eqn.invars, local) if loc)
    return [x if loc else self._localize(x, n) for x, loc in zip(invals, local)]

  def _finish(self, rule: A.Streaming, acc, clients: int, dtype):
    if self.axis_name is not None:
      acc = rule.combine(acc, self.axis_name)
    return rule.finish(acc, clients, dtype)

  def _aggregate(self, rule: A.Streaming, eqn, invals):
    """An aggregation of a stacked value (not fused into a scan): one accumulate of all clients."""
    n = eqn.invars[0].aval.shape[0]
    x = self._localize(invals[0], n)
    w = self._localize(invals[1], n) if rule.weighted else None
    aval = eqn.outvars[0].aval
    acc = rule.init(aval, None if w is None else jax_core.ShapedArray(w.shape[1:], w.dtype))
    acc = rule.accumulate(acc, x, w)
    clients = x.shape[0] * (1 if self.axis_name is None else jax.lax.axis_size(self.axis_name))
    return self._finish(rule, acc, clients, aval.dtype)

  def _group(self, jaxpr: jcore.Jaxpr, group: _Group, read) -> dict:
    """Run a group's maps and fused aggregations as one scan over (blocks of) clients."""
    maps = [jaxpr.eqns[j] for j in group.maps]
    aggs = [jaxpr.eqns[j] for j in group.aggregations]
    rules = [A.AGGREGATIONS[a.primitive].streaming(a.params) for a in aggs]
    inside = {v: aval for m in maps
              for v, aval in zip(m.outvars, m.params["jaxpr"].out_avals)}  # per-client avals
    # Values from outside the group: read per client (stacked) or the same by all (broadcast).
    outside: dict = {}
    for eqn in [*maps, *aggs]:
      for v in eqn.invars:
        if isinstance(v, jcore.Var) and v not in inside and v not in outside:
          value = read(v, keep_broadcast=True)
          if not isinstance(value, _Broadcast):
            value = self._localize(value, maps[0].params["clients"])
          outside[v] = value
    sliced = [v for v, x in outside.items() if not isinstance(x, _Broadcast)]
    fixed = {v: x.value for v, x in outside.items() if isinstance(x, _Broadcast)}
    n = outside[sliced[0]].shape[0] if sliced else self._local_clients(maps[0].params["clients"])
    global_n = maps[0].params["clients"]

    def per_client_aval(v):
      if isinstance(v, jcore.Literal):
        return jax_core.ShapedArray(np.shape(v.val), np.result_type(v.val))
      if v in inside:
        return inside[v]
      if v in fixed:
        return jax.typeof(fixed[v])
      return jax_core.ShapedArray(outside[v].shape[1:], outside[v].dtype)

    accs0 = [rule.init(per_client_aval(a.invars[0]),
                       per_client_aval(a.invars[1]) if rule.weighted else None)
             for rule, a in zip(rules, aggs)]

    def step(accs, xs, count):
      """Run the maps on ``count`` clients (``xs``: their slices) and accumulate them."""
      # Var -> (value, its clients axis: 0 for this block's slice, None for a value every client reads)
      block: dict[Any, tuple[Any, int | None]] = {v: (x, 0) for v, x in zip(sliced, xs)}
      block.update((v, (x, None)) for v, x in fixed.items())

      def get(v):
        return (v.val, None) if isinstance(v, jcore.Literal) else block[v]

      for m in maps:
        args, axes = zip(*[get(v) for v in m.invars]) if m.invars else ((), ())
        body = m.params["jaxpr"]
        outs = jax.vmap(lambda *a, body=body: self.run(body.jaxpr, a, body.consts), in_axes=axes,
                        axis_size=count)(*args)
        block.update((v, (o, 0)) for v, o in zip(m.outvars, outs))

      def stacked(v):
        value, axis = get(v)
        return value if axis == 0 else jnp.broadcast_to(value, (count, *jnp.shape(value)))

      accs = [rule.accumulate(acc, stacked(a.invars[0]),
                              stacked(a.invars[1]) if rule.weighted else None)
              for rule, acc, a in zip(rules, accs, aggs)]
      return accs, [stacked(v) for v in group.stacked]

    xs_all = [outside[v] for v in sliced]

    def blocks(accs, clients: int, k: int, pick=None):
      """``clients`` clients (``pick``: their indices, else all in order) in a scan over blocks of
      ``k``, the ``clients mod k`` left over as one more block; their stacked outputs in order."""
      full, rest = divmod(clients, k)
      take = (lambda idx: [jnp.take(x, idx, axis=0) for x in xs_all]) if pick is not None else None
      ys: list = []
      if full:
        main = (pick[: full * k].reshape(full, k) if take else
                [x[: full * k].reshape(full, k, *x.shape[1:]) for x in xs_all])
        accs, ys_main = jax.lax.scan(lambda c, xs: step(c, take(xs) if take else xs, k), accs,
                                     main, length=full)
        ys = [y.reshape(full * k, *y.shape[2:]) for y in ys_main]
      if rest:
        last = take(pick[full * k:]) if take else [x[full * k:] for x in xs_all]
        accs, ys_rest = step(accs, last, rest)
        ys = ys_rest if not full else [jnp.concatenate([a, b]) for a, b in zip(ys, ys_rest)]
      return accs, ys

    k = max(1, min(self.block, n))
    # Clients whose folds run different numbers of steps (fb.fold over fb.ragged data) go in the
    # order of that number, so that a block's loops, which run to the block's largest count, run
    # about as far as each of its clients needs. The largest 2k to 3k - 1 clients run in blocks of
    # k / 4, so that the largest client keeps few waiting (a block that small costs about what one
    # client does per step); every other block is whole (docs/ragged.md: the cost of skew).
    order = _fold_order(maps, outside, fixed, n) if k > 1 else None
    if order is None:
      accs, ys = blocks(accs0, n, k)
    else:
      head = max(0, (n - 2 * k) // k * k)
      accs, ys = blocks(accs0, head, k, order[:head]) if head else (accs0, [])
      accs, ys_top = blocks(accs, n - head, max(1, k // TOP_BLOCK_DIVISOR), order[head:])
      ys = ys_top if not ys else [jnp.concatenate([a, b]) for a, b in zip(ys, ys_top)]
      if ys:  # stacked outputs back in the clients' own order
        back = jnp.argsort(order)
        ys = [jnp.take(y, back, axis=0) for y in ys]
    result = dict(zip(group.stacked, ys))
    for rule, acc, a in zip(rules, accs, aggs):
      out_aval: Any = a.outvars[0].aval  # an aggregation's result is an array
      result[a.outvars[0]] = self._finish(rule, acc, global_n, out_aval.dtype)
    return result

"""The federated operations a computation is written with. All take pytrees.

Inside an :func:`faxbridge._src.computation`, SERVER values are ordinary arrays and CLIENTS values are
arrays whose leading axis is the clients axis (size ``n``). These functions are the only way across
the boundary; placement inference checks every use when the computation is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from faxbridge._src import aggregations as A
from faxbridge._src import primitives as P
from faxbridge._src.errors import PlacementError, TraceError
from faxbridge._src.locations import describe

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _Context:
  clients: int | None
  mesh: jax.sharding.Mesh | None


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("fb", default=None)


@contextlib.contextmanager
def federated_context(clients: int | None, mesh=None) -> Iterator[None]:
  token = _CONTEXT.set(_Context(clients, mesh))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def traced_clients() -> int | None:
  """The ``clients=`` of the federated computation being traced right now (None: not given, or no
  computation is being traced)."""
  ctx = _CONTEXT.get()
  return ctx.clients if ctx else None


def in_federated_trace() -> bool:
  """Whether a federated computation is being traced (its ``fn`` is running) right now."""
  return _CONTEXT.get() is not None


def _here() -> str:
  return describe(source_info_util.current())


def _context(op: str) -> _Context:
  ctx = _CONTEXT.get()
  if ctx is None:
    raise PlacementError(
        f"fb.{op} was called outside a federated computation{_here()}. Wrap the function in "
        "@fb.computation(in_placements=(...)) and call it, or call comp.trace(...)."
    )
  return ctx


def clients_of(op: str, leaves) -> int:
  """The number of clients the CLIENTS-placed ``leaves`` of ``fb.{op}`` hold (checked against
  each other and the computation's ``clients=``), or a PlacementError naming the user's line."""
  ctx = _context(op)
  n = ctx.clients
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if not shape or (n is not None and shape[0] != n):
      expected = f"{n}" if n is not None else "the number of clients"
      raise PlacementError(
          f"fb.{op} received a value of shape {shape}{_here()}, which is not CLIENTS-placed: a "
          f"CLIENTS value has the clients axis (size {expected}) first. Broadcast SERVER values "
          "with fb.broadcast(x)."
      )
    n = shape[0]
  if n is None:
    raise PlacementError(f"fb.{op} needs at least one CLIENTS-placed value{_here()}.")
  return n


def clients_axis() -> str | None:
  """The mesh axis CLIENTS values are split over (``"clients"``, when the mesh being traced for has
  one), else None: what ``fb.map`` runs with as its SPMD axis (``jax.vmap``'s ``spmd_axis_name``)."""
  ctx = _CONTEXT.get()
  mesh = ctx.mesh if ctx else None
  return "clients" if mesh is not None and "clients" in mesh.axis_names else None


def _constrain_to_clients(leaves: list) -> list:
  """Pin CLIENTS values' leading axis to the mesh's ``clients`` axis, when it has one.

  Only the clients axis is pinned: every other dimension is ``PartitionSpec.UNCONSTRAINED``, so a
  value keeps the model (or data) sharding it has or the compiler gives it; ``None`` there would
  replicate a model-sharded value on every device.
  """
  ctx = _CONTEXT.get()
  if ctx is None or ctx.mesh is None or clients_axis() is None:
    return leaves
  U = jax.sharding.PartitionSpec.UNCONSTRAINED
  return [jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec(
          "clients", *(U,) * (jnp.ndim(x) - 1)))) for x in leaves]


def broadcast(x: PyTree) -> PyTree:
  """SERVER -> CLIENTS: every client receives ``x``.

  ``broadcast(x) = [x, x, ..., x]`` (``n`` copies: ``x`` stacked on a new leading clients axis).
  Its transpose is :func:`sum`: the gradient of a broadcast value sums the clients' gradients.
  The number of clients comes from the CLIENTS inputs, or ``clients=`` of ``fb.computation``.

  Example:
    >>> fan_out = fb.computation(fb.broadcast, clients=3, in_placements=(fb.SERVER,))
    >>> fan_out(np.array([1.0, 2.0], np.float32)).tolist()
    [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]
  """
  ctx = _context("broadcast")
  if ctx.clients is None:
    raise PlacementError(
        f"fb.broadcast{_here()} needs the number of clients, and the computation has no "
        "CLIENTS-placed input to infer it from: pass clients=n to fb.computation."
    )
  leaves, tree = jax.tree.flatten(x)
  out = [P.broadcast_p.bind(jnp.asarray(v), clients=ctx.clients) for v in leaves]
  return jax.tree.unflatten(tree, _constrain_to_clients(out))


def map(fn: Callable, *args: PyTree) -> PyTree:
  """CLIENTS -> CLIENTS: ``fn`` applied to each client's slice of ``args``.

  ``map(f, xs, ys) = [f(x_1, y_1), ..., f(x_n, y_n)]``. ``fn`` sees one client's values (the
  clients axis removed) and may return any pytree; it is kept as a per-client sub-jaxpr, the
  client work of the split. It may not capture traced values: pass server values as
  ``fb.broadcast(value)`` arguments.

  Example:
    >>> @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
    ... def scaled(s, x):
    ...   return fb.map(lambda s, x: s * x, fb.broadcast(s), x)
    >>> scaled(np.float32(2.0), np.array([1.0, 2.0, 3.0], np.float32)).tolist()
    [2.0, 4.0, 6.0]
  """
  leaves, in_tree = jax.tree.flatten(args)
  n = clients_of("map", leaves)
  out_tree_box = []

  def flat_fn(*flat):
    out = fn(*jax.tree.unflatten(in_tree, list(flat)))
    out_leaves, out_tree = jax.tree.flatten(out)
    out_tree_box.append(out_tree)
    return out_leaves

  avals = [jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)) for v in leaves]
  closed = P.trace_per_client(flat_fn, avals)
  ins = _constrain_to_clients([jnp.asarray(v) for v in leaves])
  out = P.map_p.bind(*ins, jaxpr=closed, clients=n, axis_name=clients_axis())
  return jax.tree.unflatten(out_tree_box[-1], _constrain_to_clients(list(out)))


def aggregate(prim, x: PyTree, weight: jax.Array | None = None, **params) -> PyTree:
  """CLIENTS -> SERVER: the aggregation ``prim`` of every leaf of ``x``.

  ``prim`` is an aggregation primitive (``faxbridge.extend.define_aggregation``'s result, or a
  built-in one); ``params`` are exactly the parameters its rule declares, each a JSON scalar
  (bool, int, float, str: they travel into ``plan.json``). A weighted aggregation takes one
  ``weight`` per client (shape ``(n,)``), cast to each leaf's dtype as client work. This is how
  an ``fb.*``-style function is written::

    def clipped_sum(x, c):
      return aggregate(clipped_sum_p, x, c=float(c))

  Raises:
    TypeError: ``prim`` is no aggregation, or the params or the weight do not fit its rule.
    PlacementError: a leaf (or the weight) is not CLIENTS-placed.
  """
  rule = A.AGGREGATIONS.get(prim)
  if rule is None:
    raise TypeError(f"{getattr(prim, 'name', prim)!r} is not an aggregation primitive: define it "
                    "with faxbridge.extend.define_aggregation")
  op = rule.kind
  missing, unknown = set(rule.params) - set(params), set(params) - set(rule.params)
  if missing or unknown:
    raise TypeError(f"fb.{op}{_here()} takes the params {sorted(rule.params)}; missing "
                    f"{sorted(missing)}, unknown {sorted(unknown)}")
  params = {k: _json_scalar(op, k, v) for k, v in params.items()}
  with_paths, tree = jax.tree_util.tree_flatten_with_path(x)
  leaves = [v for _, v in with_paths]
  # Each equation is bound in a named scope ``KIND`` + the leaf's path in ``x`` (``mean['w1']``),
  # which is how the split names the leaf for people (faxbridge._src.user_names); interpreters
  # ignore name scopes, and the params and the jaxpr stay as they are.
  scopes = [f"{op}{jax.tree_util.keystr(path)}" for path, _ in with_paths]
  n = clients_of(op, leaves)
  if not rule.weighted:
    if weight is not None:
      raise TypeError(f"fb.{op}{_here()} takes no weight")
    out = []
    for v, scope in zip(leaves, scopes):
      with jax.named_scope(scope):
        out.append(prim.bind(jnp.asarray(v), **params))
    return jax.tree.unflatten(tree, out)
  if weight is None:
    raise TypeError(f"fb.{op}{_here()} needs a weight: one scalar per client")
  weight = jnp.asarray(weight)
  if weight.shape != (n,):
    raise PlacementError(
        f"fb.{op}{_here()}: the weight must be one scalar per client, shape ({n},), "
        f"not {weight.shape}."
    )
  out = []
  cast: dict = {}  # one cast per dtype, so that the clients upload the weight once, not per leaf
  for v, scope in zip(leaves, scopes):
    v, w = jnp.asarray(v), weight
    if w.dtype != v.dtype:  # the cast is per-client work
      if v.dtype not in cast:
        (cast[v.dtype],) = P.bind_map(lambda wi, dt=v.dtype: [wi.astype(dt)], weight,
                                      axis_name=clients_axis())
      w = cast[v.dtype]
    with jax.named_scope(scope):
      out.append(prim.bind(v, w, **params))
  return jax.tree.unflatten(tree, out)


def _json_scalar(op: str, name: str, value: Any) -> bool | int | float | str:
  """A param as the plain JSON scalar it is written as (numpy scalars become Python's)."""
  if isinstance(value, np.generic) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
    return value
  raise TypeError(f"fb.{op}{_here()}: param {name}={value!r} must be a bool, int, finite float or "
                  "str (params are static and written into plan.json), not "
                  f"{type(value).__name__}")


def sum(x: PyTree) -> PyTree:
  """CLIENTS -> SERVER: ``sum_i x_i``, elementwise over clients.

  The result has the clients' dtype (no promotion: an int8 sum stays int8 and wraps); ``bool``
  is refused. Exported to TFF it is ``federated_sum``; its transpose is :func:`broadcast`.

  Example:
    >>> total = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
    >>> total(np.array([[1, 2], [3, 4], [5, 6]], np.int32)).tolist()  # 3 clients
    [9, 12]
  """
  for v in jax.tree.leaves(x):
    if jnp.result_type(v) == jnp.bool_:
      raise TypeError(
          f"fb.sum{_here()} adds numbers, got bool: cast inside fb.map first, "
          "e.g. fb.map(lambda b: b.astype(jnp.int32), x)."
      )
  return aggregate(A.sum_p, x)


def mean(x: PyTree) -> PyTree:
  """CLIENTS -> SERVER: ``(1/n) sum_i x_i``, ``n`` the number of clients.

  Floating (or complex) values only, in their own dtype; cast integers inside :func:`map` first.
  Exported to TFF it is ``federated_mean``; its transpose is ``broadcast(ct / n)``.

  Example:
    >>> average = fb.computation(fb.mean, in_placements=(fb.CLIENTS,))
    >>> average(np.array([1.0, 2.0, 6.0], np.float32)).tolist()
    3.0
  """
  _require_float("mean", x)
  return aggregate(A.mean_p, x)


def weighted_mean(x: PyTree, weight: jax.Array) -> PyTree:
  """CLIENTS -> SERVER: ``sum_i w_i x_i / sum_i w_i``.

  ``weight`` is one scalar per client (shape ``(n,)``), cast to each leaf's dtype as client work;
  ``x`` must be floating. Exported to TFF it is ``federated_mean(x, weight)``.

  Example:
    >>> wmean = fb.computation(fb.weighted_mean, in_placements=(fb.CLIENTS, fb.CLIENTS))
    >>> wmean(np.array([1.0, 2.0, 4.0], np.float32), np.array([1, 1, 2], np.int32)).tolist()
    2.75
  """
  _require_float("weighted_mean", x)
  return aggregate(A.weighted_mean_p, x, weight)


def secure_sum(x: PyTree, bitwidth: int) -> PyTree:
  """CLIENTS -> SERVER: ``sum_i x_i`` of integers in ``[0, 2**bitwidth)``, by secure aggregation.

  Natively this is a plain sum in the clients' dtype; exported, it becomes TFF's
  ``federated_secure_sum_bitwidth``, and ``bitwidth`` (an int in ``[1, 62]``) is the bound a
  secure aggregation protocol needs. Integers only: quantize floats first.

  Example:
    >>> @fb.computation(in_placements=(fb.CLIENTS,))
    ... def votes(x):
    ...   return fb.secure_sum(x, bitwidth=8)
    >>> votes(np.array([[1, 0], [1, 1], [0, 1]], np.int32)).tolist()
    [2, 2]

  Raises:
    TraceError: ``bitwidth`` is not an int in ``[1, 62]`` (names the user's file:line).
    TypeError: ``x`` is not integer.
  """
  if isinstance(bitwidth, np.integer):
    bitwidth = int(bitwidth)
  if isinstance(bitwidth, bool) or not isinstance(bitwidth, int) or not 1 <= bitwidth <= 62:
    got = f"{bitwidth!r} ({type(bitwidth).__name__})" if not isinstance(bitwidth, int) else \
        repr(bitwidth)
    raise TraceError(
        f"fb.secure_sum{_here()}: bitwidth must be a Python int in [1, 62] (the values summed lie "
        f"in [0, 2**bitwidth)), got {got}."
    )
  for v in jax.tree.leaves(x):
    if not jnp.issubdtype(jnp.result_type(v), jnp.integer):
      raise TypeError(
          f"fb.secure_sum{_here()} sums integers, got {jnp.result_type(v)}: quantize first."
      )
  return aggregate(A.secure_sum_p, x, bitwidth=bitwidth)


def max(x: PyTree) -> PyTree:
  """CLIENTS -> SERVER: ``max_i x_i``, elementwise over clients, in the clients' dtype.

  Exported to TFF it is ``federated_max``. Its derivative is the tangent of the clients that hold
  the maximum, averaged over ties.

  Example:
    >>> largest = fb.computation(fb.max, in_placements=(fb.CLIENTS,))
    >>> largest(np.array([[1, 5], [3, 2]], np.int32)).tolist()  # 2 clients
    [3, 5]
  """
  return aggregate(A.max_p, x)


def min(x: PyTree) -> PyTree:
  """CLIENTS -> SERVER: ``min_i x_i``, elementwise over clients, in the clients' dtype.

  Exported to TFF it is ``federated_min``. Its derivative is the tangent of the clients that hold
  the minimum, averaged over ties.

  Example:
    >>> smallest = fb.computation(fb.min, in_placements=(fb.CLIENTS,))
    >>> smallest(np.array([[1, 5], [3, 2]], np.int32)).tolist()  # 2 clients
    [1, 2]
  """
  return aggregate(A.min_p, x)


def _require_float(op: str, x: PyTree) -> None:
  for v in jax.tree.leaves(x):
    if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
      raise TypeError(
          f"fb.{op}{_here()} averages floating values, got {jnp.result_type(v)}: cast inside "
          "fb.map first, or use fb.sum."
      )

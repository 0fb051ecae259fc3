"""The federated primitives that move values to and within the clients, each with its whole story
side by side.

A CLIENTS-placed array carries the clients on its leading axis, so for ``n`` clients:

* ``broadcast``: ``x -> [x] * n``                              (SERVER -> CLIENTS)
* ``map[jaxpr]``: ``xs -> [f(x_i) for i]``, ``f`` kept as a sub-jaxpr (CLIENTS -> CLIENTS)

The aggregations (CLIENTS -> SERVER) are :mod:`faxbridge._src.aggregations`.

For each: abstract evaluation, native impl and XLA lowering (plain ``broadcast_to``, ``vmap``),
JVP, transpose and batching rule, and the placement rule. Derivative rules are written with the
primitives themselves, so the jaxprs of ``jax.grad`` keep the client/server boundary:
``transpose(broadcast) = sum``, and per-client work is wrapped in ``map``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import core as jax_core
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.interpreters import ad, batching, mlir

from faxbridge._src import call_rules, placements
from faxbridge._src.errors import PlacementError
from faxbridge._src.locations import describe
from faxbridge._src.placements import CLIENTS, SERVER

__all__ = [
    "bind_map",
    "broadcast_p",
    "map_p",
    "placement_rule",
    "trace_per_client",
]


def _shaped(shape, dtype, weak_type=False) -> jax_core.ShapedArray:
  return jax_core.ShapedArray(tuple(shape), dtype, weak_type=weak_type)


def placement_rule(prim: jcore.Primitive, kind: str, expects: placements.Placement,
                   out: placements.Placement, hint: str) -> None:
  """Register ``prim``'s placement rule: every argument at ``expects``, every result at ``out``;
  an argument elsewhere is a PlacementError naming ``fb.{kind}``, the user's line and ``hint``."""

  def rule(eqn, in_places):
    for i, place in enumerate(in_places):
      if place is not expects:
        raise PlacementError(
            f"fb.{kind} received a {place.value}-placed value as argument {i}"
            f"{describe(eqn.source_info)}; it takes {expects.value}-placed values. {hint}"
        )
    return [out] * len(eqn.outvars)

  placements.RULES[prim] = rule


# --------------------------------------------------------------------------------------------------
# broadcast: SERVER -> CLIENTS.  y = [x] * n
# --------------------------------------------------------------------------------------------------
broadcast_p = jcore.Primitive("faxbridge_broadcast")


def _broadcast_impl(x, *, clients):
  return jnp.broadcast_to(x, (clients, *jnp.shape(x)))


broadcast_p.def_impl(_broadcast_impl)
broadcast_p.def_abstract_eval(
    lambda x, *, clients: _shaped((clients, *x.shape), x.dtype, x.weak_type)
)
mlir.register_lowering(broadcast_p, mlir.lower_fun(_broadcast_impl, multiple_results=False))


def _broadcast_transpose(ct, x, *, clients):
  # Imported here: the aggregations build their own derivative rules on broadcast.
  from faxbridge._src.aggregations import sum_p

  return [sum_p.bind(ct)]


# Linear; its transpose sums the per-client cotangents back onto the server.
ad.deflinear2(broadcast_p, _broadcast_transpose)


def _broadcast_batch(args, dims, *, clients):
  (x,), (d,) = args, dims
  # The new clients axis goes first, pushing the batch axis one to the right.
  return broadcast_p.bind(x, clients=clients), d + 1


batching.primitive_batchers[broadcast_p] = _broadcast_batch
placement_rule(
    broadcast_p, "broadcast", SERVER, CLIENTS,
    "It is already at the clients: pass it to fb.map directly, or aggregate it first.",
)


# --------------------------------------------------------------------------------------------------
# map[jaxpr]: CLIENTS -> CLIENTS.  ys = [f(x_1, ...), ..., f(x_n, ...)], f a per-client jaxpr
# --------------------------------------------------------------------------------------------------
map_p = jcore.Primitive("faxbridge_map")
map_p.multiple_results = True


def trace_per_client(fn: Callable, avals: Sequence, what: str = "fb.map") -> jcore.ClosedJaxpr:
  """The jaxpr of ``fn`` on one client's values; values it captures from outside are refused.

  A captured tracer is a SERVER value (or a whole CLIENTS array) smuggled into per-client work; it
  must travel as an argument so that the boundary stays explicit.
  """
  closed = jax.make_jaxpr(fn)(*avals)
  if any(isinstance(c, jax_core.Tracer) for c in closed.consts):
    raise PlacementError(
        f"the function given to {what} captures a traced value from the enclosing computation"
        f"{describe(source_info_util.current())}. Per-client functions may only use their "
        "arguments and constants: pass SERVER values as fb.broadcast(value) arguments."
    )
  return closed


def bind_map(fn: Callable, *args, axis_name: str | None = None) -> list:
  """Apply ``fn`` per client to flat CLIENTS arrays ``args`` (all with leading axis n).

  ``axis_name``: the mesh axis the clients are split over (``"clients"``), or None; see ``map_p``.
  """
  clients = jnp.shape(args[0])[0]
  closed = trace_per_client(fn, call_rules.call_avals(args, mapped_axes=1))
  return map_p.bind(*args, jaxpr=closed, clients=clients, axis_name=axis_name)


# ``axis_name`` is the mesh axis of the clients (or None): the vmap over clients is SPMD over it
# (``spmd_axis_name``), so a sharding constraint or a ``shard_map`` inside client work, written for
# one client, gets the clients axis in front of its own (``P('model')`` becomes ``P('clients',
# 'model')``) instead of replicating the clients' values. The derived maps of AD and batching keep it.
def _map_impl(*args, jaxpr, clients, axis_name):
  del clients
  return jax.vmap(jcore.jaxpr_as_fun(jaxpr), spmd_axis_name=axis_name)(*args)


def _map_abstract_eval(*args, jaxpr, clients, axis_name):
  del args, axis_name
  return [_shaped((clients, *a.shape), a.dtype, a.weak_type) for a in jaxpr.out_avals]


map_p.def_impl(_map_impl)
map_p.def_abstract_eval(_map_abstract_eval)
mlir.register_lowering(map_p, mlir.lower_fun(_map_impl, multiple_results=True))


# JVP, transpose and batching: JAX's rules of the per-client jaxpr, traced per client into a new map
# (call_rules.py), so the jaxprs of jax.grad and vmap keep faxbridge_map: tangents and cotangents are
# per-client work too. Traced as fb.map's own function is: captured tracers are refused.
call_rules.define(call_rules.CallPrimitive(map_p, "fb.map", mapped_axes=1, trace=trace_per_client))
placement_rule(
    map_p, "map", CLIENTS, CLIENTS,
    "fb.map applies a per-client function to CLIENTS-placed values: broadcast SERVER values first, "
    "as in fb.map(fn, fb.broadcast(params), data).",
)

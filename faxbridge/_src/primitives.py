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
import numpy as np
from jax import core as jax_core
from jax._src import source_info_util
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from faxbridge._src import placements
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


def _to_clients_axis0(x, bdim):
  """Batching keeps the clients axis first: move a batch axis that sits at 0 to axis 1."""
  return (jnp.moveaxis(x, bdim, 1), 1) if bdim == 0 else (x, bdim)


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


def _per_client_avals(args) -> list[jax_core.ShapedArray]:
  return [_shaped(jnp.shape(a)[1:], jnp.result_type(a)) for a in args]


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


def bind_map(fn: Callable, *args) -> list:
  """Apply ``fn`` per client to flat CLIENTS arrays ``args`` (all with leading axis n)."""
  clients = jnp.shape(args[0])[0]
  closed = trace_per_client(fn, _per_client_avals(args))
  return map_p.bind(*args, jaxpr=closed, clients=clients)


def _map_impl(*args, jaxpr, clients):
  del clients
  return jax.vmap(jcore.jaxpr_as_fun(jaxpr))(*args)


def _map_abstract_eval(*args, jaxpr, clients):
  del args
  return [_shaped((clients, *a.shape), a.dtype, a.weak_type) for a in jaxpr.out_avals]


map_p.def_impl(_map_impl)
map_p.def_abstract_eval(_map_abstract_eval)
mlir.register_lowering(map_p, mlir.lower_fun(_map_impl, multiple_results=True))


def _is_float(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _map_jvp(primals, tangents, *, jaxpr, clients):
  # Primal and tangent maps are bound separately so that partial evaluation (linearize, grad) sees
  # a known primal map and an unknown, linear tangent map. The tangent map recomputes the primal per
  # client: that is the price of keeping each half a plain per-client function.
  primal_out = map_p.bind(*primals, jaxpr=jaxpr, clients=clients)
  nonzero = [type(t) is not ad.Zero for t in tangents]
  out_float = [_is_float(a) for a in jaxpr.out_avals]
  if not any(nonzero) or not any(out_float):
    return primal_out, [ad.Zero(jax.typeof(p).to_tangent_aval()) for p in primal_out]
  inner = jcore.jaxpr_as_fun(jaxpr)
  in_avals = jaxpr.in_avals

  def tangent_fn(*primals_and_tangents):
    ps = primals_and_tangents[: len(primals)]
    it = iter(primals_and_tangents[len(primals):])
    ts = [next(it) if nz else _zero_tangent(a) for nz, a in zip(nonzero, in_avals)]
    _, t_out = jax.jvp(inner, tuple(ps), tuple(ts))
    return [t for t, f in zip(t_out, out_float) if f]

  nz_tangents = [t for t, nz in zip(tangents, nonzero) if nz]
  avals = _per_client_avals(primals) + _per_client_avals(nz_tangents)
  t_jaxpr = trace_per_client(tangent_fn, avals, "the JVP of fb.map")
  t_float = iter(map_p.bind(*primals, *nz_tangents, jaxpr=t_jaxpr, clients=clients))
  tangent_out = [
      next(t_float) if f else ad.Zero(jax.typeof(p).to_tangent_aval())
      for p, f in zip(primal_out, out_float)
  ]
  return primal_out, tangent_out


def _zero_tangent(aval):
  t_aval = aval.to_tangent_aval()
  return np.zeros(t_aval.shape, t_aval.dtype)


ad.primitive_jvps[map_p] = _map_jvp


def _map_transpose(cts, *args, jaxpr, clients):
  # The map is linear in its undefined (linear) arguments given the others (residuals), so its
  # transpose is the per-client VJP at any point of the linear arguments: zeros will do.
  linear = [ad.is_undefined_primal(a) for a in args]
  residuals = [a for a, lin in zip(args, linear) if not lin]
  lin_avals = [a.aval for a, lin in zip(args, linear) if lin]
  cts = [
      jnp.zeros((clients, *a.shape), a.dtype) if type(ct) is ad.Zero else ct
      for ct, a in zip(cts, jaxpr.out_avals)
  ]
  inner = jcore.jaxpr_as_fun(jaxpr)

  def per_client_transpose(*res_and_cts):
    res, ct = res_and_cts[: len(residuals)], res_and_cts[len(residuals):]

    def on_linear(*lin):
      it_res, it_lin = iter(res), iter(lin)
      return inner(*[next(it_lin) if is_lin else next(it_res) for is_lin in linear])

    lin_zeros = [jnp.zeros(a.shape[1:], a.dtype) for a in lin_avals]
    _, vjp = jax.vjp(on_linear, *lin_zeros)
    return vjp(list(ct))

  t_jaxpr = trace_per_client(
      per_client_transpose, _per_client_avals([*residuals, *cts]), "the transpose of fb.map"
  )
  lin_cts = iter(map_p.bind(*residuals, *cts, jaxpr=t_jaxpr, clients=clients))
  return [next(lin_cts) if lin else None for lin in linear]


ad.primitive_transposes[map_p] = _map_transpose


def _map_batch(args, dims, *, jaxpr, clients):
  args, dims = zip(*[_to_clients_axis0(a, d) if d is not None else (a, d) for a, d in zip(args, dims)])
  # Per client the batch axis of a clients-first array sits at d - 1.
  in_axes = [None if d is None else d - 1 for d in dims]
  fn = jax.vmap(jcore.jaxpr_as_fun(jaxpr), in_axes=in_axes, out_axes=0)
  batched = trace_per_client(fn, _per_client_avals(args), "a vmapped fb.map")
  out = map_p.bind(*args, jaxpr=batched, clients=clients)
  return out, [1] * len(out)


batching.primitive_batchers[map_p] = _map_batch
placement_rule(
    map_p, "map", CLIENTS, CLIENTS,
    "fb.map applies a per-client function to CLIENTS-placed values: broadcast SERVER values first, "
    "as in fb.map(fn, fb.broadcast(params), data).",
)

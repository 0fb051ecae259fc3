"""The federated primitives, each with its whole story side by side.

A CLIENTS-placed array carries the clients on its leading axis, so for ``n`` clients:

* ``broadcast``: ``x -> [x] * n``                              (SERVER -> CLIENTS)
* ``map[jaxpr]``: ``xs -> [f(x_i) for i]``, ``f`` kept as a sub-jaxpr (CLIENTS -> CLIENTS)
* ``sum``: ``xs -> sum_i x_i``; ``mean``: ``sum_i x_i / n``   (CLIENTS -> SERVER)
* ``weighted_mean``: ``(xs, ws) -> sum_i w_i x_i / sum_i w_i``
* ``secure_sum[bitwidth]``: ``sum_i x_i`` of integers in ``[0, 2**bitwidth)``
* ``max`` / ``min``: elementwise over clients

For each: abstract evaluation, native impl and XLA lowering (plain ``broadcast_to``, ``vmap`` and
reductions), JVP, transpose and batching rule, and the placement rule. Derivative rules are written
with the primitives themselves, so the jaxprs of ``jax.grad`` keep the client/server boundary:
``transpose(broadcast) = sum``, ``transpose(sum) = broadcast``, ``transpose(mean) = broadcast / n``,
and per-client work (``mul`` by a per-client weight, a max mask) is wrapped in ``map``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.interpreters import ad, batching, mlir

from faxbridge._src import call_rules, placements
from faxbridge._src.errors import PlacementError
from faxbridge._src.locations import describe
from faxbridge._src.placements import CLIENTS, SERVER

__all__ = [
    "AGGREGATIONS",
    "AGGREGATION_KINDS",
    "AggregationRule",
    "broadcast_p",
    "map_p",
    "max_p",
    "mean_p",
    "min_p",
    "secure_sum_p",
    "sum_p",
    "weighted_mean_p",
]


def _shaped(shape, dtype, weak_type=False) -> jax_core.ShapedArray:
  return jax_core.ShapedArray(tuple(shape), dtype, weak_type=weak_type)


def _to_clients_axis0(x, bdim):
  """Batching keeps the clients axis first: move a batch axis that sits at 0 to axis 1."""
  return (jnp.moveaxis(x, bdim, 1), 1) if bdim == 0 else (x, bdim)


def _placement_rule(prim: jcore.Primitive, kind: str, expects: placements.Placement,
                    out: placements.Placement, hint: str):
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
# Linear; its transpose sums the per-client cotangents back onto the server.
ad.deflinear2(broadcast_p, lambda ct, x, *, clients: [sum_p.bind(ct)])


def _broadcast_batch(args, dims, *, clients):
  (x,), (d,) = args, dims
  # The new clients axis goes first, pushing the batch axis one to the right.
  return broadcast_p.bind(x, clients=clients), d + 1


batching.primitive_batchers[broadcast_p] = _broadcast_batch
_placement_rule(
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


def bind_map(fn: Callable, *args) -> list:
  """Apply ``fn`` per client to flat CLIENTS arrays ``args`` (all with leading axis n)."""
  clients = jnp.shape(args[0])[0]
  closed = trace_per_client(fn, call_rules.call_avals(args, mapped_axes=1))
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


# JVP, transpose and batching: JAX's rules of the per-client jaxpr, traced per client into a new map
# (call_rules.py), so the jaxprs of jax.grad and vmap keep faxbridge_map: tangents and cotangents are
# per-client work too. Traced as fb.map's own function is: captured tracers are refused.
call_rules.define(call_rules.CallPrimitive(map_p, "fb.map", mapped_axes=1, trace=trace_per_client))
_placement_rule(
    map_p, "map", CLIENTS, CLIENTS,
    "fb.map applies a per-client function to CLIENTS-placed values: broadcast SERVER values first, "
    "as in fb.map(fn, fb.broadcast(params), data).",
)


# --------------------------------------------------------------------------------------------------
# Aggregations: CLIENTS -> SERVER. One rule per aggregation, read by every interpreter of the form.
# --------------------------------------------------------------------------------------------------
_AGGREGATION_HINT = (
    "Aggregations combine CLIENTS values into one SERVER value; a SERVER value is already "
    "aggregated (compute on it directly, or fb.broadcast it first)."
)


@dataclasses.dataclass(frozen=True)
class AggregationRule:
  """The whole semantics of one aggregation, for every interpreter of a federated program.

  ``reduce(xp, x, w, params)`` is the reference: ``x`` stacked over clients on axis 0, ``w`` the
  per-client weights (weighted kinds), ``xp`` numpy or jax.numpy, so the primitive's own lowering,
  ``split.run`` and the plan runtimes compute the same thing. The result always has the clients'
  dtype and one client's shape (the primitive's abstract evaluation): an int8 sum stays int8 and
  wraps. ``tff(fl, value, weight, params)`` is the federated_language intrinsic that computes it.
  """

  kind: str  # the name plans and manifests use
  primitive: jcore.Primitive
  reduce: Callable[..., Any]
  tff: Callable[..., Any]
  weighted: bool = False
  params: tuple[str, ...] = ()  # the primitive's params that travel with the aggregation
  # The same aggregation computed a few clients at a time (native streaming execution):
  # ``acc = init(aval)``; ``acc = accumulate(acc, x, w)`` for each block ``x`` of clients (axis 0);
  # ``acc = combine(acc, axis_name)`` across devices; ``finish(acc, n, dtype)`` = ``reduce`` of all
  # ``n`` clients. Integers match ``reduce`` exactly (wrap-around is modular, so any order gives the
  # same bits); floats up to summation order.
  stream: _Stream | None = None

  def result_dtype(self, value_dtype) -> np.dtype:
    return np.dtype(value_dtype)

  def init(self, aval, weight_aval=None) -> Any:
    """The accumulator before any client; ``aval`` is one client's value (and weight)."""
    return self.stream.init(aval, weight_aval)

  def accumulate(self, acc, x, w=None) -> Any:
    return self.stream.accumulate(acc, x, w)

  def combine(self, acc, axis_name) -> Any:
    return self.stream.combine(acc, axis_name)

  def finish(self, acc, n: int, dtype) -> jax.Array:
    return self.stream.finish(acc, n, np.dtype(dtype))


def _sum(xp, x, w, params):
  return xp.sum(x, axis=0, dtype=x.dtype)


def _mean(xp, x, w, params):
  return xp.mean(x, axis=0, dtype=x.dtype)


def _weighted_mean(xp, x, w, params):
  w = xp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim)).astype(x.dtype)
  return (xp.sum(w * x, axis=0, dtype=x.dtype) / xp.sum(w, axis=0, dtype=x.dtype)).astype(x.dtype)


def _max(xp, x, w, params):
  return xp.max(x, axis=0)


def _min(xp, x, w, params):
  return xp.min(x, axis=0)


# -- streaming: each aggregation's accumulator, its update by a block of clients, its cross-device
# combination and its final value. Accumulators have the value's dtype, except that float16 and
# bfloat16 accumulate in float32, as jnp.sum computes them (``upcast_f16_for_computation``).
@dataclasses.dataclass(frozen=True)
class _Stream:
  init: Callable[[Any], Any]
  accumulate: Callable[[Any, Any, Any], Any]
  combine: Callable[[Any, str], Any]
  finish: Callable[[Any, int, np.dtype], Any]


def _acc_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return np.dtype(np.float32)
  return dtype


def _block_sum(x, dtype):
  return jnp.sum(x, axis=0, dtype=dtype)


def _divide(total, n, dtype):
  # As jnp.mean divides: the count converted to the computation dtype (it wraps for small ints).
  return jax.lax.div(total, jax.lax.convert_element_type(n, total.dtype)).astype(dtype)


_SUM_STREAM = _Stream(
    init=lambda aval, _: jnp.zeros(aval.shape, _acc_dtype(aval.dtype)),
    accumulate=lambda acc, x, w: acc + _block_sum(x, acc.dtype),
    combine=lambda acc, axis: jax.lax.psum(acc, axis),
    finish=lambda acc, n, dtype: acc.astype(dtype),
)
# mean = sum / n; the sum is kept as sum's accumulator.
_MEAN_STREAM = dataclasses.replace(
    _SUM_STREAM,
    finish=lambda acc, n, dtype: _divide(acc, n, dtype),
)


def _weighted_accumulate(acc, x, w):
  total, weight = acc
  w = jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim)).astype(x.dtype)
  return total + _block_sum(w * x, total.dtype), weight + _block_sum(w, weight.dtype)


def _weighted_finish(acc, n, dtype):
  total, weight = acc
  # reduce divides the two sums in the value's dtype: so does this.
  return (total.astype(dtype) / weight.astype(dtype)).astype(dtype)


# weighted_mean = (sum_i w_i x_i, sum_i w_i); the weight sum keeps the weight's batch axes (a vmap's),
# with ones for the value's other axes.
_WEIGHTED_STREAM = _Stream(
    init=lambda x, w: (jnp.zeros(x.shape, _acc_dtype(x.dtype)),
                       jnp.zeros(w.shape + (1,) * (len(x.shape) - len(w.shape)), _acc_dtype(x.dtype))),
    accumulate=_weighted_accumulate,
    combine=lambda acc, axis: jax.lax.psum(acc, axis),
    finish=_weighted_finish,
)


def _extreme_stream(block, pairwise, collective, start):
  return _Stream(
      init=lambda aval, _: jnp.full(aval.shape, start(aval.dtype), aval.dtype),
      accumulate=lambda acc, x, w: pairwise(acc, block(x, axis=0)),
      combine=lambda acc, axis: collective(acc, axis),
      finish=lambda acc, n, dtype: acc.astype(dtype),
  )


def _lowest(dtype):
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return False
  return -np.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min


def _highest(dtype):
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return True
  return np.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).max


_MAX_STREAM = _extreme_stream(jnp.max, jnp.maximum, jax.lax.pmax, _lowest)
_MIN_STREAM = _extreme_stream(jnp.min, jnp.minimum, jax.lax.pmin, _highest)


def _tff_weighted_mean(fl, value, weight, params):
  return fl.federated_mean(value, weight)


# primitive -> its rule; kind -> its rule. Filled as each aggregation is defined below.
AGGREGATIONS: dict[jcore.Primitive, AggregationRule] = {}
AGGREGATION_KINDS: dict[str, AggregationRule] = {}


def _define_aggregation(kind: str, reduce: Callable, tff: Callable, doc: str, stream: _Stream,
                        params: tuple[str, ...] = ()) -> jcore.Primitive:
  """An unweighted aggregation primitive: abstract eval, impl and lowering (its rule's reference
  with jax.numpy), batching and placement; the caller adds the derivative rules."""
  prim = jcore.Primitive(f"faxbridge_{kind}")
  prim.__doc__ = doc

  def impl(x, **p):
    return reduce(jnp, x, None, p)

  prim.def_impl(impl)
  prim.def_abstract_eval(lambda x, **_: _shaped(x.shape[1:], x.dtype, x.weak_type))
  mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))

  def batch(args, dims, **p):
    x, d = _to_clients_axis0(args[0], dims[0])
    return prim.bind(x, **p), d - 1

  batching.primitive_batchers[prim] = batch
  _placement_rule(prim, kind, CLIENTS, SERVER, _AGGREGATION_HINT)
  _register(AggregationRule(kind, prim, reduce, tff, params=params, stream=stream))
  return prim


def _register(rule: AggregationRule) -> None:
  AGGREGATIONS[rule.primitive] = rule
  AGGREGATION_KINDS[rule.kind] = rule


# sum: sum_i x_i, in the clients' dtype. Linear; transpose(sum) = broadcast.
sum_p = _define_aggregation("sum", _sum, lambda fl, v, w, p: fl.federated_sum(v), "sum_i x_i",
                            _SUM_STREAM)
ad.deflinear2(sum_p, lambda ct, x: [broadcast_p.bind(ct, clients=x.aval.shape[0])])

# mean: sum_i x_i / n. Linear; transpose(mean) = broadcast(ct / n), the division done on the server.
mean_p = _define_aggregation("mean", _mean, lambda fl, v, w, p: fl.federated_mean(v),
                             "sum_i x_i / n", _MEAN_STREAM)
ad.deflinear2(
    mean_p,
    lambda ct, x: [broadcast_p.bind(ct / x.aval.shape[0], clients=x.aval.shape[0])],
)

# secure_sum[bitwidth]: sum_i x_i for integers in [0, 2**bitwidth). Natively a plain sum in the
# clients' dtype, as TFF's test backends compute it; the bitwidth is the contract a secure
# aggregation protocol needs.
secure_sum_p = _define_aggregation(
    "secure_sum", _sum,
    lambda fl, v, w, p: fl.federated_secure_sum_bitwidth(v, p["bitwidth"]),
    "sum_i x_i, x_i in [0, 2**b)", _SUM_STREAM, params=("bitwidth",))
ad.deflinear2(
    secure_sum_p, lambda ct, x, *, bitwidth: [broadcast_p.bind(ct, clients=x.aval.shape[0])]
)


# max / min over clients. JVP as jnp.max's: the tangent of the extreme clients, averaged over ties;
# the tie mask is per-client work, so it runs inside map.
def _extremum_jvp(prim):
  def jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    out = prim.bind(x)
    # The tie mask depends on primals only, so it is its own map: a map that also took the tangent
    # would make the mask (and the division by its sum) look tangent-dependent, i.e. nonlinear.
    (ties,) = bind_map(
        lambda xi, oi: [(xi == oi).astype(xi.dtype)], x, broadcast_p.bind(out, clients=x.shape[0])
    )
    (masked,) = bind_map(lambda ti, tie: [ti * tie], t, ties)
    return out, sum_p.bind(masked) / sum_p.bind(ties)

  return jvp


max_p = _define_aggregation("max", _max, lambda fl, v, w, p: fl.federated_max(v),
                            "max_i x_i, elementwise", _MAX_STREAM)
min_p = _define_aggregation("min", _min, lambda fl, v, w, p: fl.federated_min(v),
                            "min_i x_i, elementwise", _MIN_STREAM)
ad.primitive_jvps[max_p] = _extremum_jvp(max_p)
ad.primitive_jvps[min_p] = _extremum_jvp(min_p)


# weighted_mean: sum_i w_i x_i / sum_i w_i, w_i one scalar per client (w has shape (n, *B) for a
# batch B shared with x, which only vmap produces).
weighted_mean_p = jcore.Primitive("faxbridge_weighted_mean")


def _expand_weight(w, x):
  return jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim)).astype(x.dtype)


def _weighted_mean_impl(x, w):
  return _weighted_mean(jnp, x, w, {})


def _weighted_mean_abstract_eval(x, w):
  if w.shape != x.shape[: w.ndim] or w.dtype != x.dtype:
    raise TypeError(
        f"fb.weighted_mean: weight {w.str_short()} does not fit value {x.str_short()}: it needs "
        "one weight per client, of the value's dtype"
    )
  return _shaped(x.shape[1:], x.dtype, x.weak_type)


weighted_mean_p.def_impl(_weighted_mean_impl)
weighted_mean_p.def_abstract_eval(_weighted_mean_abstract_eval)
mlir.register_lowering(
    weighted_mean_p, mlir.lower_fun(_weighted_mean_impl, multiple_results=False)
)


def _weighted_mean_jvp(primals, tangents):
  # d(sum w x / W) = (sum w dx + sum dw x - out * sum dw) / W, with W = sum w. The products of
  # per-client values are per-client work (map); the rest is server work on aggregates.
  (x, w), (dx, dw) = primals, tangents
  out = weighted_mean_p.bind(x, w)
  total_w = sum_p.bind(w)
  numerator = None
  if type(dx) is not ad.Zero:
    (wdx,) = bind_map(lambda xi, wi: [_expand_weight(wi, xi) * xi], dx, w)
    numerator = sum_p.bind(wdx)
  if type(dw) is not ad.Zero:
    (dwx,) = bind_map(lambda xi, dwi: [_expand_weight(dwi, xi) * xi], x, dw)
    sum_dw = sum_p.bind(dw)
    term = sum_p.bind(dwx) - _expand_weight(sum_dw, out) * out
    numerator = term if numerator is None else numerator + term
  if numerator is None:
    return out, ad.Zero(jax.typeof(out).to_tangent_aval())
  return out, numerator / _expand_weight(total_w, out)


ad.primitive_jvps[weighted_mean_p] = _weighted_mean_jvp


def _weighted_mean_batch(args, dims):
  # Canonical batched form: x of shape (n, B, ...) and w of shape (n,) or (n, B).
  (x, w), (dx, dw) = args, dims
  if dx is None:
    size = w.shape[dw]
    x = jnp.broadcast_to(jnp.expand_dims(x, 1), (x.shape[0], size, *x.shape[1:]))
  else:
    x = jnp.moveaxis(x, dx, 1)
  if dw is not None:
    w = jnp.moveaxis(w, dw, 1)
  elif w.ndim > 1:  # w carries an inner vmap's batch axes: give it this one too
    w = jnp.broadcast_to(jnp.expand_dims(w, 1), (w.shape[0], x.shape[1], *w.shape[1:]))
  return weighted_mean_p.bind(x, w), 0


batching.primitive_batchers[weighted_mean_p] = _weighted_mean_batch
_placement_rule(weighted_mean_p, "weighted_mean", CLIENTS, SERVER, _AGGREGATION_HINT)

_register(AggregationRule("weighted_mean", weighted_mean_p, _weighted_mean, _tff_weighted_mean,
                          weighted=True, stream=_WEIGHTED_STREAM))

FEDERATED_PRIMITIVES = frozenset({broadcast_p, map_p, *AGGREGATIONS})

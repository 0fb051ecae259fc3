"""Aggregations: CLIENTS -> SERVER. One rule per aggregation, read by every interpreter of the form.

For ``n`` clients (a CLIENTS value carries them on its leading axis):

* ``sum``: ``xs -> sum_i x_i``; ``mean``: ``sum_i x_i / n``
* ``weighted_mean``: ``(xs, ws) -> sum_i w_i x_i / sum_i w_i``
* ``secure_sum[bitwidth]``: ``sum_i x_i`` of integers in ``[0, 2**bitwidth)``
* ``max`` / ``min``: elementwise over clients

An aggregation is an :class:`AggregationRule`: its reference semantics (``reduce``, with numpy or
jax.numpy), its streaming accumulator (:class:`Stream`), whether it takes a per-client weight, and
the names of its parameters (the primitive's params that travel with it into the form and
``plan.json``). :func:`define_aggregation` makes the primitive of a rule (abstract evaluation, impl
and lowering from ``reduce``, batching, placement, optional derivative rules) and registers it in
:data:`AGGREGATIONS` (by Primitive) and :data:`AGGREGATION_KINDS` (by the kind plans name). The
core knows no target: a target keeps its own table keyed by the Primitive (the TFF intrinsics are
``faxbridge.converters.tff.intrinsics``).

A package outside faxbridge defines one with ``faxbridge.extend.define_aggregation`` and declares
its module under the entry-point group ``faxbridge.aggregations`` (entry-point name = the kind), so
a plan runtime in a fresh process finds a kind it does not know (:func:`aggregation_rule`). The
kind in an export only selects among installed entry points: nothing named by an export file is
ever imported.

Derivative rules are written with the federated primitives themselves, so the jaxprs of
``jax.grad`` keep the client/server boundary: ``transpose(sum) = broadcast``,
``transpose(mean) = broadcast / n``, and per-client work (``mul`` by a per-client weight, a max
mask) is wrapped in ``map``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir

from faxbridge._src.placements import CLIENTS, SERVER
from faxbridge._src.primitives import bind_map, broadcast_p, placement_rule

__all__ = [
  "AGGREGATIONS",
  "AGGREGATION_ENTRY_POINTS",
  "AGGREGATION_KINDS",
  "BUILTIN_KINDS",
  "AggregationRule",
  "Stream",
  "Streaming",
  "aggregation_rule",
  "define_aggregation",
  "max_p",
  "mean_p",
  "min_p",
  "secure_sum_p",
  "sum_p",
  "weighted_mean_p",
]

# Installed packages declare their aggregations here: ``KIND = module`` (or ``module:object``).
AGGREGATION_ENTRY_POINTS = "faxbridge.aggregations"

_HINT = (
    "Aggregations combine CLIENTS values into one SERVER value; a SERVER value is already "
    "aggregated (compute on it directly, or fb.broadcast it first)."
)


# --------------------------------------------------------------------------------------------------
# The rule.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stream:
  """An aggregation computed a few clients at a time (native streaming execution).

  ``acc = init(aval, weight_aval, params)`` with ``aval`` one client's value (``weight_aval`` its
  weight, or None); ``acc = accumulate(acc, x, w, params)`` for each block ``x`` of clients (axis
  0); ``acc = combine(acc, axis_name, params)`` across devices (a ``psum``-like collective);
  ``finish(acc, n, dtype, params)`` is ``reduce`` of all ``n`` clients. Integers should match
  ``reduce`` exactly; floats up to summation order.
  """

  init: Callable[[Any, Any, Mapping[str, Any]], Any]
  accumulate: Callable[[Any, Any, Any, Mapping[str, Any]], Any]
  combine: Callable[[Any, str, Mapping[str, Any]], Any]
  finish: Callable[[Any, int, np.dtype, Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class AggregationRule:
  """The whole semantics of one aggregation, for every interpreter of a federated program.

  ``reduce(xp, x, w, params)`` is the reference: ``x`` stacked over clients on axis 0, ``w`` the
  per-client weights (weighted kinds, else None), ``params`` the primitive's params by name, ``xp``
  numpy or jax.numpy, so the primitive's own lowering, ``split.run`` and the plan runtimes compute
  the same thing. The result has the clients' dtype and one client's shape (the primitive's
  abstract evaluation): an int8 sum stays int8 and wraps.
  """

  kind: str  # the name plans and manifests use
  primitive: jcore.Primitive
  reduce: Callable[..., Any]
  stream: Stream
  weighted: bool = False
  params: tuple[str, ...] = ()  # the primitive's params that travel with the aggregation

  def streaming(self, params: Mapping[str, Any]) -> Streaming:
    """The stream rules with this equation's params bound (what the stream interpreter calls)."""
    return Streaming(self.stream, {k: params[k] for k in self.params}, self.weighted)


@dataclasses.dataclass(frozen=True)
class Streaming:
  """An aggregation's :class:`Stream` with its params bound."""

  stream: Stream
  params: Mapping[str, Any]
  weighted: bool

  def init(self, aval, weight_aval=None) -> Any:
    """The accumulator before any client; ``aval`` is one client's value (and weight)."""
    return self.stream.init(aval, weight_aval, self.params)

  def accumulate(self, acc, x, w=None) -> Any:
    return self.stream.accumulate(acc, x, w, self.params)

  def combine(self, acc, axis_name) -> Any:
    return self.stream.combine(acc, axis_name, self.params)

  def finish(self, acc, n: int, dtype) -> jax.Array:
    return self.stream.finish(acc, n, np.dtype(dtype), self.params)


# primitive -> its rule; kind -> its rule. Filled by define_aggregation.
AGGREGATIONS: dict[jcore.Primitive, AggregationRule] = {}
AGGREGATION_KINDS: dict[str, AggregationRule] = {}


# --------------------------------------------------------------------------------------------------
# Defining one: the primitive of a rule.
# --------------------------------------------------------------------------------------------------
def _define(kind: str, primitive_name: str, reduce: Callable, stream: Stream,
            params: tuple[str, ...], weighted: bool, jvp: Callable | None,
            transpose: Callable | None, doc: str) -> jcore.Primitive:
  if kind in AGGREGATION_KINDS:
    raise ValueError(f"aggregation kind {kind!r} is already defined "
                     f"(primitive {AGGREGATION_KINDS[kind].primitive.name!r})")
  prim = jcore.Primitive(primitive_name)
  prim.__doc__ = doc

  # Positional value and weight, so that no param name can shadow them.
  def impl(x, w=None, /, **p):
    return reduce(jnp, x, w, p)

  def abstract_eval(x, w=None, /, **_):
    if w is not None and (w.shape != x.shape[: w.ndim] or w.dtype != x.dtype):
      raise TypeError(
          f"fb.{kind}: weight {w.str_short()} does not fit value {x.str_short()}: it needs "
          "one weight per client, of the value's dtype"
      )
    return jax_core.ShapedArray(x.shape[1:], x.dtype, weak_type=x.weak_type)

  prim.def_impl(impl)
  prim.def_abstract_eval(abstract_eval)
  mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))
  batching.primitive_batchers[prim] = _weighted_batcher(prim) if weighted else _batcher(prim)
  placement_rule(prim, kind, CLIENTS, SERVER, _HINT)
  if jvp is not None:
    ad.primitive_jvps[prim] = jvp
    if transpose is not None:
      ad.primitive_transposes[prim] = transpose
  elif transpose is not None:  # linear: the JVP is the aggregation of the tangents
    ad.deflinear2(prim, transpose)
  rule = AggregationRule(kind, prim, reduce, stream, weighted=weighted, params=tuple(params))
  AGGREGATIONS[prim] = rule
  AGGREGATION_KINDS[kind] = rule
  return prim


def _batcher(prim):
  def batch(args, dims, **p):
    (x,), (d,) = args, dims
    if d == 0:  # the clients axis stays first: the batch axis moves behind it
      x, d = jnp.moveaxis(x, 0, 1), 1
    return prim.bind(x, **p), d - 1

  return batch


def _weighted_batcher(prim):
  def batch(args, dims, **p):
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
    return prim.bind(x, w, **p), 0

  return batch


_QUALIFIED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def define_aggregation(kind: str, *, reduce: Callable, stream: Stream, params: tuple[str, ...] = (),
                       weighted: bool = False, jvp: Callable | None = None,
                       transpose: Callable | None = None, doc: str = "") -> jcore.Primitive:
  """Define an aggregation outside faxbridge and return its primitive.

  ``kind`` is package-qualified (``"mypkg.clipped_sum"``): it names the aggregation in forms,
  ``plan.json`` and error messages, and can clash neither with faxbridge's kinds nor with another
  package's. ``reduce(xp, x, w, params)`` is its reference semantics over all clients (``x``
  stacked on axis 0, ``w`` the per-client weights of a ``weighted`` aggregation, else None,
  ``params`` the values of the names in ``params``, ``xp`` numpy or jax.numpy); the result must
  have the clients' dtype and one client's shape. ``stream`` computes the same a block of clients
  at a time (the native ``"stream"`` strategy). Derivative rules are optional: ``transpose(ct, x,
  **params) -> [ct_x]`` for a linear aggregation (its JVP follows), or ``jvp(primals, tangents,
  **params) -> (out, tangent)``; without them ``jax.grad`` through the aggregation fails.

  Bind it with ``faxbridge.extend.aggregate(prim, x, **params)``. Plan runtimes run it by its rule;
  a runtime in a fresh process (``runtime="jax"``) finds it through the entry point the package
  declares: ``[faxbridge.aggregations] mypkg.clipped_sum = mypkg.aggregations``. A target without
  a rule for it (``tff``) refuses it.

  Raises:
    ValueError: the kind is not package-qualified or is already defined, or a param name is no
      identifier.
  """
  if not _QUALIFIED.fullmatch(kind):
    raise ValueError(
        f"aggregation kind {kind!r}: an aggregation defined outside faxbridge is named by its "
        "package, e.g. 'mypkg.clipped_sum', so it never clashes with faxbridge's own kinds "
        f"({', '.join(sorted(BUILTIN_KINDS))}) or another package's")
  bad = [p for p in params if not isinstance(p, str) or not _PARAM.fullmatch(p)]
  if bad:
    raise ValueError(f"aggregation {kind!r}: param names must be identifiers ([A-Za-z_][A-Za-z0-9_]*), "
                     f"got {bad}")
  return _define(kind, kind, reduce, stream, tuple(params), weighted, jvp, transpose, doc)


def aggregation_rule(kind: str) -> AggregationRule:
  """The rule of ``kind``: a built-in one, one already defined in this process, or one declared
  by an installed package under the entry-point group ``faxbridge.aggregations`` (loaded now).

  Raises:
    LookupError: no aggregation of that kind is defined or declared, or its entry point does not
      define it.
  """
  rule = AGGREGATION_KINDS.get(kind)
  if rule is not None:
    return rule
  declared = importlib.metadata.entry_points(group=AGGREGATION_ENTRY_POINTS, name=kind)
  for ep in declared:
    try:
      ep.load()
    except Exception as e:
      raise LookupError(f"aggregation kind {kind!r}: loading its entry point "
                        f"{ep.name} = {ep.value} failed: {type(e).__name__}: {e}") from e
  rule = AGGREGATION_KINDS.get(kind)
  if rule is None:
    if declared:
      raise LookupError(f"aggregation kind {kind!r}: its entry point "
                        f"{', '.join(ep.value for ep in declared)} does not define it")
    raise LookupError(
        f"unknown aggregation kind {kind!r}: faxbridge defines {', '.join(sorted(BUILTIN_KINDS))}, "
        f"and no installed package declares it under the entry-point group "
        f"{AGGREGATION_ENTRY_POINTS!r}: install the package that defines it")
  return rule


# --------------------------------------------------------------------------------------------------
# The built-in aggregations: reference, stream, derivative rules.
# --------------------------------------------------------------------------------------------------
def _expand_weight(w, x):
  return jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim)).astype(x.dtype)


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


# -- streaming: accumulators have the value's dtype, except that float16 and bfloat16 accumulate in
# float32, as jnp.sum computes them (``upcast_f16_for_computation``).
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


_SUM_STREAM = Stream(
    init=lambda aval, _, p: jnp.zeros(aval.shape, _acc_dtype(aval.dtype)),
    accumulate=lambda acc, x, w, p: acc + _block_sum(x, acc.dtype),
    combine=lambda acc, axis, p: jax.lax.psum(acc, axis),
    finish=lambda acc, n, dtype, p: acc.astype(dtype),
)
# mean = sum / n; the sum is kept as sum's accumulator.
_MEAN_STREAM = dataclasses.replace(
    _SUM_STREAM,
    finish=lambda acc, n, dtype, p: _divide(acc, n, dtype),
)


def _weighted_accumulate(acc, x, w, params):
  total, weight = acc
  w = _expand_weight(w, x)
  return total + _block_sum(w * x, total.dtype), weight + _block_sum(w, weight.dtype)


def _weighted_finish(acc, n, dtype, params):
  total, weight = acc
  # reduce divides the two sums in the value's dtype: so does this.
  return (total.astype(dtype) / weight.astype(dtype)).astype(dtype)


# weighted_mean = (sum_i w_i x_i, sum_i w_i); the weight sum keeps the weight's batch axes (a vmap's),
# with ones for the value's other axes.
_WEIGHTED_STREAM = Stream(
    init=lambda x, w, p: (jnp.zeros(x.shape, _acc_dtype(x.dtype)),
                          jnp.zeros(w.shape + (1,) * (len(x.shape) - len(w.shape)),
                                    _acc_dtype(x.dtype))),
    accumulate=_weighted_accumulate,
    combine=lambda acc, axis, p: jax.lax.psum(acc, axis),
    finish=_weighted_finish,
)


def _extreme_stream(block, pairwise, collective, start):
  return Stream(
      init=lambda aval, _, p: jnp.full(aval.shape, start(aval.dtype), aval.dtype),
      accumulate=lambda acc, x, w, p: pairwise(acc, block(x, axis=0)),
      combine=lambda acc, axis, p: collective(acc, axis),
      finish=lambda acc, n, dtype, p: acc.astype(dtype),
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


def _builtin(kind: str, reduce: Callable, stream: Stream, doc: str, *, params: tuple[str, ...] = (),
             weighted: bool = False, jvp: Callable | None = None,
             transpose: Callable | None = None) -> jcore.Primitive:
  """A faxbridge aggregation: a bare kind, its primitive namespaced ``faxbridge_<kind>``."""
  return _define(kind, f"faxbridge_{kind}", reduce, stream, params, weighted, jvp, transpose, doc)


def _to_clients(ct, x):
  return broadcast_p.bind(ct, clients=x.aval.shape[0])


# sum: sum_i x_i, in the clients' dtype. Linear; transpose(sum) = broadcast.
sum_p = _builtin("sum", _sum, _SUM_STREAM, "sum_i x_i",
                 transpose=lambda ct, x: [_to_clients(ct, x)])

# mean: sum_i x_i / n. Linear; transpose(mean) = broadcast(ct / n), the division done on the server.
mean_p = _builtin("mean", _mean, _MEAN_STREAM, "sum_i x_i / n",
                  transpose=lambda ct, x: [_to_clients(ct / x.aval.shape[0], x)])

# secure_sum[bitwidth]: sum_i x_i for integers in [0, 2**bitwidth). Natively a plain sum in the
# clients' dtype, as TFF's test backends compute it; the bitwidth is the contract a secure
# aggregation protocol needs.
secure_sum_p = _builtin("secure_sum", _sum, _SUM_STREAM, "sum_i x_i, x_i in [0, 2**b)",
                        params=("bitwidth",),
                        transpose=lambda ct, x, *, bitwidth: [_to_clients(ct, x)])


# max / min over clients. JVP as jnp.max's: the tangent of the extreme clients, averaged over ties;
# the tie mask is per-client work, so it runs inside map.
def _extremum_jvp(prim, primals, tangents):
  (x,), (t,) = primals, tangents
  out = prim.bind(x)
  # The tie mask depends on primals only, so it is its own map: a map that also took the tangent
  # would make the mask (and the division by its sum) look tangent-dependent, i.e. nonlinear.
  (ties,) = bind_map(
      lambda xi, oi: [(xi == oi).astype(xi.dtype)], x, broadcast_p.bind(out, clients=x.shape[0])
  )
  (masked,) = bind_map(lambda ti, tie: [ti * tie], t, ties)
  return out, sum_p.bind(masked) / sum_p.bind(ties)


# (Annotated: each JVP refers to its own primitive.)
max_p: jcore.Primitive = _builtin(
    "max", _max, _extreme_stream(jnp.max, jnp.maximum, jax.lax.pmax, _lowest),
    "max_i x_i, elementwise", jvp=lambda ps, ts: _extremum_jvp(max_p, ps, ts))
min_p: jcore.Primitive = _builtin(
    "min", _min, _extreme_stream(jnp.min, jnp.minimum, jax.lax.pmin, _highest),
    "min_i x_i, elementwise", jvp=lambda ps, ts: _extremum_jvp(min_p, ps, ts))


# weighted_mean: sum_i w_i x_i / sum_i w_i, w_i one scalar per client (w has shape (n, *B) for a
# batch B shared with x, which only vmap produces).
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


weighted_mean_p: jcore.Primitive = _builtin(
    "weighted_mean", _weighted_mean, _WEIGHTED_STREAM, "sum_i w_i x_i / sum_i w_i", weighted=True,
    jvp=_weighted_mean_jvp)

# The kinds faxbridge defines itself (plan.schema.json lists exactly these).
BUILTIN_KINDS = frozenset(AGGREGATION_KINDS)

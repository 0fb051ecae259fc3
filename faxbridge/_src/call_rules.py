"""JVP, transpose and batching of a call-like primitive: one whose param ``jaxpr`` is a closed jaxpr
it applies to its operands.

Two primitives are call-like: ``fb.map`` (``primitives.py``) applies its jaxpr to each client, and
the native primitive (``execution.py``) applies a whole federated jaxpr once. For both, a rule is
JAX's rule of the jaxpr, traced into a new jaxpr that the same primitive applies, so the jaxprs of
``jax.grad``, ``jax.jvp`` and ``jax.vmap`` keep the primitive (and its per-client or streamed
execution):

* **JVP**: ``f(x)`` and ``jvp(f)(x, dx)`` as two calls, so that partial evaluation (``linearize``,
  ``grad``) sees a known primal call and an unknown tangent call linear in ``dx``. Symbolic zero
  tangents are not passed; results without tangents (integers, booleans) are not returned. The
  tangent call recomputes the primal: the price of keeping each half a plain call.
* **transpose**: the call is linear in its undefined operands given the others (residuals), so its
  transpose is the VJP of ``f`` at any point of the linear operands: zeros will do.
* **batching**: ``vmap(f)`` over the batched operands; the batch axis goes right after the axes the
  call maps over (for ``fb.map`` the clients axis stays first).

What differs between the primitives is a :class:`CallPrimitive`: how many leading axes the call maps
over, how a function is traced into a jaxpr, and how the params of a derived call are rebuilt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax.extend import core as jcore
from jax.interpreters import ad, batching

__all__ = ["CallPrimitive", "Port", "call_avals", "define", "one_call"]

# An operand or a result of a derived call stands for one of the original call's: ("in", i) has the
# layout of operand i (a primal, its tangent, its cotangent), ("out", j) that of result j.
Port = tuple[Literal["in", "out"], int]
Params = dict[str, Any]


def one_call(aval, mapped_axes: int) -> jax_core.ShapedArray:
  """The aval one application of the jaxpr sees of an operand or result: ``aval`` without its
  leading mapped axes, strongly typed (a call's signature does not depend on how its operands were
  written)."""
  return jax_core.ShapedArray(aval.shape[mapped_axes:], aval.dtype)


def call_avals(values: Sequence, mapped_axes: int) -> list[jax_core.ShapedArray]:
  """:func:`one_call` of each of ``values`` (arrays or tracers)."""
  return [one_call(jax.typeof(v), mapped_axes) for v in values]


def _trace(fn: Callable, avals: Sequence, what: str) -> jcore.ClosedJaxpr:
  del what
  return jax.make_jaxpr(fn)(*avals)


def _same(params: Params, *_) -> Params:
  return params


@dataclasses.dataclass(frozen=True)
class CallPrimitive:
  """What a call-like primitive's rules need to know about it."""

  primitive: jcore.Primitive
  what: str  # its name in messages: "fb.map"
  # Leading axes of every operand and result that the call maps over and its jaxpr does not see.
  mapped_axes: int = 0
  # ``trace(fn, avals, what)``: the closed jaxpr of ``fn`` on one application's avals; ``what``
  # names the rule for error messages ("the JVP of fb.map").
  trace: Callable[[Callable, Sequence, str], jcore.ClosedJaxpr] = _trace
  # ``derive(params, ins, outs)``: the params of a derived call whose operands and results stand for
  # the original call's ``ins`` and ``outs`` (``jaxpr`` is replaced afterwards).
  derive: Callable[[Params, Sequence[Port], Sequence[Port]], Params] = _same
  # ``batch(params, batched)``: the params of the batched call; ``batched[i]`` says whether operand
  # ``i`` carries the new batch axis (every result does), at position ``mapped_axes``.
  batch: Callable[[Params, Sequence[bool]], Params] = _same

  def bind_derived(self, fn: Callable, args: Sequence, what: str, params: Params,
                   ins: Sequence[Port], outs: Sequence[Port]) -> list:
    """Trace ``fn`` on one application of ``args`` and apply it to ``args`` with this primitive."""
    jaxpr = self.trace(fn, call_avals(args, self.mapped_axes), f"{what} {self.what}")
    return self.primitive.bind(*args, **{**self.derive(params, ins, outs), "jaxpr": jaxpr})


def define(call: CallPrimitive) -> None:
  """Register the JVP, transpose and batching rules of ``call.primitive``."""
  prim = call.primitive
  ad.primitive_jvps[prim] = lambda primals, tangents, **params: _jvp(call, primals, tangents, params)
  ad.primitive_transposes[prim] = lambda cts, *args, **params: _transpose(call, cts, args, params)
  batching.primitive_batchers[prim] = lambda args, dims, **params: _batch(call, args, dims, params)


def _has_tangent(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _zero_tangent(aval):
  t_aval = aval.to_tangent_aval()
  return np.zeros(t_aval.shape, t_aval.dtype)


def _symbolic_zero(value) -> ad.Zero:
  return ad.Zero(jax.typeof(value).to_tangent_aval())


def _jvp(call: CallPrimitive, primals, tangents, params: Params):
  jaxpr: jcore.ClosedJaxpr = params["jaxpr"]
  primal_out = call.primitive.bind(*primals, **params)
  nonzero = [type(t) is not ad.Zero for t in tangents]
  out_float = [_has_tangent(a) for a in jaxpr.out_avals]
  if not any(nonzero) or not any(out_float):
    return primal_out, [_symbolic_zero(p) for p in primal_out]
  inner = jcore.jaxpr_as_fun(jaxpr)

  def tangent_fn(*primals_and_tangents):
    ps = primals_and_tangents[: len(primals)]
    it = iter(primals_and_tangents[len(primals):])
    ts = [next(it) if nz else _zero_tangent(a) for nz, a in zip(nonzero, jaxpr.in_avals)]
    _, t_out = jax.jvp(inner, tuple(ps), tuple(ts))
    return [t for t, f in zip(t_out, out_float) if f]

  nz_tangents = [t for t, nz in zip(tangents, nonzero) if nz]
  ins: list[Port] = [("in", i) for i in range(len(primals))]
  ins += [("in", i) for i, nz in enumerate(nonzero) if nz]
  outs: list[Port] = [("out", j) for j, f in enumerate(out_float) if f]
  t_out = iter(call.bind_derived(tangent_fn, [*primals, *nz_tangents], "the JVP of", params,
                                 ins, outs))
  return primal_out, [next(t_out) if f else _symbolic_zero(p) for p, f in zip(primal_out, out_float)]


def _transpose(call: CallPrimitive, cts, args, params: Params):
  jaxpr: jcore.ClosedJaxpr = params["jaxpr"]
  linear = [ad.is_undefined_primal(a) for a in args]
  residuals = [a for a, lin in zip(args, linear) if not lin]
  lin_avals = [one_call(a.aval, call.mapped_axes) for a, lin in zip(args, linear) if lin]
  # A symbolic zero cotangent is passed as zeros of its result's shape and dtype.
  cts = [jnp.zeros(cast(jax_core.ShapedArray, ct.aval).shape, a.dtype) if type(ct) is ad.Zero else ct
         for ct, a in zip(cts, jaxpr.out_avals)]
  inner = jcore.jaxpr_as_fun(jaxpr)

  def transpose_fn(*res_and_cts):
    res, ct = res_and_cts[: len(residuals)], res_and_cts[len(residuals):]

    def on_linear(*lin):
      it_res, it_lin = iter(res), iter(lin)
      return inner(*[next(it_lin) if is_lin else next(it_res) for is_lin in linear])

    _, vjp = jax.vjp(on_linear, *[jnp.zeros(a.shape, a.dtype) for a in lin_avals])
    return vjp(list(ct))

  ins: list[Port] = [("in", i) for i, lin in enumerate(linear) if not lin]
  ins += [("out", j) for j in range(len(cts))]
  outs: list[Port] = [("in", i) for i, lin in enumerate(linear) if lin]
  lin_cts = iter(call.bind_derived(transpose_fn, [*residuals, *cts], "the transpose of", params,
                                   ins, outs))
  return [next(lin_cts) if lin else None for lin in linear]


def _batch(call: CallPrimitive, args, dims, params: Params):
  jaxpr: jcore.ClosedJaxpr = params["jaxpr"]
  batched = [d is not None for d in dims]  # None: not batched (batching.not_mapped)
  size = next(a.shape[d] for a, d, b in zip(args, dims, batched) if b)
  # The batch axis goes right after the mapped axes: axis 0 of one application's operands.
  args = [jnp.moveaxis(a, d, call.mapped_axes) if b else a for a, d, b in zip(args, dims, batched)]
  fn = jax.vmap(jcore.jaxpr_as_fun(jaxpr), in_axes=[0 if b else None for b in batched],
                out_axes=0, axis_size=size)
  traced = call.trace(fn, call_avals(args, call.mapped_axes), f"a vmapped {call.what}")
  out = call.primitive.bind(*args, **{**call.batch(params, batched), "jaxpr": traced})
  return out, [call.mapped_axes] * len(out)

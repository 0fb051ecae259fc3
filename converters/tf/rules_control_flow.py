"""Calls and control flow: inlined calls, ``cond`` -> ``If``, ``while`` / ``scan`` -> ``While``.

``tf.cond`` / ``tf.while_loop`` build the functional ``If``/``StatelessIf`` and
``While``/``StatelessWhile`` ops (control flow v2), which TF 2.14 runs and the TFLite converter maps to
its ``IF`` and ``WHILE`` builtins. A scan's stacked outputs are written row by row with a select
against ``range(length) == i`` (no TensorList ops, which TFLite would need to lower).
"""

from __future__ import annotations

import tensorflow as tf
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as jprims

from . import _util as u
from .lower import physical, tf_dtype
from .registry import register
from .rules_structural import broadcast_in_dim

_F = "control_flow"


def _lower_sub(ctx, sub, args):
  if isinstance(sub, jcore.ClosedJaxpr):
    return ctx.lower_closed(sub, args)
  return ctx.lower(sub, [], args)


@register(jprims.jit_p, jprims.closed_call_p, jprims.remat_p, jprims.custom_jvp_call_p,
          jprims.custom_vjp_call_p, family=_F,
          note="inlined: the body is lowered in place (custom rules only matter for AD, done before)")
def _call(ctx, eqn, *args):
  """Inline the called jaxpr: ``f(*args)``."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      outs = _lower_sub(ctx, eqn.params[key], list(args))
      return outs if eqn.primitive.multiple_results else outs[0]
  raise NotImplementedError(f"call primitive without a jaxpr parameter: {sorted(eqn.params)}")


@register(lax.cond_p, family=_F)
def _cond(ctx, eqn, index, *operands):
  """``branches[index](*operands)`` as nested ``If`` ops (jax has already clamped ``index``)."""
  branches = eqn.params["branches"]
  ops = list(operands)

  def run(k):
    return lambda: _lower_sub(ctx, branches[k], ops)

  def build(k):
    if k == len(branches) - 1:
      return run(k)()
    pred = tf.less_equal(index, tf.constant(k, index.dtype)) if index.dtype != tf.bool else (
        tf.logical_not(index) if k == 0 else tf.constant(True))
    outs = tf.cond(pred, run(k), lambda: build(k + 1))
    return list(outs) if isinstance(outs, list | tuple) else [outs]

  return build(0)


@register(lax.while_p, family=_F)
def _while(ctx, eqn, *args):
  """``while cond(c): c = body(c)`` as one ``While``."""
  p = eqn.params
  nc, nb = int(p["cond_nconsts"]), int(p["body_nconsts"])
  cconsts, bconsts, init = list(args[:nc]), list(args[nc:nc + nb]), list(args[nc + nb:])
  if not init:
    raise NotImplementedError("while loop without a carry")

  def cond_fn(*carry):
    return _lower_sub(ctx, p["cond_jaxpr"], cconsts + list(carry))[0]

  def body_fn(*carry):
    return tuple(_lower_sub(ctx, p["body_jaxpr"], bconsts + list(carry)))

  outs = tf.while_loop(cond_fn, body_fn, loop_vars=tuple(init))
  return list(outs)


def write_row(buf: tf.Tensor, row: tf.Tensor, i: tf.Tensor) -> tf.Tensor:
  """``buf`` with ``buf[i] = row``, as ``SelectV2(range(n) == i, row, buf)``."""
  n = buf.shape[0]
  hit = broadcast_in_dim(tf.equal(tf.range(n, dtype=tf.int32), i), [n] + [1] * (buf.shape.rank - 1),
                         [0])
  return u.tflite_int32("SelectV2", lambda buf, row: tf.where(hit, tf.expand_dims(row, 0), buf), buf, row)


def scan_split(eqn) -> tuple[int, int]:
  """``(number of consts, number of carries)`` of a ``scan`` equation.

  Its operands are ``consts + init + xs`` and its body maps ``consts + carry + x_t`` to
  ``carry + y_t``; how the counts are spelled in the params is JAX's business: ``num_consts`` and
  ``num_carry`` up to jax 0.10, the flat trees ``ft_in = (consts, carry, xs)`` and
  ``ft_out = (carry, ys)`` from 0.11. The split is then checked against what a scan means (the carry
  keeps its type through the body, each x and y is stacked ``length`` times), so a future spelling
  fails here, by name, rather than lowering a wrong loop.
  """
  p = eqn.params
  if "num_consts" in p and "num_carry" in p:
    nconst, ncarry = int(p["num_consts"]), int(p["num_carry"])
  elif "ft_in" in p and "ft_out" in p:
    ins, outs = p["ft_in"].unpack(), p["ft_out"].unpack()
    if len(ins) != 3 or len(outs) != 2:
      raise NotImplementedError(f"scan with ft_in of {len(ins)} parts and ft_out of {len(outs)}")
    nconst, ncarry = len(ins[0]), len(ins[1])
    if len(outs[0]) != ncarry:
      raise NotImplementedError(f"scan with {ncarry} carries in and {len(outs[0])} out")
  else:
    raise NotImplementedError(f"scan params without a consts/carry split: {sorted(p)}")
  body, n = p["jaxpr"], int(p["length"])
  in_avals, out_avals = [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars]
  body_in, body_out = body.in_avals, body.out_avals
  xs_avals, ys_avals = in_avals[nconst + ncarry:], out_avals[ncarry:]

  def same(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype

  ok = (len(in_avals) == len(body_in) and len(out_avals) == len(body_out) and ncarry <= len(out_avals)
        and all(same(a, b) for a, b in zip(in_avals[:nconst + ncarry], body_in))
        and all(same(a, b) for a, b in zip(body_out[:ncarry], body_in[nconst:nconst + ncarry]))
        and all(same(a, b) for a, b in zip(out_avals[:ncarry], body_out))
        and all(tuple(x.shape) == (n, *b.shape) for x, b in zip(xs_avals, body_in[nconst + ncarry:]))
        and all(tuple(y.shape) == (n, *b.shape) for y, b in zip(ys_avals, body_out[ncarry:])))
  if not ok:
    raise NotImplementedError(f"scan whose operands do not split as {nconst} consts, {ncarry} carries "
                              f"and stacked xs/ys of length {n} (params: {sorted(p)})")
  return nconst, ncarry


@register(lax.scan_p, family=_F, note="one While; the stacked outputs are written with selects")
def _scan(ctx, eqn, *args):
  """``carry, ys = scan(f, init, xs)``: ``carry, ys[t] = f(carry, xs[t])`` for t = 0..length-1
  (reversed when ``reverse``)."""
  p = eqn.params
  body = p["jaxpr"]
  n = int(p["length"])
  nconst, ncarry = scan_split(eqn)
  consts, init, xs = list(args[:nconst]), list(args[nconst:nconst + ncarry]), list(args[nconst + ncarry:])
  y_avals = body.out_avals[ncarry:]
  ys0 = []
  for aval in y_avals:
    shape, dtype = physical(aval)
    ys0.append(tf.zeros([n, *shape], tf_dtype(dtype)))
  if n == 0:
    return init + ys0

  def cond_fn(i, *state):
    return tf.less(i, n)

  def body_fn(i, *state):
    carry, ys = list(state[:ncarry]), list(state[ncarry:])
    t = (n - 1) - i if p["reverse"] else i
    x_t = [u.tflite_int32("GatherV2", lambda x: tf.gather(x, t), x) for x in xs]
    outs = _lower_sub(ctx, body, consts + carry + x_t)
    new_ys = [write_row(buf, y, t) for buf, y in zip(ys, outs[ncarry:])]
    return (i + 1, *outs[:ncarry], *new_ys)

  outs = tf.while_loop(cond_fn, body_fn, loop_vars=(tf.constant(0, tf.int32), *init, *ys0))
  outs = list(outs)[1:]
  return [u.cast(o, physical(v.aval)[1]) for o, v in zip(outs, eqn.outvars)]

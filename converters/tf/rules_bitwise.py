"""Bitwise primitives on integers and booleans, with builtin-only forms where the bits allow.

TFLite has ``BITWISE_XOR`` and ``RIGHT_SHIFT`` but no ``LeftShift``, ``BitwiseOr`` or ``BitwiseAnd``.
Threefry and the uniform-float trick only ever use them in forms that have exact builtin equivalents:
``x << k`` (constant ``k``) is ``x * 2**k`` (wrapping), and an OR of operands whose set bits are
disjoint is their sum. Disjointness is proven from how the operands were made (``known_zero_bits``);
when it cannot be proven the TF op is emitted and the graph is TF-only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from jax import lax

from . import _util as u
from .registry import register

_F = "elementwise"
_MAX_DEPTH = 12


def _bits(dtype: Any) -> int:
  return np.dtype(dtype).itemsize * 8


def _const_shift(atom: Any) -> int | None:
  v = u.literal_value(atom)
  if v is None or v.size == 0 or not np.all(v == v.flat[0]):
    return None
  return int(v.flat[0])


# Primitives that only move or copy elements: every bit known 0 in the operand is 0 in the result.
_BIT_PRESERVING = (lax.broadcast_in_dim_p, lax.reshape_p, lax.squeeze_p, lax.transpose_p, lax.slice_p,
                   lax.copy_p, lax.rev_p, lax.dynamic_slice_p)


def known_zero_bits(ctx: Any, atom: Any, depth: int = 0) -> int:
  """A mask of the bits that are 0 in every element of integer ``atom``, as far as can be proven."""
  dtype = atom.aval.dtype
  width = _bits(dtype)
  full = (1 << width) - 1
  v = u.literal_value(atom)
  if v is not None:
    bits = np.asarray(v).astype(np.dtype(dtype)).view(np.dtype(f"uint{width}")).ravel()
    return full & ~int(np.bitwise_or.reduce(bits, initial=0))
  eqn = ctx.producers.get(atom)
  if eqn is None or depth > _MAX_DEPTH:
    return 0
  prim = eqn.primitive
  kz = lambda i: known_zero_bits(ctx, eqn.invars[i], depth + 1)
  if prim is lax.shift_right_logical_p:
    s = _const_shift(eqn.invars[1])
    if s is None:
      return 0
    return full if s >= width else (full & ~(full >> s)) | (kz(0) >> s)
  if prim is lax.shift_left_p:
    s = _const_shift(eqn.invars[1])
    if s is None:
      return 0
    return full if s >= width else ((1 << s) - 1) | ((kz(0) << s) & full)
  if prim is lax.and_p:
    return kz(0) | kz(1)
  if prim in (lax.or_p, lax.xor_p):
    return kz(0) & kz(1)
  if prim is lax.convert_element_type_p:
    src = eqn.invars[0].aval.dtype
    if np.dtype(src) == np.bool_:
      return full & ~1
    if np.dtype(src).kind == "u" and _bits(src) <= width:
      return full & ~((1 << _bits(src)) - 1) | kz(0)
    return 0
  if prim in _BIT_PRESERVING:
    return kz(0)
  return 0


def _full_mask(atom: Any) -> int:
  return (1 << _bits(atom.aval.dtype)) - 1


@register(lax.or_p, family=_F, tflite="partial",
          note="bool, or integers with provably disjoint bits (emitted as add); else BitwiseOr")
def _or(ctx, eqn, x, y):
  if x.dtype == tf.bool:
    return tf.logical_or(x, y)
  a, b = eqn.invars
  if known_zero_bits(ctx, a) | known_zero_bits(ctx, b) == _full_mask(a):
    return tf.add(x, y)  # no bit is set in both: OR == ADD, with no carries
  return tf.bitwise.bitwise_or(x, y)


@register(lax.and_p, family=_F, tflite="partial",
          note="bool, all-ones/zero masks, low-bit masks 2**k-1 and high-bit masks ~(2**k-1) on 32-bit "
               "ints; else BitwiseAnd")
def _and(ctx, eqn, x, y):
  if x.dtype == tf.bool:
    return tf.logical_and(x, y)
  a, b = eqn.invars
  full = _full_mask(a)
  for (p, tp), q in (((a, x), b), ((b, y), a)):
    c = u.literal_value(q)
    if c is not None and c.size and np.all(c == c.flat[0]):
      m = int(np.asarray(c.flat[0]).astype(a.aval.dtype).view(f"uint{_bits(a.aval.dtype)}"))
      if m == full:
        return tf.broadcast_to(tp, u.out_shape(eqn)) if tp.shape != u.out_shape(eqn) else tp
      if m == 0 or known_zero_bits(ctx, p) | m == full:
        # every bit the mask keeps is known to be 0 (m == 0 included)
        return tf.zeros(u.out_shape(eqn), tp.dtype) if m == 0 else tp
      if (m & (m + 1)) == 0 and tp.dtype in (tf.int32, tf.uint32):
        k = m.bit_length()  # x & (2**k - 1) == x ^ ((x >> k) << k): clear the bits above k
        hi = tf.bitwise.right_shift(tp, tf.constant(k, tp.dtype))
        factor = np.array(1 << k, np.uint32).view(tp.dtype.as_numpy_dtype)
        return tf.broadcast_to(tf.bitwise.bitwise_xor(tp, hi * tf.constant(factor)), u.out_shape(eqn))
      low = ~m & full
      if (low & (low + 1)) == 0 and tp.dtype in (tf.int32, tf.uint32):
        # x & ~(2**k - 1) == (x >> k) * 2**k: clear the k low bits (jax >= 0.11's erfc derivative
        # splits a float32 this way); an arithmetic shift keeps int32's sign bits, as the mask does
        k = low.bit_length()
        hi = tf.bitwise.right_shift(tp, tf.constant(k, tp.dtype))
        factor = np.array(1 << k, np.uint32).view(tp.dtype.as_numpy_dtype)
        return tf.broadcast_to(hi * tf.constant(factor), u.out_shape(eqn))
  return tf.bitwise.bitwise_and(x, y)


@register(lax.xor_p, family=_F)
def _xor(ctx, eqn, x, y):
  if x.dtype == tf.bool:
    return tf.not_equal(x, y)
  return tf.bitwise.bitwise_xor(x, y)


@register(lax.not_p, family=_F)
def _not(ctx, eqn, x):
  """Logical not of bools; ``x ^ ~0`` for integers (``BITWISE_XOR`` is a builtin, ``Invert`` not)."""
  if x.dtype == tf.bool:
    return tf.logical_not(x)
  return tf.bitwise.bitwise_xor(x, tf.constant(np.array(-1).astype(x.dtype.as_numpy_dtype)))


def _to_unsigned(x: tf.Tensor) -> tf.Tensor:
  dt = {tf.int8: tf.uint8, tf.int16: tf.uint16, tf.int32: tf.uint32, tf.int64: tf.uint64}.get(x.dtype)
  return x if dt is None else tf.bitcast(x, dt)


def _to_signed(x: tf.Tensor) -> tf.Tensor:
  dt = {tf.uint8: tf.int8, tf.uint16: tf.int16, tf.uint32: tf.int32, tf.uint64: tf.int64}.get(x.dtype)
  return x if dt is None else tf.bitcast(x, dt)


def _shift_amount(s: tf.Tensor, width: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(amount clipped to [0, width - 1], mask of amounts >= width). Negative counts as >= width."""
  if s.dtype.is_unsigned:
    too_big = tf.greater_equal(s, tf.constant(width, s.dtype))
  else:  # signed compares are builtins for TFLite, unsigned ones are not
    too_big = tf.logical_or(tf.less(s, 0), tf.greater_equal(s, tf.constant(width, s.dtype)))
  return tf.where(too_big, tf.zeros([], s.dtype), s), too_big


@register(lax.shift_left_p, family=_F, tflite="partial",
          note="constant shift: multiply by 2**k (builtin); variable shift: LeftShift (TF-only)")
def _shift_left(ctx, eqn, x, s):
  """``x << s``, 0 when ``s >= bits`` (XLA)."""
  width = _bits(x.dtype.as_numpy_dtype)
  out_shape = u.out_shape(eqn)
  k = _const_shift(eqn.invars[1])
  if k is not None:
    if not 0 <= k < width:
      return tf.zeros(out_shape, x.dtype)
    factor = np.array(1 << k, dtype=np.uint64).astype(f"uint{width}").view(x.dtype.as_numpy_dtype)
    return tf.broadcast_to(x * tf.constant(factor), out_shape)
  s, too_big = _shift_amount(s, width)
  return tf.where(too_big, tf.zeros([], x.dtype), tf.bitwise.left_shift(x, s))


@register(lax.shift_right_logical_p, family=_F)
def _shift_right_logical(ctx, eqn, x, s):
  """``x >> s`` filling with zeros (signed inputs shifted as their unsigned bits); 0 if ``s >= bits``."""
  width = _bits(x.dtype.as_numpy_dtype)
  out_shape = u.out_shape(eqn)
  k = _const_shift(eqn.invars[1])
  if k is not None and not 0 <= k < width:
    return tf.zeros(out_shape, x.dtype)
  xu = _to_unsigned(x)
  if k is not None:
    r = tf.bitwise.right_shift(xu, tf.constant(k, xu.dtype))
    r = tf.broadcast_to(r, out_shape)
  else:
    s, too_big = _shift_amount(s, width)
    r = tf.where(too_big, tf.zeros([], xu.dtype), tf.bitwise.right_shift(xu, _to_unsigned(s)))
  return _to_signed(r) if x.dtype != xu.dtype else r


@register(lax.shift_right_arithmetic_p, family=_F)
def _shift_right_arithmetic(ctx, eqn, x, s):
  """``x >> s`` filling with the sign bit (unsigned inputs shifted as their signed bits)."""
  width = _bits(x.dtype.as_numpy_dtype)
  xs = _to_signed(x)
  s_c, too_big = _shift_amount(s, width)
  s_c = tf.where(too_big, tf.constant(width - 1, s.dtype), s_c)
  r = tf.bitwise.right_shift(xs, tf.cast(s_c, xs.dtype) if s_c.dtype != xs.dtype else s_c)
  r = tf.broadcast_to(r, u.out_shape(eqn))
  return _to_unsigned(r) if x.dtype != xs.dtype else r

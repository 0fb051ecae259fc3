"""Elementwise primitives: arithmetic, comparisons, bitwise ops, transcendental functions, casts.

Every op emitted here has a TFLite builtin unless its rule says otherwise. Where TFLite lacks a
builtin (``Erf``, ``Log1p``, ``LeftShift``, ``BitwiseOr``, ``IsFinite``...) the rule writes the same
math from builtins: ``erf`` as a polynomial fitted below, ``x << k`` as ``x * 2**k``, a disjoint OR as
an add.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from jax import lax
from jax.extend.core import primitives as jprims

from faxbridge.extend import jax_internals

from . import _util as u
from .registry import register

# jax.sharding.reshard's and jax.random.clone's primitives: JAX has no public handle on them.
reshard_p, random_clone_p = jax_internals.reshard_p, jax_internals.random_clone_p

_F = "elementwise"


def _same_shape_binary(tf_fn, op):
  """A rule ``tf_fn(x, y)`` emitting TF op ``op`` (in int32 where TFLite lacks it for small ints)."""
  def rule(ctx, eqn, x, y):
    return u.tflite_int32(op, tf_fn, x, y)
  return rule


# --- arithmetic -------------------------------------------------------------------------------------

register(lax.add_p, jprims.add_jaxvals_p, family=_F)(_same_shape_binary(tf.add, "AddV2"))
register(lax.sub_p, family=_F)(_same_shape_binary(tf.subtract, "Sub"))
register(lax.mul_p, family=_F)(_same_shape_binary(tf.multiply, "Mul"))


@register(lax.max_p, family=_F)
def _max(ctx, eqn, x, y):
  return tf.logical_or(x, y) if u.is_bool(u.out_dtype(eqn)) else u.tflite_int32("Maximum", tf.maximum, x, y)


@register(lax.min_p, family=_F)
def _min(ctx, eqn, x, y):
  return tf.logical_and(x, y) if u.is_bool(u.out_dtype(eqn)) else u.tflite_int32("Minimum", tf.minimum, x, y)


def _int_div_parts(x, y, dtype):
  """``_int_parts`` in int32 where TFLite lacks one of its ops for the small integer ``dtype``."""
  return u.tflite_int32(_INT_DIV_OPS, lambda x, y: _int_parts(x, y, dtype), x, y)


# The TF ops ``_int_parts`` emits on its operands' type.
_INT_DIV_OPS = ("Equal", "NotEqual", "Less", "SelectV2", "FloorDiv", "FloorMod", "AddV2", "Sub")


def _int_parts(x, y, dtype):
  """Integer ``x / y`` rounded toward zero and its remainder, with XLA's answers where C traps.

  XLA defines ``x / 0 = -1`` (all ones), ``x % 0 = x`` and ``INT_MIN / -1 = INT_MIN``; TF's kernels
  raise or trap there, so the divisor is made safe first and those cases patched after.
  ``FloorDiv``/``FloorMod`` (TFLite builtins) are turned into truncation by the usual sign fix.
  """
  zero = tf.zeros([], x.dtype)
  one = tf.ones([], x.dtype)
  y_is_zero = tf.equal(y, zero)
  unsafe = y_is_zero
  if u.is_signed(dtype):
    unsafe = tf.logical_or(unsafe, tf.logical_and(tf.equal(x, np.iinfo(dtype).min), tf.equal(y, -one)))
  ys = tf.where(unsafe, one, y)
  q = tf.math.floordiv(x, ys)
  r = tf.math.floormod(x, ys)
  if u.is_signed(dtype):
    # floor and trunc differ when the remainder is nonzero and x, y have opposite signs.
    fix = tf.logical_and(tf.not_equal(r, zero), tf.not_equal(tf.less(x, zero), tf.less(ys, zero)))
    q = tf.where(fix, q + one, q)
    r = tf.where(fix, r - ys, r)
  # all ones of dtype (255 for uint8), held in x's type (int32 when widened)
  q = tf.where(y_is_zero, tf.constant(np.array(-1).astype(dtype).astype(x.dtype.as_numpy_dtype)), q)
  r = tf.where(y_is_zero, x, r)
  return q, r


@register(lax.div_p, family=_F, tflite="partial",
          note="int: XLA's x/0 = -1, INT_MIN/-1 = INT_MIN kept; uint32 and 16-bit floats TF-only")
def _div(ctx, eqn, x, y):
  """Float division; integer division rounded toward zero (C semantics, as XLA)."""
  dtype = u.out_dtype(eqn)
  if u.is_float(dtype):
    return tf.math.divide(x, y)
  return _int_div_parts(x, y, dtype)[0]


@register(lax.rem_p, family=_F, tflite="partial",
          note="floats within 1 ulp of |y| of fmod (from FloorMod); uint32 TF-only for TFLite")
def _rem(ctx, eqn, x, y):
  """``x - y * trunc(x / y)``: the remainder with the sign of ``x`` (C ``fmod``)."""
  dtype = u.out_dtype(eqn)
  if not u.is_float(dtype):
    return _int_div_parts(x, y, dtype)[1]
  # FloorMod of magnitudes is exact (no sign fix-up whose r + y rounds: floormod(-6e-8, 2) is
  # 2 - 6e-8, which rounds to 2.0); the sign of x is then put back.
  r = tf.math.floormod(tf.abs(x), tf.abs(y))
  return tf.where(tf.less(x, tf.zeros([], x.dtype)), tf.negative(r), r)


@register(lax.neg_p, family=_F)
def _neg(ctx, eqn, x):
  if u.is_unsigned(u.out_dtype(eqn)):  # wraps, as jax's neg of an unsigned integer
    return u.tflite_int32("Sub", lambda x: tf.zeros([], x.dtype) - x, x)
  return u.tflite_int32("Neg", tf.negative, x)


@register(lax.abs_p, family=_F)
def _abs(ctx, eqn, x):
  return u.tflite_int32("Abs", tf.abs, x)  # int8's abs(-128) narrows back to -128, as in JAX


@register(lax.sign_p, family=_F)
def _sign(ctx, eqn, x):
  if u.is_unsigned(u.out_dtype(eqn)):
    return u.cast(u.tflite_int32("NotEqual", lambda x: tf.not_equal(x, 0), x), x.dtype)
  return u.tflite_int32("Sign", tf.sign, x)


@register(lax.floor_p, family=_F)
def _floor(ctx, eqn, x):
  return tf.floor(x)


@register(lax.ceil_p, family=_F)
def _ceil(ctx, eqn, x):
  return tf.math.ceil(x)


@register(lax.round_p, family=_F)
def _round(ctx, eqn, x):
  """Half to even (``Round``) or half away from zero: ``sign(x) * (floor|x| + (frac|x| >= 1/2))``."""
  if int(eqn.params["rounding_method"]) == 1:
    return tf.round(x)
  ax = tf.abs(x)
  fl = tf.floor(ax)
  up = u.cast(tf.greater_equal(ax - fl, tf.constant(0.5, x.dtype)), x.dtype)
  mag = fl + up
  return tf.where(tf.less(x, tf.zeros([], x.dtype)), -mag, mag)


@register(lax.is_finite_p, family=_F)
def _is_finite(ctx, eqn, x):
  """``|x| <= largest finite``: false for +-inf and NaN (no ``IsFinite`` builtin in TFLite)."""
  big = np.finfo(x.dtype.as_numpy_dtype).max
  return tf.less_equal(tf.abs(x), tf.constant(big, x.dtype))


@register(lax.clamp_p, family=_F)
def _clamp(ctx, eqn, lo, x, hi):
  """``min(max(x, lo), hi)``."""
  return u.tflite_int32(("Maximum", "Minimum"), lambda lo, x, hi: tf.minimum(tf.maximum(x, lo), hi),
                        lo, x, hi)


@register(lax.integer_pow_p, family=_F)
def _integer_pow(ctx, eqn, x):
  """``x ** y`` for a static integer ``y`` by square-and-multiply; ``1 / x**|y|`` when ``y < 0``."""
  y = int(eqn.params["y"])
  n = abs(y)
  acc = None
  base = x
  while n:
    if n & 1:
      acc = base if acc is None else _mul(acc, base)
    n >>= 1
    if n:
      base = _mul(base, base)
  if acc is None:
    acc = tf.ones_like(x)
  return tf.math.divide(tf.ones([], x.dtype), acc) if y < 0 else acc


def _mul(x, y):
  # the ``*`` operator, not tf.multiply: it names the op "mul", as exported graphs always had it
  return u.tflite_int32("Mul", lambda x, y: x * y, x, y)


@register(lax.square_p, family=_F)
def _square(ctx, eqn, x):
  return _mul(x, x)


def _one_minus_square(ctx, eqn, x):
  """``1 - x**2`` as ``(1 + x) * (1 - x)``, the product JAX lowers it to (exact near ``|x| = 1``)."""
  one = tf.ones([], x.dtype)
  return _mul(u.tflite_int32("AddV2", lambda x: one + x, x), u.tflite_int32("Sub", lambda x: one - x, x))


def _polynomial(ctx, eqn, x, *coeffs):
  """``a_0 + x (a_1 + x (... + x a_N))`` (coefficients low first) by Horner's rule, one multiply and
  one add per step, as JAX lowers it."""
  acc = coeffs[-1]
  for c in reversed(coeffs[:-1]):
    acc = u.tflite_int32("AddV2", lambda a, b: a + b, _mul(acc, x), c)
  shape = list(u.out_shape(eqn))
  return acc if acc.shape.as_list() == shape else u.tflite_int32(
      "BroadcastTo", lambda a: tf.broadcast_to(a, shape), acc)


# jax >= 0.11 only (0.10 has neither primitive: tanh's derivative was 1 - square(ans) there, and
# erf's and gelu's polynomials were open-coded multiplies and adds).
if hasattr(lax, "one_minus_square_p"):
  register(lax.one_minus_square_p, family=_F, note="jax >= 0.11 (tanh's, asin's derivatives)")(
      _one_minus_square)
if hasattr(lax, "polynomial_p"):
  register(lax.polynomial_p, family=_F, note="jax >= 0.11 (erf's, gelu's polynomials): Horner's rule")(
      _polynomial)


@register(lax.pow_p, family=_F, note="float base; integer exponents are cast to the base's type")
def _pow(ctx, eqn, x, y):
  return tf.pow(x, u.cast(y, x.dtype))


# --- transcendental -----------------------------------------------------------------------------------

def _unary(prim, tf_fn, tflite="builtin", note=""):
  register(prim, family=_F, tflite=tflite, note=note)(lambda ctx, eqn, x: tf_fn(x))


_unary(lax.exp_p, tf.exp)
_unary(lax.log_p, tf.math.log)
_unary(lax.sqrt_p, tf.sqrt)
_unary(lax.rsqrt_p, tf.math.rsqrt)
_unary(lax.tanh_p, tf.tanh)
_unary(lax.logistic_p, tf.sigmoid)
_unary(lax.sin_p, tf.sin)
_unary(lax.cos_p, tf.cos)
_unary(lax.tan_p, lambda x: tf.sin(x) / tf.cos(x), note="sin/cos: a few ulp from XLA's tan")
_unary(lax.atan_p, lambda x: tf.atan2(x, tf.ones_like(x)))
_unary(lax.exp2_p, lambda x: tf.pow(tf.constant(2, x.dtype), x))
# No TFLite builtin for these; they stay TF-only (TF has had the kernels for years).
_unary(lax.asin_p, tf.asin, "tf-only")
_unary(lax.acos_p, tf.acos, "tf-only")
_unary(lax.sinh_p, tf.sinh, "tf-only")
_unary(lax.cosh_p, tf.cosh, "tf-only")
_unary(lax.asinh_p, tf.asinh, "tf-only")
_unary(lax.acosh_p, tf.acosh, "tf-only")
_unary(lax.atanh_p, tf.atanh, "tf-only")
_unary(lax.lgamma_p, tf.math.lgamma)
_unary(lax.digamma_p, tf.math.digamma, "tf-only")


@register(lax.atan2_p, family=_F)
def _atan2(ctx, eqn, x, y):
  shape = u.out_shape(eqn)  # TFLite's ATAN2 wants equal operand shapes
  return tf.atan2(tf.broadcast_to(x, shape), tf.broadcast_to(y, shape))


@register(lax.log1p_p, family=_F)
def _log1p(ctx, eqn, x):
  """``log(1 + x)`` accurate near 0 (Goldberg's trick): ``log(w) * x / (w - 1)`` with ``w = 1 + x``.

  The rounding error of ``w`` cancels in the ratio; when ``w == 1`` the answer is ``x`` itself.
  """
  x, dt = u.upcast16(x)
  one = tf.ones([], x.dtype)
  w = x + one
  d = w - one
  safe_d = tf.where(tf.equal(d, 0), one, d)
  r = tf.where(tf.equal(d, 0), x, tf.math.log(w) * (x / safe_d))
  r = tf.where(tf.equal(w, w * 2), tf.math.log(w), r)  # w is +inf or 0: log(w) is already right
  return u.cast(r, dt)


@register(lax.expm1_p, family=_F)
def _expm1(ctx, eqn, x):
  """``exp(x) - 1`` accurate near 0 (Kahan): ``(w - 1) * x / log(w)`` with ``w = exp(x)``."""
  x, dt = u.upcast16(x)
  one = tf.ones([], x.dtype)
  w = tf.exp(x)
  lw = tf.math.log(w)
  d = w - one
  safe_lw = tf.where(tf.equal(lw, 0), one, lw)
  r = tf.where(tf.equal(w, one), x, d * (x / safe_lw))
  r = tf.where(tf.equal(d, -one), d, r)  # exp underflowed: the answer is -1
  r = tf.where(tf.equal(w, w * 2), d, r)  # w is +inf (or 0, handled above)
  return u.cast(r, dt)


def _fit(fn, lo: float, hi: float, deg: int) -> list[float]:
  """Least-squares polynomial (monomial coefficients, low first) of ``fn`` on Chebyshev nodes."""
  t = (np.cos(np.linspace(0.0, np.pi, 16 * deg)) + 1.0) * 0.5 * (hi - lo) + lo
  return list(np.polynomial.polynomial.polyfit(t, np.array([fn(v) for v in t]), deg))


# erf(x) = x * P(x^2) on |x| <= 1, and erfc(x) = exp(-x^2) * Q(1/x) on x >= 1 (Q is erfcx in 1/x).
# Fitted here, in float64, from math.erf/math.erfc; evaluated in float32 the relative error is
# below 2e-7 for erf and 5e-6 for erfc (the float32 rounding of x*x inside exp(-x^2) dominates).
_ERF_SMALL = _fit(lambda t: math.erf(math.sqrt(t)) / math.sqrt(t) if t > 0 else 2 / math.sqrt(math.pi),
                  0.0, 1.0, 7)
_ERFCX_INV = _fit(lambda s: math.erfc(1 / s) * math.exp(1 / (s * s)) if s > 0.04 else
                  math.erfc(25.0) * math.exp(625.0) * 25.0 * s, 0.0, 1.0, 12)


def _horner(t, coeffs):
  acc = tf.constant(coeffs[-1], t.dtype)
  for c in coeffs[-2::-1]:
    acc = acc * t + tf.constant(c, t.dtype)
  return acc


def _erf_parts(x):
  """(erf(x), erfc(x)) from the two fits, both from builtin ops."""
  one = tf.ones([], x.dtype)
  ax = tf.abs(x)
  small = x * _horner(x * x, _ERF_SMALL)
  big_ax = tf.maximum(ax, one)  # keep 1/x finite; only used where |x| >= 1
  erfc_abs = tf.exp(-(big_ax * big_ax)) * _horner(one / big_ax, _ERFCX_INV)
  is_small = tf.less(ax, one)
  neg = tf.less(x, tf.zeros([], x.dtype))
  erf = tf.where(is_small, small, tf.where(neg, erfc_abs - one, one - erfc_abs))
  erfc = tf.where(is_small, one - small, tf.where(neg, 2 * one - erfc_abs, erfc_abs))
  return erf, erfc


@register(lax.erf_p, family=_F, note="polynomial fit, rel err < 2e-7 in float32")
def _erf(ctx, eqn, x):
  x, dt = u.upcast16(x)
  return u.cast(_erf_parts(x)[0], dt)


@register(lax.erfc_p, family=_F, note="polynomial fit of erfcx, rel err < 1e-5 while erfc(x) is normal")
def _erfc(ctx, eqn, x):
  x, dt = u.upcast16(x)
  return u.cast(_erf_parts(x)[1], dt)


# Giles, "Approximating the erfinv function" (GPU Computing Gems, 2011), single precision:
# erfinv(x) = x * p(w) with w = -log((1 - x)(1 + x)), one polynomial for w < 5 and one in sqrt(w).
_GILES_CENTRAL = [2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                  -0.00125372503, -0.00417768164, 0.246640727, 1.50140941]
_GILES_TAIL = [-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
               -0.0076224613, 0.00943887047, 1.00167406, 2.83297682]


@register(lax.erf_inv_p, family=_F, note="Giles' approximation (the one XLA uses); +-inf at +-1")
def _erf_inv(ctx, eqn, x):
  x, dt = u.upcast16(x)
  one = tf.ones([], x.dtype)
  w = -tf.math.log((one - x) * (one + x))
  central = _horner(w - 2.5, _GILES_CENTRAL[::-1])
  tail = _horner(tf.sqrt(tf.maximum(w, 5.0)) - 3.0, _GILES_TAIL[::-1])
  r = tf.where(tf.less(w, 5.0), central, tail) * x
  r = tf.where(tf.equal(tf.abs(x), one), x * tf.constant(np.inf, x.dtype), r)
  return u.cast(r, dt)


@register(lax.nextafter_p, family=_F, note="float32 (16-bit types via float32 bits are not exact)")
def _nextafter(ctx, eqn, x, y):
  """The float after ``x`` towards ``y``: step the bits of ``x`` by +-1 (sign-magnitude order)."""
  if x.dtype != tf.float32:
    raise NotImplementedError(f"nextafter on {x.dtype.name}")
  bits = tf.bitcast(x, tf.int32)
  zero = tf.zeros([], x.dtype)
  # away from zero when moving further from it: +1 on the magnitude bits, else -1
  away = tf.equal(tf.less(x, y), tf.greater(x, zero))
  step = tf.where(away, tf.constant(1, tf.int32), tf.constant(-1, tf.int32))
  r = tf.bitcast(bits + step, tf.float32)
  tiny = tf.bitcast(tf.constant(1, tf.int32), tf.float32)  # smallest subnormal
  r = tf.where(tf.equal(x, zero), tf.where(tf.greater(y, zero), tiny, -tiny), r)
  r = tf.where(tf.equal(x, y), y, r)
  return tf.where(tf.logical_or(tf.not_equal(x, x), tf.not_equal(y, y)), x + y, r)


# --- comparisons and selection ---------------------------------------------------------------------

register(lax.eq_p, family=_F)(_same_shape_binary(tf.equal, "Equal"))
register(lax.ne_p, family=_F)(_same_shape_binary(tf.not_equal, "NotEqual"))
register(lax.lt_p, family=_F)(_same_shape_binary(tf.less, "Less"))
register(lax.le_p, family=_F)(_same_shape_binary(tf.less_equal, "LessEqual"))
register(lax.gt_p, family=_F)(_same_shape_binary(tf.greater, "Greater"))
register(lax.ge_p, family=_F)(_same_shape_binary(tf.greater_equal, "GreaterEqual"))


@register(lax.select_n_p, family=_F)
def _select_n(ctx, eqn, which, *cases):
  """``cases[which]`` elementwise: one ``SelectV2`` for a boolean predicate, a chain for an index."""
  if len(cases) == 1:
    return cases[0]
  if which.dtype == tf.bool:
    return u.tflite_int32("SelectV2", lambda a, b: tf.where(which, b, a), *cases)

  def chain(*cases):
    out = cases[0]
    for k in range(1, len(cases)):
      is_k = u.tflite_int32("Equal", lambda w, k=k: tf.equal(w, tf.constant(k, w.dtype)), which)
      out = tf.where(is_k, cases[k], out)
    return out
  return u.tflite_int32("SelectV2", chain, *cases)


# --- casts --------------------------------------------------------------------------------------------

def convert(x: tf.Tensor, src: Any, dst: Any) -> tf.Tensor:
  """``convert_element_type`` with XLA's semantics.

  Float -> integer saturates and maps NaN to 0 (a plain ``Cast`` is undefined out of range);
  anything -> bool is ``x != 0``.
  """
  src, dst = np.dtype(src), np.dtype(dst)
  if src == dst:
    return x
  if u.is_bool(dst):
    return tf.not_equal(x, tf.zeros([], x.dtype))
  if u.is_bool(src):
    return u.from_bool(x, dst)
  if u.is_float(src) and dst.kind in "iu":
    info = np.iinfo(dst)
    xf = x if x.dtype == tf.float32 or x.dtype == tf.float64 else tf.cast(x, tf.float32)
    np_f = xf.dtype.as_numpy_dtype
    lo = tf.constant(float(info.min), xf.dtype)
    hi = tf.constant(float(info.max) + 1.0, xf.dtype)  # 2**bits (or 2**(bits-1)): exact in floating point
    below_hi = tf.constant(np.nextafter(np_f(float(info.max) + 1.0), np_f(0)), xf.dtype)
    y = tf.cast(tf.minimum(tf.maximum(xf, lo), below_hi), u.tf_dtype(dst))

    def fix(y):  # the selects run on y's type: int32 for uint8/uint16 (no SELECT_V2 kernel)
      y = tf.where(tf.greater_equal(xf, hi), tf.constant(info.max, y.dtype), y)
      return tf.where(tf.not_equal(xf, xf), tf.zeros([], y.dtype), y)
    return u.tflite_int32("SelectV2", fix, y)
  return tf.cast(x, u.tf_dtype(dst))


@register(lax.convert_element_type_p, family=_F)
def _convert_element_type(ctx, eqn, x):
  return convert(x, u.in_dtype(eqn), u.out_dtype(eqn))


@register(lax.bitcast_convert_type_p, family=_F, note="same-width types only")
def _bitcast_convert_type(ctx, eqn, x):
  src, dst = u.in_dtype(eqn), u.out_dtype(eqn)
  if src.itemsize != dst.itemsize:
    raise NotImplementedError("bitcast between types of different widths")
  return tf.bitcast(x, u.tf_dtype(dst))


def _identity(ctx, eqn, *xs):
  return xs if eqn.primitive.multiple_results else xs[0]


# Values with no layout or device in a TF graph: copies, placement and sharding annotations are the
# identity on the data (a key's clone is the same uint32 key data).
register(lax.copy_p, lax.stop_gradient_p, lax.device_put_p, lax.optimization_barrier_p,
         lax.sharding_constraint_p, reshard_p, random_clone_p, family=_F)(_identity)

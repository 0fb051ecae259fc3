"""Shape and layout primitives: broadcast, reshape, transpose, slices, concatenation, padding, iota.

All lower to ops with TFLite builtins (RESHAPE, BROADCAST_TO, TRANSPOSE, STRIDED_SLICE, CONCATENATION,
PACK, SPLIT_V, REVERSE_V2, PADV2, RANGE); on the small integer types where one of them has no kernel
(``u.NO_TFLITE_KERNEL``) it moves the data as int32.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from jax import lax

from . import _util as u
from .registry import register

_F = "structural"


def reshape(x: tf.Tensor, shape) -> tf.Tensor:
  shape = [int(d) for d in shape]
  return x if x.shape.as_list() == shape else tf.reshape(x, shape)


def broadcast_in_dim(x: tf.Tensor, shape, broadcast_dimensions) -> tf.Tensor:
  """Operand dim ``i`` becomes output dim ``broadcast_dimensions[i]``; the others are broadcast."""
  shape = [int(d) for d in shape]
  inter = [1] * len(shape)
  for i, d in enumerate(broadcast_dimensions):
    inter[d] = x.shape[i]
  x = reshape(x, inter)
  return x if inter == shape else u.tflite_int32("BroadcastTo", lambda x: tf.broadcast_to(x, shape), x)


@register(lax.broadcast_in_dim_p, family=_F)
def _broadcast_in_dim(ctx, eqn, x, *dyn):
  if dyn:
    raise NotImplementedError("dynamic shapes")
  value = u.literal_value(eqn.invars[0])
  dt = u.out_dtype(eqn)
  if value is not None and (u.is_float(dt) or dt == np.int32):
    # a literal (the zeros of a gradient): one constant (or Fill), not Const + Reshape + BroadcastTo
    return u.full(u.out_shape(eqn), value, dt)
  return broadcast_in_dim(x, u.out_shape(eqn), eqn.params["broadcast_dimensions"])


@register(lax.reshape_p, family=_F)
def _reshape(ctx, eqn, x, *dyn):
  """Row-major reshape; with ``dimensions`` the operand is transposed by it first."""
  if dyn:
    raise NotImplementedError("dynamic shapes")
  dims = eqn.params.get("dimensions")
  if dims is not None and list(dims) != sorted(dims):
    x = u.tflite_int32("Transpose", lambda x: tf.transpose(x, [int(d) for d in dims]), x)
  return reshape(x, u.out_shape(eqn))


@register(lax.squeeze_p, family=_F)
def _squeeze(ctx, eqn, x):
  return reshape(x, u.out_shape(eqn))


@register(lax.transpose_p, family=_F)
def _transpose(ctx, eqn, x):
  perm = [int(p) for p in eqn.params["permutation"]]
  return x if perm == sorted(perm) else u.tflite_int32("Transpose", lambda x: tf.transpose(x, perm), x)


@register(lax.concatenate_p, family=_F)
def _concatenate(ctx, eqn, *xs):
  return u.tflite_int32("ConcatV2", lambda *xs: tf.concat(list(xs), axis=int(eqn.params["dimension"])), *xs)


@register(lax.stack_p, family=_F)
def _stack(ctx, eqn, *xs):
  return u.tflite_int32("Pack", lambda *xs: tf.stack(list(xs), axis=int(eqn.params["axis"])), *xs)


@register(lax.split_p, family=_F)
def _split(ctx, eqn, x):
  """Consecutive pieces along ``axis``, as strided slices (TFLite's SPLIT_V lacks uint32)."""
  axis, start, outs = int(eqn.params["axis"]), 0, []
  shape = x.shape.as_list()
  for size in (int(s) for s in eqn.params["sizes"]):
    lo, hi = [0] * len(shape), list(shape)
    lo[axis], hi[axis] = start, start + size
    outs.append(static_slice(x, lo, hi))
    start += size
  return outs


@register(lax.unstack_p, family=_F, note="jax >= 0.11 unstacks a key's two words with it")
def _unstack(ctx, eqn, x):
  """Each index along ``axis`` with that axis dropped, as ``split`` into ones then reshapes."""
  axis = int(eqn.params["axis"])
  shape = x.shape.as_list()
  outs = []
  for k in range(shape[axis]):
    lo, hi = [0] * len(shape), list(shape)
    lo[axis], hi[axis] = k, k + 1
    outs.append(reshape(static_slice(x, lo, hi), u.out_shape(eqn, k)))
  return outs


def static_slice(x: tf.Tensor, start, limit, strides=None) -> tf.Tensor:
  start = [int(s) for s in start]
  limit = [int(s) for s in limit]
  strides = [1] * len(start) if strides is None else [int(s) for s in strides]
  if start == [0] * len(start) and limit == x.shape.as_list() and strides == [1] * len(start):
    return x
  # The converter turns a unit-stride StridedSlice into SLICE, whose kernel takes fewer types.
  op = "Slice" if strides == [1] * len(start) else "StridedSlice"
  return u.tflite_int32(op, lambda x: tf.strided_slice(x, start, limit, strides), x)


@register(lax.slice_p, family=_F)
def _slice(ctx, eqn, x):
  p = eqn.params
  return static_slice(x, p["start_indices"], p["limit_indices"], p["strides"])


@register(lax.rev_p, family=_F)
def _rev(ctx, eqn, x):
  dims = [int(d) for d in eqn.params["dimensions"]]
  return u.tflite_int32("ReverseV2", lambda x: tf.reverse(x, dims), x) if dims else x


def interior_pad(x: tf.Tensor, axis: int, k: int, value: tf.Tensor) -> tf.Tensor:
  """Insert ``k`` copies of ``value`` between neighbours along ``axis``: n -> (n - 1) * (k + 1) + 1.

  Done as stack-with-filler, reshape, trim, so only builtins are needed.
  """
  if k == 0 or x.shape[axis] <= 1:
    return x
  shape = x.shape.as_list()
  n = shape[axis]
  filler = u.tflite_int32("BroadcastTo", lambda v: tf.broadcast_to(
      tf.reshape(v, [1] * (len(shape) + 1)), [*shape[:axis], n, k, *shape[axis + 1:]]), value)
  y = u.tflite_int32("ConcatV2", lambda x, f: tf.concat([tf.expand_dims(x, axis + 1), f], axis=axis + 1),
                     x, filler)
  y = tf.reshape(y, [*shape[:axis], n * (k + 1), *shape[axis + 1:]])
  limit = list(y.shape.as_list())
  limit[axis] = (n - 1) * (k + 1) + 1
  return static_slice(y, [0] * len(shape), limit)


def pad(x: tf.Tensor, value: tf.Tensor, config) -> tf.Tensor:
  """``lax.pad``: per dim (low, high, interior); negative low/high remove elements."""
  for axis, (_, _, interior) in enumerate(config):
    x = interior_pad(x, axis, int(interior), value)
  start = [max(0, -int(lo)) for lo, _, _ in config]
  limit = [d - max(0, -int(hi)) for d, (_, hi, _) in zip(x.shape.as_list(), config)]
  x = static_slice(x, start, limit)
  paddings = [[max(0, int(lo)), max(0, int(hi))] for lo, hi, _ in config]
  if any(a or b for a, b in paddings):
    x = u.tflite_int32(("Pad", "PadV2"), lambda x, v: tf.pad(x, paddings, constant_values=v), x, value)
  return x


@register(lax.pad_p, family=_F)
def _pad(ctx, eqn, x, value):
  return pad(x, value, eqn.params["padding_config"])


def iota(dtype, shape, dimension: int) -> tf.Tensor:
  """``out[..., i_dimension, ...] = i_dimension``: a ``Range`` (int32) reshaped and broadcast."""
  shape = [int(d) for d in shape]
  r = tf.range(shape[dimension], dtype=tf.int32)
  r = u.cast(r, dtype) if np.dtype(dtype) != np.bool_ else tf.not_equal(r, 0)
  return broadcast_in_dim(r, shape, [dimension])


@register(lax.iota_p, family=_F)
def _iota(ctx, eqn, *dyn):
  return iota(u.out_dtype(eqn), u.out_shape(eqn), int(eqn.params["dimension"]))

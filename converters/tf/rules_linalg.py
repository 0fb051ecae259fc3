"""Contractions: ``dot_general`` (MatMul / BatchMatMulV2) and ``conv_general_dilated`` (Conv2D)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from jax import lax

from . import _util as u
from .registry import register
from .rules_structural import interior_pad, pad, reshape

_F = "linalg"


def _prod(xs) -> int:
  return int(np.prod([int(x) for x in xs], dtype=np.int64))


@register(lax.dot_general_p, family=_F, tflite="partial",
          note="float32 matmuls are builtins; integer and 16-bit float matmuls are TF-only")
def _dot_general(ctx, eqn, lhs, rhs):
  """``out[b, m, n] = sum_k lhs[b, m, k] * rhs[b, k, n]`` after grouping each side's dims as
  (batch, free, contracting); one ``MatMul`` (no batch dims) or ``BatchMatMulV2``. Two matrices
  in any layout are one ``MatMul`` with ``transpose_a``/``transpose_b`` set as needed."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lc, rc, lb, rb = ([int(d) for d in ds] for ds in (lc, rc, lb, rb))
  dt = u.out_dtype(eqn)
  lhs, rhs = u.cast(lhs, dt), u.cast(rhs, dt)
  ls, rs = lhs.shape.as_list(), rhs.shape.as_list()
  lf = [d for d in range(len(ls)) if d not in lc and d not in lb]
  rf = [d for d in range(len(rs)) if d not in rc and d not in rb]
  if not lb and len(ls) == 2 and len(rs) == 2 and len(lf) == 1 and len(rf) == 1:
    # matrix @ matrix in any layout: MatMul's transpose_a/transpose_b read the operand transposed,
    # with no Transpose op (the gradients of x @ w contract dim 0 of one side, or dim 1 of both).
    return tf.linalg.matmul(lhs, rhs, transpose_a=lc == [0], transpose_b=rc == [1])
  lperm, rperm = lb + lf + lc, rb + rc + rf
  if lperm != list(range(len(ls))):
    lhs = tf.transpose(lhs, lperm)
  if rperm != list(range(len(rs))):
    rhs = tf.transpose(rhs, rperm)
  bsz, m, k, n = _prod(ls[d] for d in lb), _prod(ls[d] for d in lf), _prod(ls[d] for d in lc), \
      _prod(rs[d] for d in rf)
  if lb:
    out = tf.linalg.matmul(reshape(lhs, [bsz, m, k]), reshape(rhs, [bsz, k, n]))
  elif not lf and rf:
    # vector @ matrix (e.g. the gradient of x @ w for a vector w): the TFLite converter folds the
    # reshape [k] -> [1, k] into its BATCH_MATMUL, whose operand 0 must then be 2-D, and fails.
    # As (rhs^T @ lhs)^T the vector is the right operand, the matrix @ vector form it converts.
    out = tf.linalg.matmul(tf.transpose(reshape(rhs, [k, n])), reshape(lhs, [k, 1]))
  else:
    out = tf.linalg.matmul(reshape(lhs, [m, k]), reshape(rhs, [k, n]))
  return reshape(out, u.out_shape(eqn))


@register(lax.conv_general_dilated_p, family=_F,
          note="1 or 2 spatial dims; feature/batch groups as split convolutions")
def _conv(ctx, eqn, lhs, rhs):
  """XLA convolution as VALID ``Conv2D`` in NHWC/HWIO.

  Explicit padding and lhs (base) dilation are applied to the input first (``pad``, zeros inserted),
  rhs (window) dilation goes to ``Conv2D``'s ``dilations`` unless strides are also > 1 (TF's CPU kernel
  refuses both), in which case the kernel itself is dilated with zeros.
  """
  p = eqn.params
  batch_groups = int(p["batch_group_count"])
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  nsp = len(lhs_spec) - 2
  if nsp not in (1, 2):
    raise NotImplementedError(f"convolutions with {nsp} spatial dims")
  dt = u.out_dtype(eqn)
  lhs, rhs = u.cast(lhs, dt), u.cast(rhs, dt)
  lhs = tf.transpose(lhs, [lhs_spec[0], *lhs_spec[2:], lhs_spec[1]])  # N, spatial..., C
  rhs = tf.transpose(rhs, [*rhs_spec[2:], rhs_spec[1], rhs_spec[0]])  # spatial..., I, O
  strides = [int(s) for s in p["window_strides"]]
  rdil = [int(d) for d in p["rhs_dilation"]]
  zero = tf.zeros([], lhs.dtype)
  for i, d in enumerate(p["lhs_dilation"]):
    lhs = interior_pad(lhs, 1 + i, int(d) - 1, zero)
  lhs = pad(lhs, zero, [(0, 0, 0), *[(lo, hi, 0) for lo, hi in p["padding"]], (0, 0, 0)])
  if any(s > 1 for s in strides) and any(d > 1 for d in rdil):
    for i, d in enumerate(rdil):
      rhs = interior_pad(rhs, i, d - 1, zero)
    rdil = [1] * nsp
  if nsp == 1:  # as a 2D convolution of height 1
    lhs, rhs = tf.expand_dims(lhs, 1), tf.expand_dims(rhs, 0)
    strides, rdil = [1, *strides], [1, *rdil]
  groups = int(p["feature_group_count"])

  def conv(x, w):
    return tf.nn.conv2d(x, w, strides=[1, *strides, 1], padding="VALID",
                        dilations=[1, *rdil, 1])

  if groups == 1 and batch_groups == 1:
    out = conv(lhs, rhs)
  elif batch_groups > 1:
    # the kernel gradient of a grouped convolution: batch chunk g meets output-feature chunk g
    xs = tf.split(lhs, batch_groups, axis=0)
    ws = tf.split(rhs, batch_groups, axis=3)
    out = tf.concat([conv(x, w) for x, w in zip(xs, ws)], axis=3)
  else:
    xs = tf.split(lhs, groups, axis=3)
    ws = tf.split(rhs, groups, axis=3)
    out = tf.concat([conv(x, w) for x, w in zip(xs, ws)], axis=3)
  if nsp == 1:
    out = tf.squeeze(out, [1])
  src = [out_spec[0], *out_spec[2:], out_spec[1]]  # output dim held by each axis of `out`
  perm = [int(a) for a in np.argsort(src)]
  return out if perm == sorted(perm) else tf.transpose(out, perm)

"""Reductions, scans along an axis, windowed reductions (pooling and its gradient), sort and top_k."""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf
from jax import lax

from . import _util as u
from .registry import register
from .rules_structural import interior_pad, pad, static_slice

_F = "reductions"


def _axes(eqn) -> list[int]:
  return [int(a) for a in eqn.params["axes"]]


def _reducer(tf_fn, op, bool_fn=None):
  """A rule reducing with ``tf_fn`` (TF op ``op``; sums and products of small ints wrap on narrowing)."""
  def rule(ctx, eqn, x):
    axes = _axes(eqn)
    if not axes:
      return x
    if bool_fn is not None and x.dtype == tf.bool:
      return bool_fn(x, axis=axes)
    return u.tflite_int32(op, lambda x: tf_fn(x, axis=axes), x)
  return rule


register(lax.reduce_sum_p, family=_F)(_reducer(tf.reduce_sum, "Sum"))
register(lax.reduce_max_p, family=_F)(_reducer(tf.reduce_max, "Max", tf.reduce_any))
register(lax.reduce_min_p, family=_F)(_reducer(tf.reduce_min, "Min", tf.reduce_all))
register(lax.reduce_prod_p, family=_F)(_reducer(tf.reduce_prod, "Prod"))
register(lax.reduce_and_p, family=_F)(_reducer(tf.reduce_all, "All"))
register(lax.reduce_or_p, family=_F)(_reducer(tf.reduce_any, "Any"))


def _arg_rule(tf_fn, op):
  def rule(ctx, eqn, x):
    (axis,) = _axes(eqn)
    if x.dtype == tf.bool:
      x = u.from_bool(x, tf.int32)
    index = u.tf_dtype(eqn.params["index_dtype"])
    # the result is an index, not a value of x's type: never narrowed
    return u.tflite_int32(op, lambda x: tf_fn(x, axis=axis, output_type=index), x, narrow=False)
  return rule


_ARG_NOTE = "ties: first index; NaN inputs not matched"
register(lax.argmax_p, family=_F, note=_ARG_NOTE)(_arg_rule(tf.math.argmax, "ArgMax"))
register(lax.argmin_p, family=_F, note=_ARG_NOTE)(_arg_rule(tf.math.argmin, "ArgMin"))


@register(lax.cumsum_p, family=_F)
def _cumsum(ctx, eqn, x):
  axis, rev = int(eqn.params["axis"]), bool(eqn.params["reverse"])
  return u.tflite_int32("Cumsum", lambda x: tf.cumsum(x, axis=axis, reverse=rev), x)


@register(lax.cumprod_p, family=_F, tflite="tf-only")
def _cumprod(ctx, eqn, x):
  return tf.math.cumprod(x, axis=int(eqn.params["axis"]), reverse=bool(eqn.params["reverse"]))


@register(lax.cumlogsumexp_p, family=_F, tflite="tf-only")
def _cumlogsumexp(ctx, eqn, x):
  axis, rev = int(eqn.params["axis"]), bool(eqn.params["reverse"])
  return tf.math.cumulative_logsumexp(x, axis=axis, reverse=rev)


def _lowest(dtype):
  return -np.inf if u.is_float(dtype) else (False if u.is_bool(dtype) else np.iinfo(dtype).min)


def _highest(dtype):
  return np.inf if u.is_float(dtype) else (True if u.is_bool(dtype) else np.iinfo(dtype).max)


def _cum_extremum(x: tf.Tensor, axis: int, reverse: bool, combine, fill) -> tf.Tensor:
  """Running max/min by doubling (Hillis-Steele): after step k each element covers 2**k inputs."""
  return u.tflite_int32(("Maximum", "Minimum", "PadV2", "ReverseV2"),
                        lambda x: _doubling(x, axis, reverse, combine, fill), x)


def _doubling(x: tf.Tensor, axis: int, reverse: bool, combine, fill) -> tf.Tensor:
  n = x.shape[axis]
  if reverse:
    x = tf.reverse(x, [axis])
  shift = 1
  while shift < n:
    paddings = [[0, 0]] * x.shape.rank
    paddings[axis] = [shift, 0]
    shifted = tf.pad(x, paddings, constant_values=tf.constant(fill, x.dtype))
    limit = shifted.shape.as_list()
    limit[axis] = n
    x = combine(x, static_slice(shifted, [0] * x.shape.rank, limit))
    shift *= 2
  return tf.reverse(x, [axis]) if reverse else x


@register(lax.cummax_p, family=_F)
def _cummax(ctx, eqn, x):
  dt = u.out_dtype(eqn)
  return _cum_extremum(x, int(eqn.params["axis"]), bool(eqn.params["reverse"]), tf.maximum,
                       _lowest(dt))


@register(lax.cummin_p, family=_F)
def _cummin(ctx, eqn, x):
  dt = u.out_dtype(eqn)
  return _cum_extremum(x, int(eqn.params["axis"]), bool(eqn.params["reverse"]), tf.minimum,
                       _highest(dt))


# --- windowed reductions -------------------------------------------------------------------------------

def _window_views(x: tf.Tensor, out_shape, window, strides, window_dilation):
  """Yield (offset, view): ``view[i] = x[i * stride + offset * window_dilation]`` for each offset."""
  rank = len(out_shape)
  for offset in itertools.product(*[range(int(w)) for w in window]):
    start = [o * int(d) for o, d in zip(offset, window_dilation)]
    limit = [s + (int(n) - 1) * int(st) + 1 for s, n, st in zip(start, out_shape, strides)]
    yield offset, static_slice(x, start, limit, [int(s) for s in strides]) if rank else x


def _reduce_window(combine, init_of, op):
  def rule(ctx, eqn, x):
    # ``op`` combines the windows' strided slices, padded with PadV2 (and interior_pad's ops)
    return u.tflite_int32((op, "PadV2", "ConcatV2", "BroadcastTo", "StridedSlice", "Slice"),
                          lambda x: windows(eqn, x), x)

  def windows(eqn, x):
    p = eqn.params
    init = tf.constant(init_of(u.out_dtype(eqn)), x.dtype)  # x's type: int32 when widened
    for axis, b in enumerate(p["base_dilation"]):
      x = interior_pad(x, axis, int(b) - 1, init)
    x = pad(x, init, [(lo, hi, 0) for lo, hi in p["padding"]])
    acc = None
    for _, view in _window_views(x, u.out_shape(eqn), p["window_dimensions"], p["window_strides"],
                                 p["window_dilation"]):
      acc = view if acc is None else combine(acc, view)
    return acc
  return rule


register(lax.reduce_window_sum_p, family=_F, note="window sums as strided slices added in window order")(
    _reduce_window(tf.add, lambda dt: 0, "AddV2"))
register(lax.reduce_window_max_p, family=_F)(_reduce_window(tf.maximum, _lowest, "Maximum"))
register(lax.reduce_window_min_p, family=_F)(_reduce_window(tf.minimum, _highest, "Minimum"))


@register(lax.select_and_scatter_add_p, family=_F,
          note="the gradient of max/min pooling; first extremum of each window wins, as XLA")
def _select_and_scatter_add(ctx, eqn, source, operand):
  """Add each ``source[w]`` at the position of window ``w``'s first maximum (``ge``) / minimum (``le``)."""
  p = eqn.params
  select = p["select_prim"]
  # ge/le (what the max/min pooling gradients use): a tie keeps the earlier position. XLA's gt/lt
  # treat ties and padding differently (measured), so they are refused rather than approximated.
  better = {lax.ge_p: tf.greater, lax.le_p: tf.less}.get(select)
  if better is None:
    raise NotImplementedError(f"select_prim {select}")
  dt = u.in_dtype(eqn, 1)
  init = _lowest(dt) if select is lax.ge_p else _highest(dt)
  padding = [(int(lo), int(hi)) for lo, hi in p["padding"]]
  padded = pad(operand, tf.constant(init, operand.dtype), [(lo, hi, 0) for lo, hi in padding])
  strides = [int(s) for s in p["window_strides"]]
  out_shape = source.shape.as_list()
  ones = [1] * len(strides)
  views = list(_window_views(padded, out_shape, p["window_dimensions"], strides, ones))
  best, choice = views[0][1], tf.zeros(out_shape, tf.int32)
  for k, (_, view) in enumerate(views[1:], start=1):
    take = better(view, best)
    best = tf.where(take, view, best)
    choice = tf.where(take, tf.constant(k, tf.int32), choice)
  zero = tf.zeros([], source.dtype)
  total = None
  full = padded.shape.as_list()
  for k, (offset, _) in enumerate(views):
    part = tf.where(tf.equal(choice, k), source, zero)
    cfg = []
    for axis, (o, st) in enumerate(zip(offset, strides)):
      span = (out_shape[axis] - 1) * st + 1
      cfg.append((o, full[axis] - o - span, st - 1))
    part = pad(part, zero, cfg)
    total = part if total is None else total + part
  limit = [d - hi for d, (_, hi) in zip(full, padding)]
  return static_slice(total, [lo for lo, _ in padding], limit)


# --- sorting -------------------------------------------------------------------------------------------

def descending_key(x: tf.Tensor) -> tf.Tensor:
  """A key whose descending order is the ascending order of ``x`` (ties preserved), for ``TopKV2``.

  Floats: ``-x``; int32: ``-1 - x`` (no overflow); uint32: its bits xor 0x7FFFFFFF read as int32.
  """
  if x.dtype == tf.bool:
    x = u.from_bool(x, tf.int32)
  if x.dtype in (tf.float16, tf.bfloat16):
    x = tf.cast(x, tf.float32)
  if x.dtype.is_floating:
    return -x
  if x.dtype in (tf.int8, tf.int16, tf.uint8, tf.uint16):
    x = tf.cast(x, tf.int32)
  if x.dtype in (tf.int32, tf.int64):
    return tf.constant(-1, x.dtype) - x
  if x.dtype == tf.uint32:
    return tf.bitcast(tf.bitwise.bitwise_xor(x, tf.constant(0x7FFFFFFF, tf.uint32)), tf.int32)
  raise NotImplementedError(f"sort keys of type {x.dtype.name}")


def _move_last(x: tf.Tensor, axis: int) -> tf.Tensor:
  rank = x.shape.rank
  if axis == rank - 1:
    return x
  perm = [d for d in range(rank) if d != axis] + [axis]
  return tf.transpose(x, perm)


def _move_back(x: tf.Tensor, axis: int) -> tf.Tensor:
  rank = x.shape.rank
  if axis == rank - 1:
    return x
  perm = list(range(rank - 1))
  perm.insert(axis, rank - 1)
  return tf.transpose(x, perm)


@register(lax.sort_p, family=_F,
          note="one sort key (num_keys=1), stable; NaN keys not ordered as jax")
def _sort(ctx, eqn, *operands):
  """Stable ascending sort along ``dimension`` of all operands by the first: ``TopKV2`` of a key."""
  if int(eqn.params["num_keys"]) != 1:
    raise NotImplementedError("sort with num_keys > 1")
  axis = int(eqn.params["dimension"])
  keys = _move_last(operands[0], axis)
  n = keys.shape[-1]
  _, idx = tf.math.top_k(descending_key(keys), k=n, sorted=True)
  rank = keys.shape.rank
  return [_move_back(tf.gather(_move_last(op, axis), idx, axis=rank - 1, batch_dims=rank - 1), axis)
          for op in operands]


@register(lax.top_k_p, family=_F)
def _top_k(ctx, eqn, x, *rest):
  k = int(eqn.params["k"])
  axis = int(eqn.params.get("axis", -1)) % x.shape.rank
  xs = _move_last(x, axis)
  vals, idx = tf.math.top_k(xs, k=k, sorted=True)
  return [_move_back(vals, axis), _move_back(u.cast(idx, u.out_dtype(eqn, 1)), axis)]

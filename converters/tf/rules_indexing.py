"""Indexing: dynamic_slice / dynamic_update_slice (mini-batching), gather and scatter.

JAX clamps dynamic slice starts so the slice fits; gather/scatter modes clip or fill/drop. Gather and
scatter are lowered through full element coordinates (``GatherNd`` / ``ScatterNd``, both TFLite
builtins), which handles every dimension-number layout, batching dims included.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from jax import lax
from jax.lax import GatherScatterMode

from . import _util as u
from .registry import register
from .rules_structural import broadcast_in_dim

_F = "indexing"


def _clamp_start(s: tf.Tensor, dim: int, size: int) -> tf.Tensor:
  s = tf.cast(s, tf.int32) if s.dtype != tf.int32 else s
  return tf.minimum(tf.maximum(s, 0), dim - size)


@register(lax.dynamic_slice_p, family=_F)
def _dynamic_slice(ctx, eqn, x, *starts):
  """``x[s0:s0+n0, ...]`` with each start clamped to ``[0, dim - n]``."""
  sizes = [int(s) for s in eqn.params["slice_sizes"]]
  shape = x.shape.as_list()
  if sizes == shape:
    return x
  begin = tf.stack([_clamp_start(s, d, n) for s, d, n in zip(starts, shape, sizes)])
  return u.tflite_int32("Slice", lambda x: tf.slice(x, begin, sizes), x)


def update_window(x: tf.Tensor, update: tf.Tensor, starts) -> tf.Tensor:
  """``x`` with the window at (clamped) ``starts`` replaced by ``update``.

  Built from builtins: along each dim the update is gathered to full length
  (``update[clip(i - s, 0, n - 1)]``) and a mask ``s <= i < s + n`` selects it.
  """
  shape = x.shape.as_list()
  mask = None
  full = update
  for axis, (s, d) in enumerate(zip(starts, shape)):
    n = update.shape[axis]
    if n == d:
      continue
    s = _clamp_start(s, d, n)
    pos = tf.range(d, dtype=tf.int32)
    full = tf.gather(full, tf.minimum(tf.maximum(pos - s, 0), n - 1), axis=axis)
    inside = tf.logical_and(tf.greater_equal(pos, s), tf.less(pos, s + n))
    inside = broadcast_in_dim(inside, [d if a == axis else 1 for a in range(len(shape))], [axis])
    mask = inside if mask is None else tf.logical_and(mask, inside)
  if mask is None:
    return update
  return tf.where(mask, full, x)


@register(lax.dynamic_update_slice_p, family=_F)
def _dynamic_update_slice(ctx, eqn, x, update, *starts):
  return u.tflite_int32(("GatherV2", "SelectV2"), lambda x, up: update_window(x, up, starts), x, update)


def _default_fill(dtype):
  dtype = np.dtype(dtype)
  if u.is_float(dtype):
    return np.nan
  if u.is_bool(dtype):
    return True
  return np.iinfo(dtype).min if dtype.kind == "i" else np.iinfo(dtype).max


def _window_start(indices, d, index_map, operand_shape, window, clamp):
  """The start of dim ``d``'s window read from ``indices`` (clamped into the operand when
  ``clamp``) and whether the unclamped window fits in the operand."""
  s = indices[..., index_map.index(d)]
  hi = operand_shape[d] - window[d]
  ok = tf.logical_and(tf.greater_equal(s, 0), tf.less_equal(s, hi))
  if clamp:
    s = tf.minimum(tf.maximum(s, 0), hi)
  return s, ok


def _coordinates(indices, operand_shape, window, index_map, operand_batching, indices_batching,
                 clamp):
  """Element coordinates of every (batch, window) position, and which windows are in bounds.

  ``indices`` has shape ``(*B, len(index_map))``; returns ``coords`` of shape ``(*B, *window, rank)``
  with ``coords[b, w, d] = start_d(b) + w_d`` and ``valid`` of shape ``B``.
  """
  indices = tf.cast(indices, tf.int32) if indices.dtype != tf.int32 else indices
  bshape = indices.shape.as_list()[:-1]
  nb, rank = len(bshape), len(operand_shape)
  target = bshape + list(window)
  if int(np.prod(target, dtype=np.int64)) * rank <= _STATIC_COORDS_MAX:
    return _coordinates_static(indices, operand_shape, window, index_map, operand_batching,
                               indices_batching, clamp)
  valid = None
  comps = []
  for d in range(rank):
    if d in index_map:
      s, ok = _window_start(indices, d, index_map, operand_shape, window, clamp)
      valid = ok if valid is None else tf.logical_and(valid, ok)
    elif d in operand_batching:
      bdim = indices_batching[operand_batching.index(d)]
      s = broadcast_in_dim(tf.range(bshape[bdim], dtype=tf.int32), bshape, [bdim])
    else:
      s = tf.zeros(bshape, tf.int32)
    s = tf.reshape(s, bshape + [1] * rank)
    w = tf.reshape(tf.range(window[d], dtype=tf.int32), [1] * nb + [window[d] if a == d else 1
                                                                  for a in range(rank)])
    comps.append(s + w)
  target = bshape + list(window)
  coords = tf.stack([tf.broadcast_to(c, target) for c in comps], axis=-1)
  if valid is None:
    valid = tf.ones(bshape, tf.bool)
  return coords, valid


# Above this many coordinate elements the known part is built by ops, not stored as a constant.
_STATIC_COORDS_MAX = 1 << 16


def _coordinates_static(indices, operand_shape, window, index_map, operand_batching,
                        indices_batching, clamp):
  """``_coordinates`` with everything known when lowering (batching-dim iotas, window offsets)
  folded into one int32 constant ``K[b, w, d]``; each indexed dim ``d`` adds its (clamped) start
  ``s_d(b)`` times the unit vector ``e_d``: ``coords = K + sum_d s_d e_d`` (exact in int32, as the
  coordinates are array positions)."""
  bshape = indices.shape.as_list()[:-1]
  nb, rank = len(bshape), len(operand_shape)
  target = bshape + list(window)
  known = np.zeros([*target, rank], np.int32)
  for d in range(rank):
    part = np.arange(window[d], dtype=np.int32).reshape(
        [1] * nb + [window[d] if a == d else 1 for a in range(rank)])
    if d in operand_batching:
      bdim = indices_batching[operand_batching.index(d)]
      part = part + np.arange(bshape[bdim], dtype=np.int32).reshape(
          [bshape[bdim] if a == bdim else 1 for a in range(nb)] + [1] * rank)
    known[..., d] = part
  coords = tf.constant(known)
  valid = None
  for d in sorted(index_map):
    s, ok = _window_start(indices, d, index_map, operand_shape, window, clamp)
    valid = ok if valid is None else tf.logical_and(valid, ok)
    s = tf.reshape(s, bshape + [1] * rank + [1])
    if rank > 1:
      s = s * tf.constant(np.eye(rank, dtype=np.int32)[d])
    coords = coords + s
  if valid is None:
    valid = tf.ones(bshape, tf.bool)
  return coords, valid


@register(lax.gather_p, family=_F, note="all dimension numbers and modes (clip, fill, promise)")
def _gather(ctx, eqn, operand, indices):
  """``out[b, o] = operand[start(b) + window(o)]`` via ``GatherNd`` of explicit coordinates."""
  return u.tflite_int32(("GatherNd", "SelectV2", "Transpose"),
                        lambda operand: _gather_windows(eqn, operand, indices), operand)


def _gather_windows(eqn, operand, indices):
  p = eqn.params
  dn = p["dimension_numbers"]
  shape = operand.shape.as_list()
  window = [int(s) for s in p["slice_sizes"]]
  mode = p["mode"]
  fill = mode == GatherScatterMode.FILL_OR_DROP
  coords, valid = _coordinates(indices, shape, window, list(dn.start_index_map),
                               list(dn.operand_batching_dims), list(dn.start_indices_batching_dims),
                               clamp=True)
  g = tf.gather_nd(operand, coords)  # (*B, *window)
  nb = indices.shape.rank - 1
  dropped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  kept = [d for d in range(len(shape)) if d not in dropped]
  bshape = indices.shape.as_list()[:-1]
  g = tf.reshape(g, bshape + [window[d] for d in kept])
  if fill:
    fv = p.get("fill_value")
    fv = _default_fill(u.out_dtype(eqn)) if fv is None else fv
    vmask = tf.reshape(valid, bshape + [1] * len(kept))
    # fill value in g's type: the operand's, or int32 where the gather is done widened
    fv = np.asarray(fv).astype(u.out_dtype(eqn)).astype(g.dtype.as_numpy_dtype)
    g = tf.where(vmask, g, tf.constant(fv))
  # `g` holds batch dims first, then offset dims; put offset dim j at output position offset_dims[j].
  out_rank = nb + len(kept)
  offset_dims = [int(d) for d in dn.offset_dims]
  batch_pos = [d for d in range(out_rank) if d not in offset_dims]
  src = batch_pos + offset_dims
  perm = [int(a) for a in np.argsort(src)]
  return g if perm == list(range(out_rank)) else tf.transpose(g, perm)


def _scatter_parts(eqn, operand, indices, updates):
  """Coordinates ``(N, rank)`` and values ``(N,)`` of every update element, and a keep mask."""
  p = eqn.params
  dn = p["dimension_numbers"]
  shape = operand.shape.as_list()
  uwd = [int(d) for d in dn.update_window_dims]
  inserted = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
  window_operand_dims = [d for d in range(len(shape)) if d not in inserted]
  ushape = updates.shape.as_list()
  window = [1] * len(shape)
  for od, ud in zip(window_operand_dims, uwd):
    window[od] = ushape[ud]
  scatter_dims = [d for d in range(len(ushape)) if d not in uwd]
  perm = scatter_dims + uwd
  upd = updates if perm == list(range(len(ushape))) else tf.transpose(updates, perm)
  bshape = indices.shape.as_list()[:-1]
  upd = tf.reshape(upd, bshape + window)
  clamp = p["mode"] == GatherScatterMode.CLIP or p["mode"] == GatherScatterMode.PROMISE_IN_BOUNDS
  coords, valid = _coordinates(indices, shape, window, list(dn.scatter_dims_to_operand_dims),
                               list(dn.operand_batching_dims),
                               list(dn.scatter_indices_batching_dims), clamp=True)
  if clamp:
    valid = tf.ones_like(valid)
  keep = tf.broadcast_to(tf.reshape(valid, bshape + [1] * len(shape)), bshape + window)
  n = int(np.prod(bshape + window, dtype=np.int64))
  return (tf.reshape(coords, [n, len(shape)]), tf.reshape(upd, [n]), tf.reshape(keep, [n]))


@register(lax.scatter_add_p, family=_F, note="duplicates summed; out-of-bounds dropped")
def _scatter_add(ctx, eqn, operand, indices, updates):
  """``operand + ScatterNd(coords, updates)``: ScatterNd sums duplicate coordinates."""
  return u.tflite_int32(("ScatterNd", "SelectV2", "AddV2", "Transpose"),
                        lambda operand, updates: _scatter_add_parts(eqn, operand, indices, updates),
                        operand, updates)


def _scatter_add_parts(eqn, operand, indices, updates):
  coords, vals, keep = _scatter_parts(eqn, operand, indices, updates)
  vals = tf.where(keep, vals, tf.zeros([], vals.dtype))
  if operand.dtype == tf.bool:
    raise NotImplementedError("scatter-add of booleans")
  return operand + tf.scatter_nd(coords, vals, operand.shape.as_list())


@register(lax.scatter_p, family=_F, note="unique indices (as x.at[i].set with distinct i)")
def _scatter(ctx, eqn, operand, indices, updates):
  """Overwrite: positions hit by some update take the (summed) update, the rest keep ``operand``."""
  return u.tflite_int32(("ScatterNd", "SelectV2", "Transpose"),
                        lambda operand, updates: _scatter_over(eqn, operand, indices, updates),
                        operand, updates)


def _scatter_over(eqn, operand, indices, updates):
  coords, vals, keep = _scatter_parts(eqn, operand, indices, updates)
  shape = operand.shape.as_list()
  hits = tf.scatter_nd(coords, u.from_bool(keep, tf.int32), shape)
  as_num = tf.int32 if operand.dtype == tf.bool else operand.dtype
  written = tf.scatter_nd(coords, tf.where(keep, u.cast(vals, as_num), tf.zeros([], as_num)), shape)
  if operand.dtype == tf.bool:
    written = tf.not_equal(written, 0)
  return tf.where(tf.greater(hits, 0), written, operand)

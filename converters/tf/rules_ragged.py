"""A client's own examples (``fb.ragged``, docs/ragged.md): ``faxbridge_batches`` and
``faxbridge_fold`` on a leading dimension that TF does not know.

The design (issue 19, the TF-family targets): in a client piece a ragged leaf (its form
``Binding`` has a ``RaggedSpec``) is a tensor whose leading dimension is unknown, TF shape
``[None, ...]``: the client's own number of examples. The same graph (one ``.tflite`` file, whose
input LiteRT resizes per client; one TFF computation, whose ragged leaves are
``TensorType(dtype, [None, ...])``) then serves clients of every size, with no export per size.
The client's count stays an ordinary int32 CLIENTS input. :func:`input_shape` is where a target
gives a ragged leaf that unknown dimension.

The jaxpr was traced at a padded length ``L``: ``faxbridge_batches``'s outputs say ``[L / b, b, ...]``
and a fold's items ``[L, ...]``. Only these two primitives read a ragged leaf (``fb.export`` checks
it: ``check_padding_unread``), so the unknown dimension stops here: the fold's carry, and so every
other value of the piece, has the shapes of the jaxpr. Both rules also lower a jaxpr whose leading
dimension is static (a fold over data the user padded).

* ``faxbridge_batches[batch_size=b]``: ``(*leaves [m, ...], count) -> (*batches [ceil(m / b), b,
  ...], mask bool[ceil(m / b), b], ceil(clip(count, 0, m) / b))``: the rows are padded with zero rows
  to a multiple of ``b`` (a client's own ``m`` need not be one), rows past the count are zeros, the
  mask marks the real ones (``RANGE``, ``LESS``, ``GATHER``, ``SELECT_V2``, ``RESHAPE`` in TFLite).
* ``faxbridge_fold[jaxpr, num_consts, num_carry]``: ``(consts, init, count, items) -> carry``: a
  ``While`` of ``n = clip(count, 0, len(items))`` steps whose step ``j`` reads item ``j`` (a
  ``GATHER`` of row ``j``: static shapes inside the loop) and runs the step jaxpr on the carry. An
  empty client (``n = 0``) returns ``init``; no step reads a row at or past ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from faxbridge.extend import batches_p, fold_p

from . import _util as u
from .registry import register

_F = "ragged"


def input_shape(shape: Sequence[int], ragged: bool) -> list[int | None]:
  """The TF shape of a piece input of (traced) ``shape``: for a ragged leaf (a client's own
  examples) the leading dimension is unknown, ``[None, *shape[1:]]``; else ``shape`` itself.

  Every TF-family target builds its input signatures through this (the ``.tflite`` signature,
  the TFF placeholders and types), so one artifact serves clients of every size."""
  dims: list[int | None] = [int(d) for d in shape]
  return [None, *dims[1:]] if ragged and dims else dims


def _rows(x: tf.Tensor) -> int | tf.Tensor:
  """The leading dimension of ``x``: a Python int when TF knows it, else an int32 scalar tensor."""
  known = x.shape[0]
  return int(known) if known is not None else tf.shape(x, out_type=tf.int32)[0]


def _clip(count: tf.Tensor, rows: int | tf.Tensor) -> tf.Tensor:
  """``clip(count, 0, rows)`` as int32 (``MAXIMUM``, ``MINIMUM``)."""
  return tf.minimum(tf.maximum(tf.cast(count, tf.int32), 0), rows)


def _zero_rows(x: tf.Tensor, real: tf.Tensor) -> tf.Tensor:
  """``x`` with the rows where ``real`` (``bool[rows]``) is False set to zero."""
  keep = tf.reshape(real, [-1] + [1] * (x.shape.rank - 1))
  return u.tflite_int32("SelectV2", lambda x: tf.where(keep, x, tf.zeros([], x.dtype)), x)


@register(batches_p, family=_F, note="a client's own number of examples (unknown in TF) in batches "
          "of b: padded with zero rows to a multiple of b, zeros past the count")
def _batches(ctx, eqn, *args):
  """``(*leaves [m, ...], count) -> (*batches [ceil(m/b), b, ...], mask, num_batches)``."""
  *leaves, count = args
  b = int(eqn.params["batch_size"])
  m = _rows(leaves[0])
  n = _clip(count, m)
  if isinstance(m, int):  # traced at its length: L is a multiple of b (batches_p checks it)
    num, padded = m // b, m
  else:
    num = (m + (b - 1)) // b
    padded = num * b
  rows = tf.range(padded, dtype=tf.int32)
  real = tf.less(rows, n)
  # Unknown m: rows m .. padded-1 repeat row m - 1 (a gather of min(row, m - 1)); the select below
  # zeroes them with the rest past the count. With m = 0 there is no row at all (padded = 0).
  source = None if isinstance(m, int) else tf.minimum(rows, m - 1)
  out = []
  for x in leaves:
    if source is not None:
      x = u.tflite_int32("GatherV2", lambda x: tf.gather(x, source), x)
    x = _zero_rows(x, real)
    out.append(tf.reshape(x, [num if isinstance(num, int) else -1, b, *x.shape[1:]]))
  mask = tf.reshape(real, [num if isinstance(num, int) else -1, b])
  return [*out, mask, (n + (b - 1)) // b]


@register(fold_p, family=_F, note="one While of clip(count, 0, rows) steps over the rows; an "
          "empty client returns init")
def _fold(ctx, eqn, *args):
  """``step(... step(step(init, x_0), x_1) ..., x_{n-1})``, ``n = clip(count, 0, len(items))``."""
  p = eqn.params
  nc, nk = int(p["num_consts"]), int(p["num_carry"])
  consts, init = list(args[:nc]), list(args[nc:nc + nk])
  count, items = args[nc + nk], list(args[nc + nk + 1:])
  n = _clip(count, _rows(items[0]))
  step = p["jaxpr"]

  def cond_fn(j, *carry):
    return tf.less(j, n)

  def body_fn(j, *carry):
    item = [u.tflite_int32("GatherV2", lambda x: tf.gather(x, j), x) for x in items]
    new = ctx.lower_closed(step, consts + list(carry) + item)
    return (j + 1, *(u.cast(c, old.dtype) for c, old in zip(new, carry)))

  outs = tf.while_loop(cond_fn, body_fn, loop_vars=(tf.constant(0, tf.int32), *init))
  return list(outs)[1:]

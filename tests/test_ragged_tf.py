"""Clients with their own data sizes on the TF-family targets (issue 19): the TF rules of
``faxbridge_batches`` and ``faxbridge_fold`` (converters/tf/rules_ragged.py) on a leading dimension
TF does not know.

Independent answers: numpy written without faxbridge, looping over each client's own examples only
(no padding anywhere). Floats within 1e-6 + 1e-5 * |ref|, integers and bools exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from tf_programs import assert_close

import faxbridge as fb
import faxbridge.converters.tf as fbtf
from faxbridge.extend import batches_p

SIZES = [1, 3, 17, 250, 0]  # the sizes and an empty client
D = 3  # features per example
RNG = np.random.default_rng(1919)


def _run_graph(graph: tf.Graph, feeds: dict[str, np.ndarray], fetches: list[str]) -> list:
  with tf.compat.v1.Session(graph=graph) as sess:
    return sess.run([f"{n}:0" for n in fetches], {f"{n}:0": v for n, v in feeds.items()})


# -- the rules, one quick test each ----------------------------------------------------------------
def numpy_batches(x: np.ndarray, count: int, b: int):
  """A client's rows in batches of ``b``: padded with zero rows to a multiple of ``b``, the rows
  at or past ``count`` zero, the mask of the real ones, and the number of batches holding one."""
  m = len(x)
  n = min(max(count, 0), m)
  num = -(-m // b)
  padded = np.zeros((num * b, *x.shape[1:]), x.dtype)
  padded[:n] = x[:n]
  mask = np.arange(num * b) < n
  return padded.reshape(num, b, *x.shape[1:]), mask.reshape(num, b), -(-n // b)


def test_batches_rule_takes_any_number_of_rows():
  """One graph, traced at 8 rows, run on 0 to 250 rows: not all of them a multiple of the batch,
  the count below, at and above the rows (clipped)."""
  b = 4
  closed = jax.make_jaxpr(lambda x, y, c: batches_p.bind(x, y, c, batch_size=b))(
      np.zeros((8, D), np.float32), np.zeros(8, np.int32), np.int32(0))
  graph = fbtf.lower_jaxpr(closed, ["x", "y", "c"], ["bx", "by", "mask", "num"], ragged=["x", "y"])
  assert graph.get_tensor_by_name("x:0").shape.as_list() == [None, D]
  assert graph.get_tensor_by_name("bx:0").shape.as_list() == [None, b, D]
  for m, count in [(0, 0), (1, 1), (3, 3), (5, 2), (17, 17), (250, 250), (6, 9), (4, -1)]:
    x = RNG.normal(size=(m, D)).astype(np.float32)
    y = RNG.integers(-9, 9, size=m).astype(np.int32)
    got = _run_graph(graph, {"x": x, "y": y, "c": np.int32(count)}, ["bx", "by", "mask", "num"])
    want_x, mask, num = numpy_batches(x, count, b)
    want_y, _, _ = numpy_batches(y, count, b)
    for g, w in zip(got, [want_x, want_y, mask, np.int32(num)]):
      assert np.shape(g) == np.shape(w) and np.asarray(g).dtype == np.asarray(w).dtype, (m, count)
      np.testing.assert_array_equal(g, w, err_msg=f"{m} rows, count {count}")


def test_fold_rule_runs_the_count_of_steps_over_any_number_of_rows():
  """The step (with a value of the enclosing function, ``w``) runs on rows 0 .. count-1 of a
  leading dimension TF does not know; an empty client's result is the init."""

  def program(w, x, count):
    return fb.fold(lambda h, e: 0.5 * h + jnp.tanh(w * e), jnp.ones(D), fb.Ragged(x, count))

  w = RNG.normal(size=D).astype(np.float32)
  closed = jax.make_jaxpr(program)(w, np.zeros((8, D), np.float32), np.int32(0))
  graph = fbtf.lower_jaxpr(closed, ["w", "x", "c"], ["h"], ragged=["x"])
  for m, count in [(0, 0), (1, 1), (3, 3), (17, 17), (250, 250), (5, 2), (4, 7)]:
    x = RNG.normal(size=(m, D)).astype(np.float32)
    h = np.ones(D, np.float64)
    for e in x[: min(count, m)].astype(np.float64):
      h = 0.5 * h + np.tanh(w * e)
    (got,) = _run_graph(graph, {"w": w, "x": x, "c": np.int32(count)}, ["h"])
    assert_close(got, h.astype(np.float32), what=f"{m} rows, count {count}")

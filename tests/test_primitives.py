"""Each federated operation's value, shape and dtype on pytrees, against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import faxbridge as fb
from faxbridge._src import aggregations as A
from faxbridge._src import primitives as P

FLOATS = (np.float32,)
INTS = (np.int32, np.int16, np.uint8, np.int8)


def _leaf(rng, shape, dtype, high=None):
  if np.issubdtype(dtype, np.integer):
    return rng.integers(0, high or 5, size=shape).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


@st.composite
def trees(draw, dtypes=FLOATS, clients=True, high=None):
  """``(n, tree)``: a pytree of 1-3 arrays; CLIENTS trees carry a leading axis of size n."""
  n = draw(st.integers(1, 5))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  shapes = draw(st.lists(st.lists(st.integers(1, 3), max_size=2), min_size=3, max_size=3))
  types = draw(st.lists(st.sampled_from(dtypes), min_size=3, max_size=3))
  lead = (n,) if clients else ()
  a, b, c = (_leaf(rng, (*lead, *s), t, high) for s, t in zip(shapes, types))
  kind = draw(st.sampled_from(["array", "dict", "nested"]))
  tree = {"array": a, "dict": {"w": a, "b": b}, "nested": {"w": a, "rest": (b, [c])}}[kind]
  return n, tree


def _run(fn, placements, *args, clients=None):
  return fb.computation(fn, in_placements=placements, clients=clients)(*args)


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == np.shape(w), (g.shape, np.shape(w))
    assert g.dtype == np.asarray(w).dtype, (g.dtype, np.asarray(w).dtype)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol, atol)


# -- broadcast and map -----------------------------------------------------------------------------
@given(trees(dtypes=FLOATS + INTS, clients=False), st.integers(1, 4))
def test_broadcast_stacks_the_server_value_once_per_client(case, n):
  _, tree = case
  got = _run(fb.broadcast, (fb.SERVER,), tree, clients=n)
  _assert_tree_close(got, jax.tree.map(lambda v: np.stack([v] * n), tree))


@given(trees(dtypes=FLOATS + INTS))
def test_map_applies_the_function_to_each_clients_slice(case):
  n, tree = case

  def per_client(scale, t):  # a different output structure than the input's
    leaves = jax.tree.leaves(t)
    return {"scaled": jax.tree.map(lambda v: v * scale, t), "first": jnp.sum(leaves[0])}

  got = _run(
      lambda s, t: fb.map(per_client, fb.broadcast(s), t), (fb.SERVER, fb.CLIENTS),
      np.float32(3.0), tree,
  )
  rows = [per_client(np.float32(3.0), jax.tree.map(lambda v, i=i: v[i], tree)) for i in range(n)]
  want = jax.tree.map(lambda *vs: np.stack([np.asarray(v) for v in vs]), *rows)
  _assert_tree_close(got, want)


def test_map_outputs_keep_the_clients_axis_and_per_client_dtypes():
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  got = _run(
      lambda x: fb.map(lambda v: (v.astype(jnp.int32), jnp.sum(v), v > 4), x), (fb.CLIENTS,), x
  )
  assert [(g.shape, g.dtype) for g in got] == [
      ((4, 3), jnp.int32), ((4,), jnp.float32), ((4, 3), jnp.bool_),
  ]
  np.testing.assert_array_equal(got[1], x.sum(axis=1))
  np.testing.assert_array_equal(got[2], x > 4)


# -- aggregations ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op, reference",
    [
        (fb.sum, lambda v: np.sum(v, axis=0, dtype=v.dtype)),
        (fb.max, lambda v: np.max(v, axis=0)),
        (fb.min, lambda v: np.min(v, axis=0)),
    ],
    ids=["sum", "max", "min"],
)
@given(case=trees(dtypes=FLOATS + INTS))
def test_sum_max_min_reduce_over_clients_keeping_dtype(op, reference, case):
  _, tree = case
  got = _run(op, (fb.CLIENTS,), tree)
  _assert_tree_close(got, jax.tree.map(reference, tree))


@given(trees())
def test_mean(case):
  _, tree = case
  got = _run(fb.mean, (fb.CLIENTS,), tree)
  _assert_tree_close(got, jax.tree.map(lambda v: np.mean(v, axis=0, dtype=np.float64)
                                       .astype(v.dtype), tree))


@pytest.mark.parametrize("weight_dtype", [np.float32, np.int32])
@given(case=trees(), seed=st.integers(0, 2**16))
def test_weighted_mean_with_float_and_int_weights(weight_dtype, case, seed):
  n, tree = case
  weight = np.random.default_rng(seed).integers(1, 10, size=n).astype(weight_dtype)

  def reference(v):
    w = weight.astype(np.float64).reshape((n,) + (1,) * (v.ndim - 1))
    return (np.sum(w * v, axis=0) / np.sum(w)).astype(v.dtype)

  got = _run(fb.weighted_mean, (fb.CLIENTS, fb.CLIENTS), tree, weight)
  _assert_tree_close(got, jax.tree.map(reference, tree))


def test_weighted_mean_zero_weight_ignores_a_client():
  x = np.array([[1.0, 2.0], [100.0, -100.0], [3.0, 4.0]], np.float32)
  got = _run(fb.weighted_mean, (fb.CLIENTS, fb.CLIENTS), x, np.array([1.0, 0.0, 3.0], np.float32))
  np.testing.assert_allclose(got, [2.5, 3.5])


@given(trees(dtypes=(np.int32, np.uint8, np.uint16), high=16), st.sampled_from([2, 4, 16]))
def test_secure_sum_of_integers(case, bitwidth):
  _, tree = case
  tree = jax.tree.map(lambda v: v % (2**bitwidth), tree)  # the contract: values in [0, 2**b)
  got = _run(lambda t: fb.secure_sum(t, bitwidth=bitwidth), (fb.CLIENTS,), tree)
  want = jax.tree.map(lambda v: np.sum(v, axis=0, dtype=jnp.asarray(v).dtype), tree)
  _assert_tree_close(got, want)


def test_secure_sum_histogram_and_range_of_the_analytics_example():
  from examples import analytics

  levels, values = analytics.example_inputs()
  got = analytics.computation(levels, values)
  assert got["histogram"].dtype == jnp.int32
  # The pooled data: every client's real values [i, :count[i]] (the padding is no one's).
  count = np.asarray(values.count)
  assert len(set(count.tolist())) > 1  # clients of different sizes
  pooled = np.concatenate([np.asarray(values.examples)[i, :n] for i, n in enumerate(count)])
  edges = np.linspace(analytics.LO, analytics.HI, analytics.BINS + 1)
  assert pooled.min() > analytics.LO and pooled.max() < analytics.HI  # no value clipped to an edge
  np.testing.assert_array_equal(got["histogram"], np.histogram(pooled, bins=edges)[0])
  np.testing.assert_allclose(got["mean"], pooled.mean(), rtol=1e-5)
  assert float(got["max"]) == pooled.max() and float(got["min"]) == pooled.min()
  # Each quantile estimate is within one bin of the pooled values' quantile.
  np.testing.assert_allclose(got["quantiles"], np.quantile(pooled, levels),
                             atol=(analytics.HI - analytics.LO) / analytics.BINS)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, jnp.bfloat16, np.float16])
def test_sum_of_narrow_dtypes_keeps_the_dtype(dtype):
  x = (np.arange(12).reshape(4, 3) % 5).astype(dtype)
  for op in (fb.sum, fb.max, fb.min):
    got = _run(op, (fb.CLIENTS,), x)
    assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(_run(fb.sum, (fb.CLIENTS,), x), np.float64),
                                np.asarray(x, np.float64).sum(0))


# -- refusals at trace time ------------------------------------------------------------------------
def test_aggregations_refuse_the_wrong_kind_of_value():
  ints = np.ones((3, 2), np.int32)
  with pytest.raises(TypeError, match="averages floating values"):
    _run(fb.mean, (fb.CLIENTS,), ints)
  with pytest.raises(TypeError, match="averages floating values"):
    _run(fb.weighted_mean, (fb.CLIENTS, fb.CLIENTS), ints, np.ones(3, np.float32))
  with pytest.raises(TypeError, match="sums integers"):
    _run(lambda x: fb.secure_sum(x, bitwidth=8), (fb.CLIENTS,), ints.astype(np.float32))
  with pytest.raises(TypeError, match="adds numbers, got bool"):
    _run(fb.sum, (fb.CLIENTS,), ints > 0)
  for bad in (0, 63, 8.0):
    with pytest.raises(fb.TraceError, match=r"bitwidth must be a Python int in \[1, 62\]"):
      _run(lambda x, b=bad: fb.secure_sum(x, bitwidth=b), (fb.CLIENTS,), ints)
  with pytest.raises(fb.PlacementError, match=r"one scalar per client, shape \(3,\)"):
    _run(fb.weighted_mean, (fb.CLIENTS, fb.CLIENTS), ints.astype(np.float32), np.ones((3, 2)))


def test_broadcast_needs_a_number_of_clients():
  with pytest.raises(fb.PlacementError, match="pass clients=n"):
    _run(fb.broadcast, (fb.SERVER,), np.float32(1))


# -- the primitives themselves ---------------------------------------------------------------------
def test_primitives_evaluate_eagerly_and_abstractly():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(P.broadcast_p.bind(x[0], clients=4), np.stack([x[0]] * 4))
  np.testing.assert_array_equal(A.sum_p.bind(x), x.sum(0))
  np.testing.assert_allclose(A.mean_p.bind(x), x.mean(0))
  np.testing.assert_array_equal(A.max_p.bind(x), x.max(0))
  np.testing.assert_array_equal(A.min_p.bind(x), x.min(0))
  np.testing.assert_array_equal(A.secure_sum_p.bind(x.astype(np.int32), bitwidth=4), [6, 9])
  w = np.array([1.0, 2.0, 5.0], np.float32)
  np.testing.assert_allclose(A.weighted_mean_p.bind(x, w), (w[:, None] * x).sum(0) / w.sum())
  spec = jax.ShapeDtypeStruct((3, 2), jnp.float32)
  for prim in A.AGGREGATIONS:
    args = (spec, jax.ShapeDtypeStruct((3,), jnp.float32)) if prim is A.weighted_mean_p else (spec,)
    params = {"bitwidth": 8} if prim is A.secure_sum_p else {}
    out = jax.eval_shape(lambda *a, p=prim, kw=params: p.bind(*a, **kw), *args)
    assert (out.shape, out.dtype) == ((2,), jnp.float32), prim
  out = jax.eval_shape(lambda v: P.broadcast_p.bind(v, clients=5), spec)
  assert (out.shape, out.dtype) == ((5, 3, 2), jnp.float32)
  with pytest.raises(TypeError, match="does not fit"):
    jax.eval_shape(A.weighted_mean_p.bind, spec, jax.ShapeDtypeStruct((3,), jnp.float16))


def test_map_primitive_runs_its_per_client_jaxpr():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  (out,) = P.bind_map(lambda v: [jnp.dot(v, v)], x)
  np.testing.assert_allclose(out, (x * x).sum(1))
  jitted = jax.jit(lambda v: P.bind_map(lambda r: [r * 2.0, r.sum()], v))(x)
  np.testing.assert_allclose(jitted[0], x * 2)
  np.testing.assert_allclose(jitted[1], x.sum(1))

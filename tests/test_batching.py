"""jax.vmap (batches of independent simulations), jax.jit and jax.eval_shape over computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import faxbridge as fb

N, D = 4, 3


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def program(s, x, w):
  """Every operation, with SERVER and CLIENTS outputs."""
  y = fb.map(lambda a, b: jnp.sin(a * b) + a, fb.broadcast(s), x)
  counts = fb.map(lambda b: (b > 0).astype(jnp.int32).sum(), x)
  return {
      "wmean": fb.weighted_mean(y, w), "mean": fb.mean(y), "sum": fb.sum(y), "max": fb.max(y),
      "min": fb.min(y), "count": fb.secure_sum(counts, bitwidth=8), "y": y,
  }


def reference(s, x, w):
  """The same math in plain JAX: client axis 0, reductions over it."""
  y = jnp.sin(s * x) + s
  return {
      "wmean": jnp.sum(w[:, None] * y, 0) / jnp.sum(w), "mean": y.mean(0), "sum": y.sum(0),
      "max": y.max(0), "min": y.min(0), "count": jnp.sum(x > 0).astype(jnp.int32), "y": y,
  }


def _close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape, g.dtype, r.dtype)
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _with_axis(rng, shape, axis, size, positive=False):
  if axis is not None:
    shape = (*shape[:axis], size, *shape[axis:])
  return rng.uniform(0.5, 2.0, shape).astype(np.float32) if positive else (
      rng.normal(size=shape).astype(np.float32))


# in_axes per argument: s is (D,), x is (N, D), w is (N,)
AXES = st.tuples(st.sampled_from([None, 0, 1]), st.sampled_from([None, 0, 1, 2]),
                 st.sampled_from([None, 0, 1]))


@settings(max_examples=6)
@given(AXES, st.integers(0, 2**16))
def test_vmap_with_any_in_axes_equals_plain_jax(in_axes, seed):
  if in_axes == (None, None, None):
    in_axes = (0, None, None)
  rng = np.random.default_rng(seed)
  b = 2
  args = (_with_axis(rng, (D,), in_axes[0], b), _with_axis(rng, (N, D), in_axes[1], b),
          _with_axis(rng, (N,), in_axes[2], b, positive=True))
  _close(jax.vmap(program, in_axes=in_axes)(*args), jax.vmap(reference, in_axes=in_axes)(*args))


@pytest.mark.slow  # the quick suite keeps the nested regression below and any in_axes above
@settings(max_examples=4)
@given(AXES, AXES, st.integers(0, 2**16))
def test_nested_vmap_equals_plain_jax(inner, outer, seed):
  inner = (0, None, None) if inner == (None, None, None) else inner
  outer = (None, 0, None) if outer == (None, None, None) else outer
  rng = np.random.default_rng(seed)
  shapes = [(D,), (N, D), (N,)]
  args = []
  for shape, i, o in zip(shapes, inner, outer):
    arr = _with_axis(rng, shape, i, 2, positive=len(shape) == 1 and shape[0] == N)
    if o is not None:
      o = min(o, arr.ndim)
      arr = np.stack([arr, arr * 0.5 + 0.25], axis=o)
    args.append(arr)
  outer = tuple(None if o is None else min(o, a.ndim - 1) for o, a in zip(outer, args))
  got = jax.vmap(jax.vmap(program, in_axes=inner), in_axes=outer)(*args)
  want = jax.vmap(jax.vmap(reference, in_axes=inner), in_axes=outer)(*args)
  _close(got, want)


def test_nested_vmap_weights_batched_inside_values_batched_outside():
  # Regression: the outer batching rule saw a weight carrying only the inner batch axis.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(5, N, D)).astype(np.float32)  # outer batch of 5 value sets
  w = rng.uniform(0.5, 2.0, size=(2, N)).astype(np.float32)  # inner batch of 2 weightings
  comp = fb.computation(fb.weighted_mean, in_placements=(fb.CLIENTS, fb.CLIENTS))
  ref = lambda x, w: jnp.sum(w[:, None] * x, 0) / jnp.sum(w)
  batched = lambda f: jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))
  got = batched(comp)(x, w)
  assert got.shape == (5, 2, D)
  np.testing.assert_allclose(got, batched(ref)(x, w), rtol=1e-5, atol=1e-6)


def test_vmap_over_the_weight_of_weighted_mean():
  x = np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)
  weights = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 2, 6]], np.float32)  # 3 weightings
  comp = fb.computation(fb.weighted_mean, in_placements=(fb.CLIENTS, fb.CLIENTS))
  got = jax.vmap(comp, in_axes=(None, 0))(x, weights)
  np.testing.assert_allclose(got[0], x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(got[1], x[0], rtol=1e-6)
  np.testing.assert_allclose(got[2], (2 * x[2] + 6 * x[3]) / 8, rtol=1e-6)
  # Weights batched along their own second axis too (in_axes=1 of a (N, 3) array).
  np.testing.assert_allclose(jax.vmap(comp, in_axes=(None, 1))(x, weights.T), got, rtol=1e-6)


def test_vmap_of_a_fedsgd_round_is_a_batch_of_independent_simulations():
  from examples import _mlp, fedsgd

  params, data = fedsgd.example_inputs(clients=3)
  starts = jax.tree.map(lambda *p: np.stack(p), params, _mlp.init_params(seed=7))
  # FedSGD with the clients' counts as weights is one step on the pooled examples: the mean loss
  # over every client's real rows [i, :count[i]], concatenated (no fold, no mask, no weights).
  count = np.asarray(data.count)
  pooled = {k: np.concatenate([np.asarray(v)[i, :n] for i, n in enumerate(count)])
            for k, v in data.examples.items()}

  @jax.jit
  def reference(p):
    loss, grad = jax.value_and_grad(_mlp.loss)(p, pooled)
    return jax.tree.map(lambda w, g: w - fedsgd.SERVER_LR * g, p, grad), loss

  got = jax.vmap(fedsgd.computation, in_axes=(0, None))(starts, data)
  want = jax.vmap(reference)(starts)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
  assert not np.allclose(got[1][0], got[1][1])  # two different simulations


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def small(s, x, w):
  y = fb.map(lambda a, b: jnp.sin(a * b), fb.broadcast(s), x)
  return jnp.sum(fb.weighted_mean(y, w) * fb.max(y))


def small_reference(s, x, w):
  y = jnp.sin(s * x)
  return jnp.sum(jnp.sum(w[:, None] * y, 0) / jnp.sum(w) * y.max(0))


def test_jit_grad_and_vmap_compose():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(D,)).astype(np.float32)
  x = rng.normal(size=(N, D)).astype(np.float32)
  w = rng.uniform(1, 2, size=(N,)).astype(np.float32)
  _close(jax.jit(program)(s, x, w), reference(s, x, w))

  ss = np.stack([s, 2 * s])
  per_sim = lambda f: jax.vmap(jax.grad(f, argnums=(0, 2)), in_axes=(0, None, None))
  for g, r in zip(jax.jit(per_sim(small))(ss, x, w), jax.jit(per_sim(small_reference))(ss, x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  of_batch = lambda f: jax.grad(lambda ss: jnp.sum(jax.vmap(f, in_axes=(0, None, None))(ss, x, w)))
  np.testing.assert_allclose(jax.jit(of_batch(small))(ss), jax.jit(of_batch(small_reference))(ss),
                             rtol=1e-4, atol=1e-5)


def test_eval_shape_over_a_computation():
  specs = (jax.ShapeDtypeStruct((D,), jnp.float32), jax.ShapeDtypeStruct((7, D), jnp.float32),
           jax.ShapeDtypeStruct((7,), jnp.float32))
  out = jax.eval_shape(program, *specs)
  shapes = {k: (v.shape, v.dtype) for k, v in out.items()}
  assert shapes == {
      "wmean": ((D,), jnp.float32), "mean": ((D,), jnp.float32), "sum": ((D,), jnp.float32),
      "max": ((D,), jnp.float32), "min": ((D,), jnp.float32), "count": ((), jnp.int32),
      "y": ((7, D), jnp.float32),
  }
  batched = jax.eval_shape(jax.vmap(program, in_axes=(0, None, None)),
                           jax.ShapeDtypeStruct((5, D), jnp.float32), *specs[1:])
  assert batched["y"].shape == (5, 7, D) and batched["count"].shape == (5,)

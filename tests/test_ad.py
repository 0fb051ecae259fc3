"""Federated AD: transpose rules, JVPs, gradients against plain JAX, and placements that survive
differentiation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jcore
from jax.test_util import check_grads

import faxbridge as fb
from faxbridge._src import aggregations as A
from faxbridge._src import primitives as P

N = 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(N, 3)).astype(np.float32)
W = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
S = np.float32(0.7)
FEDERATED = {p.name for p in (P.broadcast_p, P.map_p, *A.AGGREGATIONS)}


def all_eqns(jaxpr: jcore.Jaxpr):
  """Every equation of ``jaxpr`` and, recursively, of the jaxprs in its equations' params."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from all_eqns(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from all_eqns(sub)


def prim_names(fn, *args) -> list[str]:
  return [e.primitive.name for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)]


# -- transpose rules -------------------------------------------------------------------------------
def test_transpose_of_broadcast_is_sum():
  bcast = fb.computation(fb.broadcast, clients=N, in_placements=(fb.SERVER,))
  transpose = jax.linear_transpose(bcast, X[0])
  (got,) = transpose(X)
  np.testing.assert_allclose(got, X.sum(0), rtol=1e-6)
  names = prim_names(transpose, X)
  assert "faxbridge_sum" in names and "faxbridge_broadcast" not in names and "reduce_sum" not in names


def test_transpose_of_sum_is_broadcast():
  total = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
  transpose = jax.linear_transpose(total, X)
  (got,) = transpose(X[0])
  np.testing.assert_array_equal(got, np.stack([X[0]] * N))
  names = prim_names(transpose, X[0])
  assert "faxbridge_broadcast" in names and "faxbridge_sum" not in names and "broadcast_in_dim" not in names


def test_transpose_of_mean_is_broadcast_over_n():
  mean = fb.computation(fb.mean, in_placements=(fb.CLIENTS,))
  transpose = jax.linear_transpose(mean, X)
  (got,) = transpose(X[0])
  np.testing.assert_allclose(got, np.stack([X[0] / N] * N), rtol=1e-6)
  # The division happens on the server, before the broadcast: div(ct, n) feeds broadcast.
  eqns = list(all_eqns(jax.make_jaxpr(transpose)(X[0]).jaxpr))
  (bcast,) = [e for e in eqns if e.primitive.name == "faxbridge_broadcast"]
  (div,) = [e for e in eqns if e.primitive.name == "div"]
  assert bcast.invars[0] is div.outvars[0]
  assert bcast.params["clients"] == N
  assert float(div.invars[1].val) == N


def test_transpose_at_the_primitive_level():
  spec = jax.ShapeDtypeStruct((N, 3), jnp.float32)
  (got,) = jax.linear_transpose(lambda v: A.sum_p.bind(v), spec)(X[0])
  np.testing.assert_array_equal(got, np.broadcast_to(X[0], (N, 3)))
  (got,) = jax.linear_transpose(lambda v: A.mean_p.bind(v), spec)(X[0])
  np.testing.assert_allclose(got, np.broadcast_to(X[0] / N, (N, 3)))
  (got,) = jax.linear_transpose(lambda v: P.broadcast_p.bind(v, clients=N), X[0])(X)
  np.testing.assert_allclose(got, X.sum(0), rtol=1e-6)


def test_transpose_of_a_linear_map_is_the_per_client_transpose():
  a = RNG.normal(size=(3, 2)).astype(np.float32)
  linear = fb.computation(lambda v: fb.map(lambda r: r @ a, v), in_placements=(fb.CLIENTS,))
  ct = RNG.normal(size=(N, 2)).astype(np.float32)
  (got,) = jax.linear_transpose(linear, X)(ct)
  np.testing.assert_allclose(got, ct @ a.T, rtol=1e-5, atol=1e-6)
  assert "faxbridge_map" in prim_names(jax.linear_transpose(linear, X), ct)


# -- weighted_mean and the extrema -----------------------------------------------------------------
def _wm_reference(x, w):
  return jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)


WM = fb.computation(fb.weighted_mean, in_placements=(fb.CLIENTS, fb.CLIENTS))


def test_weighted_mean_is_differentiable_in_value_and_weight():
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.jit(jax.grad(loss(WM), argnums=(0, 1)))(X, W)
  want = jax.jit(jax.grad(loss(_wm_reference), argnums=(0, 1)))(X, W)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  # And the weight's gradient is not trivially zero.
  assert np.abs(got[1]).max() > 1e-3
  tangents = (np.ones_like(X), np.arange(N, dtype=np.float32))
  _, got_t = jax.jvp(WM, (X, W), tangents)
  _, want_t = jax.jvp(_wm_reference, (X, W), tangents)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-6)


def test_max_min_gradients_split_ties_like_jnp():
  x = np.array([[1.0, 5.0], [3.0, 5.0], [3.0, 0.0]], np.float32)  # ties in both columns
  for fb_op, jnp_op in ((fb.max, jnp.max), (fb.min, jnp.min)):
    comp = fb.computation(fb_op, in_placements=(fb.CLIENTS,))
    got = jax.grad(lambda v, c=comp: jnp.sum(c(v) * jnp.array([1.0, 2.0])))(x)
    want = jax.grad(lambda v, o=jnp_op: jnp.sum(o(v, axis=0) * jnp.array([1.0, 2.0])))(x)
    np.testing.assert_allclose(got, want)


# -- a program with every operation: gradients against plain JAX -----------------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def everything(s, x, w):
  y = fb.map(lambda a, b: jnp.sin(a * b) + a, fb.broadcast(s), x)
  count = fb.secure_sum(fb.map(lambda b: (b > 0).astype(jnp.int32).sum(), x), bitwidth=8)
  server = fb.weighted_mean(y, w) + fb.mean(y) * fb.sum(y) + fb.max(y) - fb.min(y)
  return jnp.sum(server**2) + count.astype(server.dtype)


def everything_reference(s, x, w):
  y = jnp.sin(s * x) + s
  server = _wm_reference(y, w) + y.mean(0) * y.sum(0) + y.max(0) - y.min(0)
  return jnp.sum(server**2) + jnp.sum(x > 0).astype(server.dtype)


def test_value_and_gradients_equal_plain_jax():
  np.testing.assert_allclose(everything(S, X, W), everything_reference(S, X, W), rtol=1e-5)
  got = jax.jit(jax.grad(everything, argnums=(0, 1, 2)))(S, X, W)
  want = jax.jit(jax.grad(everything_reference, argnums=(0, 1, 2)))(S, X, W)
  for g, r in zip(got, want):
    assert g.shape == r.shape  # a CLIENTS input's gradient keeps the clients axis
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_jvp_and_vjp_equal_plain_jax():
  primals = (S, X, W)
  tangents = (np.float32(1.0), RNG.normal(size=X.shape).astype(np.float32), W / 10)
  jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))
  np.testing.assert_allclose(jvp(everything)(primals, tangents),
                             jvp(everything_reference)(primals, tangents), rtol=1e-4)

  def vjp(f):
    def run(*p):
      out, pullback = jax.vjp(f, *p)
      return out, pullback(np.float32(1.5))
    return jax.jit(run)

  (out, cts), (ref_out, ref_cts) = vjp(everything)(*primals), vjp(everything_reference)(*primals)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5)
  for g, r in zip(cts, ref_cts):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_gradient_jaxpr_keeps_the_federated_primitives():
  names = prim_names(jax.grad(everything, argnums=(0, 1, 2)), S, X, W)
  assert {f"faxbridge_{op}" for op in ("broadcast", "map", "sum", "mean", "weighted_mean", "max",
                                       "min")} <= set(names)
  # Reverse mode of the server value's broadcast is a sum over clients: more sums than forward.
  assert names.count("faxbridge_sum") > prim_names(everything, S, X, W).count("faxbridge_sum")
  assert names.count("faxbridge_broadcast") > prim_names(everything, S, X, W).count("faxbridge_broadcast")


def test_meta_gradient_of_fedsgd_keeps_the_boundary():
  from examples import _mlp, fedsgd

  params, data = fedsgd.example_inputs(clients=3)
  # The server loss after one round on the first client's real examples, differentiated through
  # every client's own gradient (a fold over its batches).
  own = int(data.count[0])
  first = {k: np.asarray(v)[0, :own] for k, v in data.examples.items()}
  meta = lambda p: _mlp.loss(fedsgd.computation(p, data)[0], first)
  grad = jax.make_jaxpr(jax.grad(meta))(params).jaxpr
  names = [e.primitive.name for e in all_eqns(grad)]
  assert {"faxbridge_broadcast", "faxbridge_map", "faxbridge_weighted_mean", "faxbridge_sum",
          "faxbridge_fold"} <= set(names)
  # Reverse mode sums the broadcast model's per-client cotangents: for each model leaf a sum from
  # [clients, *leaf] to the leaf's shape, which the forward pass does not have (it has no sum).
  summed = {(tuple(e.invars[0].aval.shape), tuple(e.outvars[0].aval.shape))
            for e in all_eqns(grad) if e.primitive.name == "faxbridge_sum"}
  assert {(tuple(data.count.shape) + np.shape(w), np.shape(w)) for w in params.values()} <= summed
  assert "faxbridge_sum" not in prim_names(meta, params)


# -- numerical checks of every rule, in float64 ----------------------------------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def every_rule(s, x, w):
  """broadcast, a two-output map, and every aggregation (weighted_mean in value and weight)."""
  y, z = fb.map(lambda a, b: (jnp.tanh(a * b) * b.sum(), jnp.sin(b) * a), fb.broadcast(s), x)
  server = fb.mean(y) ** 2 * fb.weighted_mean(y, w) + fb.max(y) * fb.min(y) + fb.sum(y)
  return server, z


@pytest.mark.slow  # keeps the quick suite under two minutes; runs in CI
def test_check_grads_second_order_both_modes():
  with jax.enable_x64(True):
    args = (np.asarray([0.3, -0.8]), RNG.normal(size=(N, 2)), W.astype(np.float64))
    check_grads(every_rule, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # the quick suite compares gradients at fixed shapes (the tests above)
@settings(max_examples=4)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**16))
def test_gradients_equal_plain_jax_for_any_shape(n, d, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
  s = rng.normal(size=(d,)).astype(np.float32)

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
  def comp(s, x, w):
    y = fb.map(lambda a, b: a * jnp.cos(b), fb.broadcast(s), x)
    return jnp.sum(fb.weighted_mean(y, w) * fb.mean(y))

  def reference(s, x, w):
    y = jax.vmap(lambda b: s * jnp.cos(b))(x)
    return jnp.sum(_wm_reference(y, w) * jnp.mean(y, axis=0))

  got = jax.jit(jax.grad(comp, argnums=(0, 1, 2)))(s, x, w)
  want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(s, x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)

"""Parity with FAX: the same programs written with drjax 0.2.1 and with faxbridge give equal
outputs and equal gradients."""

from __future__ import annotations

import drjax
import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

RTOL, ATOL = 2e-5, 1e-6


def _close(got, want, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# -- FedAvg with local SGD steps -------------------------------------------------------------------
# A linear model trained by local SGD (a scan over each client's mini-batches), averaged by the
# server weighted by the clients' example counts. Small, so that both sides compile quickly.
CLIENTS, BATCHES, BATCH, DIM, LR = 4, 3, 5, 3, 0.1


def _loss(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _client_update(params, data):
  def step(p, batch):
    return jax.tree.map(lambda w, g: w - LR * g, p, jax.grad(_loss)(p, batch)), None

  trained, _ = jax.lax.scan(step, params, {"x": data["x"], "y": data["y"]})
  delta = jax.tree.map(jnp.subtract, trained, params)
  return delta, data["count"], _loss(trained, {"x": data["x"][0], "y": data["y"][0]})


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fb_fedavg(params, data):
  deltas, counts, losses = fb.map(_client_update, fb.broadcast(params), data)
  mean_delta = fb.weighted_mean(deltas, counts)
  return jax.tree.map(jnp.add, params, mean_delta), fb.mean(losses)


@drjax.program(placements={"clients": CLIENTS})
def drjax_fedavg(params, data):
  deltas, counts, losses = drjax.map_fn(_client_update, (drjax.broadcast(params), data))
  # drjax 0.2.1's reduce_weighted_mean takes one array at a time.
  mean_delta = jax.tree.map(lambda d: drjax.reduce_weighted_mean(d, counts), deltas)
  return jax.tree.map(jnp.add, params, mean_delta), drjax.reduce_mean(losses)


def test_fedavg_round_and_its_gradients_equal_drjax():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(CLIENTS, BATCHES, BATCH, DIM)).astype(np.float32)
  data = {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32),
          "count": np.array([5.0, 10.0, 15.0, 30.0], np.float32)}
  params = {"w": np.zeros(DIM, np.float32), "b": np.float32(0.0)}

  def run(round_fn):
    def objective(p, x):  # server-side loss after one round, of the server model and client data
      new, loss = round_fn(p, {**data, "x": x})
      return loss + sum(jnp.sum(v**2) for v in jax.tree.leaves(new))

    # One compilation per side: the round's outputs and the objective's gradients.
    return jax.jit(lambda p, x: (round_fn(p, data), jax.value_and_grad(objective, (0, 1))(p, x)))

  got_round, (got_v, got_g) = run(fb_fedavg)(params, x)
  want_round, (want_v, want_g) = run(drjax_fedavg)(params, x)
  _close(got_round, want_round)
  np.testing.assert_allclose(got_v, want_v, rtol=RTOL)
  _close(got_g, want_g, rtol=1e-4, atol=1e-6)
  assert got_g[1].shape == x.shape  # a per-client gradient, clients axis first
  # The round really trained: the model moved, and the gradients are not zero.
  assert np.abs(got_round[0]["w"]).min() > 1e-2
  assert np.abs(got_g[0]["w"]).max() > 1e-3


# -- a weighted mean -------------------------------------------------------------------------------
@drjax.program(placements={"clients": 5})
def drjax_weighted(x, w):
  return jax.tree.map(lambda v: drjax.reduce_weighted_mean(v, w), x)


FB_WEIGHTED = fb.computation(fb.weighted_mean, in_placements=(fb.CLIENTS, fb.CLIENTS))


def test_weighted_mean_and_its_gradients_equal_drjax():
  rng = np.random.default_rng(3)
  x = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(
      np.float32)}
  w = rng.uniform(0.5, 3.0, size=5).astype(np.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)["a"])) * f(x, w)["b"]
  run = lambda f: jax.jit(lambda x, w: (f(x, w), jax.grad(loss(f), argnums=(0, 1))(x, w)))
  _close(run(FB_WEIGHTED)(x, w), run(drjax_weighted)(x, w), rtol=1e-5, atol=1e-6)


# -- broadcast / map / mean analytics --------------------------------------------------------------
def _stats(centre, values):
  centred = values - centre
  return {"mean": jnp.mean(centred), "sq": jnp.mean(centred**2), "peak": jnp.max(values)}


@drjax.program(placements={"clients": 6})
def drjax_analytics(centre, values):
  stats = drjax.map_fn(_stats, (drjax.broadcast(centre), values))
  moments = drjax.reduce_mean(stats)
  return moments["sq"] - moments["mean"] ** 2, drjax.reduce_sum(stats["peak"])


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fb_analytics(centre, values):
  stats = fb.map(_stats, fb.broadcast(centre), values)
  moments = fb.mean(stats)
  return moments["sq"] - moments["mean"] ** 2, fb.sum(stats["peak"])


def test_analytics_and_its_gradients_equal_drjax():
  values = np.random.default_rng(4).normal(loc=1.0, size=(6, 16)).astype(np.float32)
  centre = np.float32(0.5)
  loss = lambda f: lambda c, v: f(c, v)[0] * f(c, v)[1]

  def run(f):
    grad = jax.grad(loss(f), argnums=(0, 1))
    # Second order too: a Hessian-vector product along the server value.
    hvp = lambda c, v: jax.jvp(grad, (c, v), (jnp.ones_like(c), jnp.zeros_like(v)))[1]
    return jax.jit(lambda c, v: (f(c, v), grad(c, v), hvp(c, v)))(centre, values)

  _close(run(fb_analytics), run(drjax_analytics), rtol=1e-4, atol=1e-5)

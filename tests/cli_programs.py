"""Tiny programs for the command-line tests (``faxbridge export cli_programs:ATTR``, run from
``tests/``): two computations of one signature that compute different things, so one's pieces
can stand in for the other's, a float64 one for jax_enable_x64, and a two-stage one with a dict and
a tuple argument for ``inspect``'s names and drawing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import faxbridge as fb

CLIENTS = 3
not_a_program = 42


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def scaled_mean(scale, values):
  """The server's ``scale`` times the clients' mean of their values."""
  return fb.mean(fb.map(lambda s, v: s * jnp.mean(v, axis=0), fb.broadcast(scale), values))


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def shifted_mean(scale, values):
  """The same signature as ``scaled_mean``, another result: its pieces are a wrong stand-in."""
  return fb.mean(fb.map(lambda s, v: s + jnp.mean(v, axis=0), fb.broadcast(scale), values))


@fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
def count_above(values, thresholds):
  """Two CLIENTS inputs (they must agree on the number of clients) and an integer result."""
  return fb.sum(fb.map(lambda v, t: jnp.sum(v > t).astype(jnp.int32), values, thresholds))


def count_inputs():
  rng = np.random.default_rng(2)
  return rng.normal(size=(CLIENTS, 6)).astype(np.float32), np.zeros((CLIENTS,), np.float32)


@fb.computation(in_placements=(fb.CLIENTS,))
def mean64(values):
  return fb.mean(fb.map(lambda v: jnp.sum(v * v, axis=0), values))


def example_inputs():
  rng = np.random.default_rng(0)
  return np.float32(2.0), rng.normal(size=(CLIENTS, 4, 2)).astype(np.float32)


def inputs64():
  """float64 data: exports only with jax_enable_x64 (JAX_ENABLE_X64=1)."""
  return (np.random.default_rng(1).normal(size=(CLIENTS, 5)),)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def centred(params, data):
  """Two stages: the clients' weighted mean of ``x`` (a broadcast of ``params``), then the sum of
  their squared distances to it (a broadcast of that mean). ``data`` is a tuple ``(x, weight)``."""
  x, weight = data
  mean = fb.weighted_mean(fb.map(lambda p, v: p["w"] * jnp.mean(v, axis=0) + p["b"],
                                 fb.broadcast(params), x), weight)
  spread = fb.sum(fb.map(lambda m, v: jnp.sum((v - m) ** 2, axis=0), fb.broadcast(mean), x))
  return {"mean": mean, "spread": spread}


def centred_inputs():
  rng = np.random.default_rng(3)
  params = {"w": np.ones((2,), np.float32), "b": np.zeros((2,), np.float32)}
  return params, (rng.normal(size=(CLIENTS, 5, 2)).astype(np.float32),
                  np.arange(1, CLIENTS + 1, dtype=np.float32))

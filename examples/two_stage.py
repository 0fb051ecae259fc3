"""A two-stage program: the server first learns the clients' mean, broadcasts it back, and
aggregates the clients' centred second moments (a broadcast that depends on an aggregate)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import faxbridge as fb

CLIENTS = 8


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def centred_variance(scale, values):
  mean = fb.mean(fb.map(lambda s, v: s * jnp.mean(v, axis=0), fb.broadcast(scale), values))
  centred = fb.map(lambda m, v: jnp.mean((v - m) ** 2, axis=0), fb.broadcast(mean), values)
  return mean, fb.mean(centred)


computation = centred_variance


def example_inputs(clients: int = CLIENTS):
  rng = np.random.default_rng(5)
  return np.float32(2.0), rng.normal(size=(clients, 10, 3)).astype(np.float32)

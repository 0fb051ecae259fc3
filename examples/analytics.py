"""Federated analytics: a broadcast threshold, per-client statistics, their mean, a secure count of
clients above the threshold, and the extreme values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import faxbridge as fb

CLIENTS = 16


def client_stats(threshold, values):
  above = jnp.sum((values > threshold).astype(jnp.int32))
  return {"mean": jnp.mean(values), "sq": jnp.mean(values**2)}, above, jnp.max(values)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def analytics(threshold, values):
  stats, above, peak = fb.map(client_stats, fb.broadcast(threshold), values)
  moments = fb.mean(stats)
  variance = moments["sq"] - moments["mean"] ** 2
  count = fb.secure_sum(above, bitwidth=16)
  return {"mean": moments["mean"], "variance": variance, "count_above": count,
          "max": fb.max(peak), "min_peak": fb.min(peak)}


computation = analytics


def example_inputs(clients: int = CLIENTS):
  rng = np.random.default_rng(4)
  values = rng.normal(loc=1.0, size=(clients, 32)).astype(np.float32)
  return np.float32(1.5), values

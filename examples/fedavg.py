"""FedAvg: each client runs local SGD steps from the server model; the server averages the models,
weighted by each client's number of examples."""

from __future__ import annotations

import jax
import numpy as np

import faxbridge as fb
from examples import _mlp

CLIENTS = 8
LOCAL_LR = 0.1


def client_update(params: dict, data: dict):
  batches = {"x": data["x"], "y": data["y"]}
  trained = _mlp.sgd_epoch(params, batches, LOCAL_LR)
  delta = jax.tree.map(lambda new, old: new - old, trained, params)
  return delta, data["num_examples"], _mlp.loss(trained, jax.tree.map(lambda d: d[0], batches))


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedavg_round(params, data):
  """One FedAvg round: server model and client data to the new model and the mean client loss.

  ``data`` per client: ``x`` [batches, B, F], ``y`` [batches, B] and ``num_examples`` (a scalar).
  """
  deltas, weights, losses = fb.map(client_update, fb.broadcast(params), data)
  mean_delta = fb.weighted_mean(deltas, weights)
  new_params = jax.tree.map(lambda p, d: p + d, params, mean_delta)
  return new_params, fb.mean(losses)


@fb.computation()
def initialize():
  return _mlp.init_params()


computation = fedavg_round
process = fb.IterativeProcess(initialize, fedavg_round)


def example_inputs(clients: int = CLIENTS):
  data = _mlp.client_data(clients, batches=3, batch_size=16)
  data["num_examples"] = np.arange(1, clients + 1, dtype=np.float32) * 16
  return _mlp.init_params(), data

"""FedAvg on digits: each client runs local SGD from the server model; the server adds the clients'
model deltas averaged with weights n_k (each client's number of examples).

    w_{t+1} = w_t + sum_k n_k (w_k - w_t) / sum_k n_k,   w_k = local SGD from w_t on client k

Run ``python -m examples.fedavg`` to train for a few rounds and print the held-out accuracy.
"""

from __future__ import annotations

import jax
import numpy as np

import faxbridge as fb

from . import _cli, _data, _mlp

CLIENTS = 8
LOCAL_LR = 0.1
BATCHES, BATCH_SIZE = 2, 16  # per client and round in example_inputs (export sizes)


def client_update(params: dict, data: dict):
  batches = {"x": data["x"], "y": data["y"]}
  trained = _mlp.sgd_epoch(params, batches, LOCAL_LR)
  delta = jax.tree.map(lambda new, old: new - old, trained, params)
  return delta, data["num_examples"], _mlp.loss(trained, jax.tree.map(lambda d: d[0], batches))


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedavg_round(params, data):
  """One FedAvg round: server model and client data to the new model and the mean client loss.

  ``data`` per client: ``x`` [batches, B, 64], ``y`` [batches, B] and ``num_examples`` (a scalar).
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


def example_inputs(clients: int = CLIENTS) -> tuple[dict, dict[str, np.ndarray]]:
  """The initial model and one round of digits client data (Dirichlet(0.5) label skew)."""
  data, _ = _data.digits_clients(clients, batches=BATCHES, batch_size=BATCH_SIZE)
  return _mlp.init_params(), data


def main(rounds: int = 10, clients: int = CLIENTS, log=print) -> list[dict]:
  """Train natively from ``initialize`` on digits (8 batches of 16 per client and round, more local
  steps than the export's example inputs) and report the held-out loss and accuracy per round."""
  return _mlp.simulate(process, rounds=rounds, clients=clients, batches=8, batch_size=16,
                       log=log)


if __name__ == "__main__":
  _cli.run(main)

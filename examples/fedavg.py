"""FedAvg on digits: each client runs one epoch of local SGD over its own examples from the server
model; the server adds the clients' model deltas averaged with weights n_k (each client's number
of examples).

    w_{t+1} = w_t + sum_k n_k (w_k - w_t) / sum_k n_k,   w_k = local SGD from w_t on client k

Clients hold their real Dirichlet label-skew partitions (``_data.client_examples``: an
``fb.Ragged``): client k's epoch is ``ceil(n_k / B)`` steps over its own batches (``fb.fold``), the
last one on its remaining examples only.

Run ``python -m examples.fedavg`` to train for a few rounds and print the held-out accuracy.
"""

from __future__ import annotations

import jax

import faxbridge as fb

from . import _cli, _data, _mlp

CLIENTS = 8
LOCAL_LR = 0.1
BATCH_SIZE = 16


def client_update(params: dict, data: fb.Ragged):
  """Local SGD over the client's own batches: the update ``trained - params`` and the epoch's
  training loss (the mean over the client's examples, each before its batch's step)."""
  trained, loss = _mlp.sgd_epoch(params, data, LOCAL_LR)
  return jax.tree.map(lambda new, old: new - old, trained, params), loss


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedavg_round(params, data):
  """One FedAvg round: server model and client data to the new model and the clients' training
  loss per example (weighted by their counts).

  ``data``: an ``fb.Ragged`` of ``{"x": [L, 64], "y": [L]}`` per client, ``count`` its examples.
  """
  deltas, losses = fb.map(client_update, fb.broadcast(params), data)
  mean_delta = fb.weighted_mean(deltas, data.count)
  new_params = jax.tree.map(lambda p, d: p + d, params, mean_delta)
  return new_params, fb.weighted_mean(losses, data.count)


@fb.computation()
def initialize():
  return _mlp.init_params()


computation = fedavg_round
process = fb.IterativeProcess(initialize, fedavg_round)


def example_inputs(clients: int = CLIENTS) -> tuple[dict, fb.Ragged]:
  """The initial model and one round of digits client data: 8 clients holding 1 to 562 examples
  (``_data.EXAMPLE_*``), padded to 576, in batches of 16."""
  return _mlp.init_params(), _data.example_clients(clients, batch_size=BATCH_SIZE)


def main(rounds: int = 10, clients: int = CLIENTS, log=print) -> list[dict]:
  """Train natively from ``initialize`` on digits (Dirichlet(0.5): every client one epoch over its
  own examples per round, in batches of 16) and report the held-out loss and accuracy per round."""
  return _mlp.simulate(process, rounds=rounds, clients=clients, batch_size=BATCH_SIZE, log=log)


if __name__ == "__main__":
  _cli.run(main)

"""FedSGD: clients compute a gradient at the server model; the server takes one SGD step with
their mean."""

from __future__ import annotations

import jax

import faxbridge as fb

from . import _data, _mlp

CLIENTS = 8
SERVER_LR = 0.5


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedsgd_round(params, batch):
  losses, grads = fb.map(jax.value_and_grad(_mlp.loss), fb.broadcast(params), batch)
  mean_grad = fb.mean(grads)
  return jax.tree.map(lambda p, g: p - SERVER_LR * g, params, mean_grad), fb.mean(losses)


@fb.computation()
def initialize():
  return _mlp.init_params()


computation = fedsgd_round
process = fb.IterativeProcess(initialize, fedsgd_round)


def example_inputs(clients: int = CLIENTS):
  """The initial model and one batch of 32 digits per client (Dirichlet(0.5) label skew)."""
  data, _ = _data.digits_clients(clients, batches=1, batch_size=32, seed=2)
  return _mlp.init_params(), {"x": data["x"][:, 0], "y": data["y"][:, 0]}

"""FedSGD: every client computes the gradient of its mean loss over all its own examples at the
server model; the server takes one SGD step with their mean weighted by the clients' example
counts n_k, which is the gradient of the mean loss over every client's examples pooled:

    g = sum_k n_k g_k / sum_k n_k,   g_k = grad (1 / n_k) sum_{j in client k} loss_j(w)

Clients hold their real partitions (an ``fb.Ragged``); a client's gradient is summed over its own
batches by ``fb.fold`` and divided by its count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import faxbridge as fb

from . import _data, _mlp

CLIENTS = 8
SERVER_LR = 0.5
BATCH_SIZE = 32  # the batches a client sums its gradient over (no effect on the result)


def client_gradient(params: dict, data: fb.Ragged) -> tuple[jax.Array, dict]:
  """The client's mean loss over its own examples and that loss's gradient (zeros for a client
  with none): sums over its batches, divided by its count."""

  def step(carry, batch, mask):
    loss_sum, grad_sum = carry
    value, g = jax.value_and_grad(_mlp.summed_loss)(params, batch, mask)
    return loss_sum + value, jax.tree.map(jnp.add, grad_sum, g)

  zeros = jax.tree.map(jnp.zeros_like, params)
  loss_sum, grad_sum = fb.fold(step, (jnp.zeros((), jnp.float32), zeros), data)
  n = jnp.maximum(data.count.astype(jnp.float32), 1.0)
  return loss_sum / n, jax.tree.map(lambda g: g / n, grad_sum)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedsgd_round(params, data):
  """One step ``params - lr g`` and the pooled loss per example, both weighted by the counts."""
  losses, grads = fb.map(client_gradient, fb.broadcast(params), data)
  mean_grad = fb.weighted_mean(grads, data.count)
  return (jax.tree.map(lambda p, g: p - SERVER_LR * g, params, mean_grad),
          fb.weighted_mean(losses, data.count))


@fb.computation()
def initialize():
  return _mlp.init_params()


computation = fedsgd_round
process = fb.IterativeProcess(initialize, fedsgd_round)


def example_inputs(clients: int = CLIENTS) -> tuple[dict, fb.Ragged]:
  """The initial model and the digits clients of ``_data.example_clients`` (1 to 562 examples,
  padded to 576), in batches of 32."""
  return _mlp.init_params(), _data.example_clients(clients, batch_size=BATCH_SIZE)

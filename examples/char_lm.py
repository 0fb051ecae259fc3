"""A character language model trained with FedAvg: a one-layer transformer (causal attention,
layer norms, a GELU MLP) on Python's own help topics, each client holding a few topics.

Run ``python -m examples.char_lm``: a few rounds, printing the held-out loss and bits per char.
"""

from __future__ import annotations

import jax
import numpy as np

import faxbridge as fb

from . import _cli, _text, _transformer

CLIENTS, BATCHES, BATCH_SIZE = 8, 2, 8
LOCAL_LR = 0.3


def client_update(params: dict, data: dict):
  """Local SGD over the client's batches; the update ``trained - params`` and its weight."""
  trained = _transformer.sgd_epoch(params, data["tokens"], LOCAL_LR)
  delta = jax.tree.map(lambda new, old: new - old, trained, params)
  return delta, data["num_examples"], _transformer.loss(trained, data["tokens"][0])


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def char_lm_round(params, data):
  """One FedAvg round: ``params + sum_i n_i (trained_i - params) / sum_i n_i`` and the clients'
  mean training loss. ``data`` per client: ``tokens`` int32 [batches, B, CONTEXT + 1] and
  ``num_examples``."""
  deltas, weights, losses = fb.map(client_update, fb.broadcast(params), data)
  mean_delta = fb.weighted_mean(deltas, weights)
  return jax.tree.map(lambda p, d: p + d, params, mean_delta), {"train_loss": fb.mean(losses)}


@fb.computation()
def initialize():
  return _transformer.init_params()


computation = char_lm_round
process = fb.IterativeProcess(initialize, char_lm_round)


def example_inputs(clients: int = CLIENTS, batches: int = BATCHES):
  data, _ = _text.topic_shards(clients, batches, BATCH_SIZE, _transformer.CONTEXT)
  return _transformer.init_params(), data


def main(rounds: int = 8, clients: int = 16, batches: int = 8, log=print) -> list[float]:
  """Train natively from ``initialize`` (8 batches of 8 windows per client and round) and report
  the held-out loss (nats and bits per char) per round, round 0 being the initial model."""
  data, heldout = _text.topic_shards(clients, batches, BATCH_SIZE, _transformer.CONTEXT)
  evaluate = jax.jit(_transformer.loss)
  state, history = process.initialize(), []
  for r in range(rounds + 1):
    if r:
      state, _ = process.next(state, data)
    history.append(float(evaluate(state, heldout)))
    if log:
      log(f"round {r:2d}: held-out loss {history[-1]:.3f} nats "
          f"({history[-1] / np.log(2):.3f} bits/char)")
  return history


if __name__ == "__main__":
  _cli.run(main)

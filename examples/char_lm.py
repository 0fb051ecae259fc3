"""A character language model trained with FedAvg: a one-layer transformer (causal attention,
layer norms, a GELU MLP) on Python's own help topics, each client holding one topic.

Every client holds all the windows of its own topic's text (6 to about 2,000 windows of 33
characters: an ``fb.Ragged``), runs one epoch of SGD over its own batches of them (``fb.fold``, the
last batch on its remaining windows only), and the server averages the updates weighted by the
clients' real window counts.

Run ``python -m examples.char_lm``: a few rounds, printing the held-out loss and bits per char.
"""

from __future__ import annotations

import jax
import numpy as np

import faxbridge as fb

from . import _cli, _text, _transformer

CLIENTS, BATCH_SIZE = 8, 8
LOCAL_LR = 0.3
# The exported example's inputs: the first 8 client topics of at most 128 windows (6 to 104),
# padded to 128 windows (16 batches of 8). Training (main) takes topics of every length.
EXAMPLE_WINDOWS = 128


def client_update(params: dict, data: fb.Ragged):
  """Local SGD over the client's own batches of windows; the update ``trained - params`` and the
  epoch's training loss."""
  trained, loss = _transformer.sgd_epoch(params, data, LOCAL_LR)
  return jax.tree.map(lambda new, old: new - old, trained, params), loss


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def char_lm_round(params, data):
  """One FedAvg round: ``params + sum_i n_i (trained_i - params) / sum_i n_i`` and the clients'
  training loss per window (weighted by their counts). ``data``: an ``fb.Ragged`` of
  ``{"tokens": int32 [L, CONTEXT + 1]}`` per client, ``count`` its windows n_i."""
  deltas, losses = fb.map(client_update, fb.broadcast(params), data)
  mean_delta = fb.weighted_mean(deltas, data.count)
  return (jax.tree.map(lambda p, d: p + d, params, mean_delta),
          {"train_loss": fb.weighted_mean(losses, data.count)})


@fb.computation()
def initialize():
  return _transformer.init_params()


computation = char_lm_round
process = fb.IterativeProcess(initialize, char_lm_round)


def example_inputs(clients: int = CLIENTS):
  data, _ = _text.topic_shards(clients, BATCH_SIZE, _transformer.CONTEXT,
                               max_windows=EXAMPLE_WINDOWS, length=EXAMPLE_WINDOWS)
  return _transformer.init_params(), data


def main(rounds: int = 8, clients: int = 16, log=print) -> list[float]:
  """Train natively from ``initialize`` (every client one epoch over all its topic's windows per
  round, in batches of 8) and report the held-out loss (nats and bits per char) per round, round
  0 being the initial model."""
  data, heldout = _text.topic_shards(clients, BATCH_SIZE, _transformer.CONTEXT)
  if log:
    counts = sorted(np.asarray(data.count).tolist())
    log(f"{clients} clients (one help topic each) holding {counts[0]} to {counts[-1]} windows of "
        f"{_transformer.CONTEXT + 1} characters, batches of {BATCH_SIZE}")
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

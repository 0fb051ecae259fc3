"""A small MLP classifier on scikit-learn's digits, shared by the training examples: 64 pixels ->
``HIDDEN`` tanh units -> 10 classes, softmax cross-entropy, plain SGD steps, and a simulation
loop that trains a process for a few rounds and reports a held-out metric per round.

Everything here is plain JAX and numpy (no ``fb.*``): the held-out evaluation runs outside the
federated round, on the server model, the way a modeller would look at it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _data

FEATURES, CLASSES = _data.FEATURES, _data.CLASSES
HIDDEN = 32


def init_params(seed: int = 0, hidden: int = HIDDEN) -> dict:
  """Scaled normal weights (1/sqrt(fan-in)) and zero biases, as float32 numpy arrays."""
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.normal(size=(FEATURES, hidden)) / np.sqrt(FEATURES)).astype(np.float32),
      "b1": np.zeros(hidden, np.float32),
      "w2": (rng.normal(size=(hidden, CLASSES)) / np.sqrt(hidden)).astype(np.float32),
      "b2": np.zeros(CLASSES, np.float32),
  }


def logits(params: dict, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss(params: dict, batch: dict) -> jax.Array:
  """Mean softmax cross-entropy on ``batch = {"x": [B, 64], "y": [B] int32}``."""
  log_probs = jax.nn.log_softmax(logits(params, batch["x"]))
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1))


def sgd_epoch(params: dict, data: dict, lr: float) -> dict:
  """One pass of SGD over a client's mini-batches (``lax.scan`` over the batch axis):
  ``params <- params - lr * grad loss(params, batch)`` for each batch in turn."""

  def step(p, batch):
    g = jax.grad(loss)(p, batch)
    return jax.tree.map(lambda w, gw: w - lr * gw, p, g), None

  params, _ = jax.lax.scan(step, params, data)
  return params


@jax.jit
def evaluate(params: dict, x: jax.Array, y: jax.Array) -> dict:
  """Held-out loss and accuracy (fraction of argmax predictions equal to the label)."""
  accuracy = jnp.mean((jnp.argmax(logits(params, x), axis=-1) == y).astype(jnp.float32))
  return {"loss": loss(params, {"x": x, "y": y}), "accuracy": accuracy}


def simulate(process: Any, *, rounds: int, clients: int, batches: int, batch_size: int,
             params_of: Callable[[Any], dict] = lambda state: state, alpha: float = 0.5,
             seed: int = 0, log: Callable[[str], None] | None = print) -> list[dict]:
  """Run ``process`` (an ``fb.IterativeProcess`` whose ``next(state, data)`` takes the client data
  of ``_data.client_batches``) natively for ``rounds`` rounds on digits split over ``clients``.

  The partition is fixed; each round every client draws a fresh ``batches x batch_size`` from its
  own examples (seed ``seed * 1000 + round``). Returns, per round and starting with round 0 (the
  initial model), the held-out loss and accuracy of ``params_of(state)``; logs them when ``log``.
  """
  train_x, train_y, test_x, test_y = _data.load_digits_split(seed)
  parts = _data.partition(train_y, clients, alpha=alpha, seed=seed)
  state = process.initialize()
  history = []
  for r in range(rounds + 1):
    if r:
      data = _data.client_batches(train_x, train_y, parts, batches=batches,
                                  batch_size=batch_size, seed=seed * 1000 + r)
      out = process.next(state, data)
      state = out[0] if isinstance(out, tuple) else out
    metrics = {k: float(v) for k, v in evaluate(params_of(state), test_x, test_y).items()}
    history.append({"round": r, **metrics})
    if log:
      log(f"round {r:2d}: held-out loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}"
          f" ({len(test_y)} test digits)")
  return history

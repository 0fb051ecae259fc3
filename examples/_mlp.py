"""A small MLP classifier on scikit-learn's digits, shared by the training examples: 64 pixels ->
``HIDDEN`` tanh units -> 10 classes, softmax cross-entropy, plain SGD steps, a client's local epoch
over its own batches, and a simulation loop that trains a process for a few rounds and reports a
held-out metric per round.

A client holds its real number of examples (``_data.client_examples``: an ``fb.Ragged``), so its
last batch may be partial: the loss of a batch is the mean over its real examples,
``sum(mask * loss_j) / max(sum(mask), 1)``, and ``sgd_epoch`` is ``fb.fold`` over the client's
``ceil(count / B)`` batches (the client's loop; the padding is never read). Everything else is
plain JAX and numpy: the held-out evaluation runs outside the federated round, on the server model,
the way a modeller would look at it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

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


def example_losses(params: dict, batch: dict) -> jax.Array:
  """Softmax cross-entropy per example [B] of ``batch = {"x": [B, 64], "y": [B] int32}``."""
  log_probs = jax.nn.log_softmax(logits(params, batch["x"]))
  return -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]


def loss(params: dict, batch: dict) -> jax.Array:
  """Mean softmax cross-entropy on ``batch = {"x": [B, 64], "y": [B] int32}``."""
  return jnp.mean(example_losses(params, batch))


def summed_loss(params: dict, batch: dict, mask: jax.Array) -> jax.Array:
  """Cross-entropy summed over the real examples of a batch (``mask`` bool [B]):
  ``sum(mask * loss_j)``."""
  return jnp.sum(mask.astype(jnp.float32) * example_losses(params, batch))


def masked_loss(params: dict, batch: dict, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over the real examples of a batch (``mask`` bool [B]):
  ``sum(mask * loss_j) / max(sum(mask), 1)`` (0 for a batch with none)."""
  return summed_loss(params, batch, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def sgd_step(params: dict, batch: dict, mask: jax.Array, lr: float) -> tuple[dict, jax.Array]:
  """``params - lr * grad masked_loss(params, batch, mask)`` and the batch's loss before the step."""
  value, g = jax.value_and_grad(masked_loss)(params, batch, mask)
  return jax.tree.map(lambda w, gw: w - lr * gw, params, g), value


def sgd_epoch(params: dict, data: fb.Ragged, lr: float) -> tuple[dict, jax.Array]:
  """One pass of SGD over a client's own batches (inside ``fb.map``; ``data`` its ``fb.Ragged``
  with a batch size), as ``fb.fold``: ``params <- sgd_step(params, batch, mask)`` for each batch
  in turn. Returns the trained params and the epoch's training loss: the mean over the client's
  examples of each one's loss before its batch's step (0 for a client with no examples)."""

  def step(carry, batch, mask):
    p, total = carry
    p, value = sgd_step(p, batch, mask, lr)
    return p, total + value * jnp.sum(mask.astype(jnp.float32))

  trained, total = fb.fold(step, (params, jnp.zeros((), jnp.float32)), data)
  return trained, total / jnp.maximum(data.count.astype(jnp.float32), 1.0)


@jax.jit
def evaluate(params: dict, x: jax.Array, y: jax.Array) -> dict:
  """Held-out loss and accuracy (fraction of argmax predictions equal to the label)."""
  accuracy = jnp.mean((jnp.argmax(logits(params, x), axis=-1) == y).astype(jnp.float32))
  return {"loss": loss(params, {"x": x, "y": y}), "accuracy": accuracy}


def simulate(process: Any, *, rounds: int, clients: int, batch_size: int,
             params_of: Callable[[Any], dict] = lambda state: state, alpha: float = 0.5,
             seed: int = 0, log: Callable[[str], None] | None = print) -> list[dict]:
  """Run ``process`` (an ``fb.IterativeProcess`` whose ``next(state, data)`` takes the client data
  of ``_data.client_examples``) natively for ``rounds`` rounds on digits split over ``clients``.

  The partition is fixed; each round every client sees all of its own examples, in a fresh order
  (seed ``seed * 1000 + round``), in batches of ``batch_size``. Returns, per round and starting
  with round 0 (the initial model), the held-out loss and accuracy of ``params_of(state)``; logs
  them when ``log``.
  """
  train_x, train_y, test_x, test_y = _data.load_digits_split(seed)
  parts = _data.partition(train_y, clients, alpha=alpha, seed=seed)
  if log:
    sizes = sorted(len(p) for p in parts)
    log(f"{clients} clients holding {sizes[0]} to {sizes[-1]} examples (median "
        f"{sizes[len(sizes) // 2]}), batches of {batch_size}")
  state = process.initialize()
  history = []
  for r in range(rounds + 1):
    if r:
      data = _data.client_examples(train_x, train_y, parts, batch_size=batch_size,
                                   seed=seed * 1000 + r)
      out = process.next(state, data)
      state = out[0] if isinstance(out, tuple) else out
    metrics = {k: float(v) for k, v in evaluate(params_of(state), test_x, test_y).items()}
    history.append({"round": r, **metrics})
    if log:
      log(f"round {r:2d}: held-out loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}"
          f" ({len(test_y)} test digits)")
  return history


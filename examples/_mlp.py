"""A small MLP classifier shared by the examples (softmax cross-entropy, plain SGD steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FEATURES, HIDDEN, CLASSES = 8, 16, 4


def init_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
      "b1": np.zeros(HIDDEN, np.float32),
      "w2": (rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
      "b2": np.zeros(CLASSES, np.float32),
  }


def loss(params: dict, batch: dict) -> jax.Array:
  """Mean softmax cross-entropy of the MLP on ``batch = {"x": [B, F], "y": [B] int32}``."""
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1))


def client_data(clients: int, batches: int, batch_size: int, seed: int = 1) -> dict:
  """Synthetic per-client data: ``x`` [clients, batches, B, F] and labels from a fixed teacher."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(clients, batches, batch_size, FEATURES)).astype(np.float32)
  teacher = rng.normal(size=(FEATURES, CLASSES))
  y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
  return {"x": x, "y": y}


def sgd_epoch(params: dict, data: dict, lr: float) -> dict:
  """One pass of SGD over a client's mini-batches (``lax.scan`` over the batch axis)."""

  def step(p, batch):
    g = jax.grad(loss)(p, batch)
    return jax.tree.map(lambda w, gw: w - lr * gw, p, g), None

  params, _ = jax.lax.scan(step, params, data)
  return params

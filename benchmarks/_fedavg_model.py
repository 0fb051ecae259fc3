"""The benchmark's own FedAvg round: an MLP 256-512-10 (136,714 parameters), 32 examples per client
in 2 batches of 16, 2 local SGD steps, unweighted mean of the client deltas.

Kept here (not in ``examples/``) so the benchmark measures the same work whatever the examples
become. Data is synthetic and deterministic (``numpy.random.default_rng(seed)``). The hand-written
TFF round (``benchmarks/tff_round.py``) computes the same math in TensorFlow:

  per client:  w <- w - lr * grad_w CE(softmax(relu(x_b W1 + b1) W2 + b2), y_b)   for b = 1, 2
  server:      w_new = w + mean_clients(w_client - w)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FEATURES, HIDDEN, CLASSES = 256, 512, 10
BATCHES, BATCH_SIZE = 2, 16
LR = 0.1
PARAM_NAMES = ("w1", "b1", "w2", "b2")


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
  """Glorot-scaled normal weights, zero biases (float32)."""
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
      "b1": np.zeros(HIDDEN, np.float32),
      "w2": (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
      "b2": np.zeros(CLASSES, np.float32),
  }


def num_params() -> int:
  return sum(v.size for v in init_params().values())


def client_data(clients: int, seed: int = 1) -> dict[str, np.ndarray]:
  """``x`` [clients, 2, 16, 256] float32 and ``y`` [clients, 2, 16] int32 labels in [0, 10)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((clients, BATCHES, BATCH_SIZE, FEATURES), dtype=np.float32)
  y = rng.integers(0, CLASSES, (clients, BATCHES, BATCH_SIZE), dtype=np.int32)
  return {"x": x, "y": y}


def loss(params, x, y):
  """Mean softmax cross-entropy of one batch."""
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def client_update(params, data):
  """Two SGD steps, one per batch (unrolled); returns the model delta."""
  trained = params
  for b in range(BATCHES):
    grads = jax.grad(loss)(trained, data["x"][b], data["y"][b])
    trained = jax.tree.map(lambda w, g: w - LR * g, trained, grads)
  return jax.tree.map(jnp.subtract, trained, params)


def reference_round(params, data) -> dict[str, np.ndarray]:
  """The round in numpy-fed plain JAX, one client at a time (an independent answer for tests)."""
  n = data["x"].shape[0]
  # One client per call. Jitted where there are many (the peers' checks at thousands of clients: seconds,
  # not minutes); a few run eagerly, quicker than compiling.
  update = jax.jit(client_update) if n > 8 else client_update
  deltas = [update(params, {k: v[i] for k, v in data.items()}) for i in range(n)]
  mean = jax.tree.map(lambda *d: sum(d) / n, *deltas)
  return {k: np.asarray(params[k] + mean[k]) for k in PARAM_NAMES}

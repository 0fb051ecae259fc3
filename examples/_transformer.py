"""A one-layer character transformer in plain JAX (pre-norm, causal multi-head attention, a GELU
MLP), written with one-hot matmuls instead of gathers so every piece lowers to plain matmuls,
softmax and layer norms on every target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

from ._text import VOCAB

D_MODEL, HEADS, CONTEXT, D_MLP = 32, 2, 32, 64


def init_params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)

  def dense(n_in: int, n_out: int) -> np.ndarray:
    return (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

  ones, zeros = np.ones(D_MODEL, np.float32), np.zeros(D_MODEL, np.float32)
  return {
      "embed": (0.1 * rng.normal(size=(VOCAB, D_MODEL))).astype(np.float32),
      "pos": (0.1 * rng.normal(size=(CONTEXT, D_MODEL))).astype(np.float32),
      "ln1_scale": ones, "ln1_bias": zeros,
      "qkv": dense(D_MODEL, 3 * D_MODEL), "proj": dense(D_MODEL, D_MODEL),
      "ln2_scale": ones.copy(), "ln2_bias": zeros.copy(),
      "mlp_in": dense(D_MODEL, D_MLP), "mlp_out": dense(D_MLP, D_MODEL),
      "lnf_scale": ones.copy(), "lnf_bias": zeros.copy(),
      "unembed": dense(D_MODEL, VOCAB), "unembed_bias": np.zeros(VOCAB, np.float32),
  }


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """``(x - mean) / sqrt(var + 1e-5) * scale + bias`` over the last axis."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def attention(p: dict, x: jax.Array) -> jax.Array:
  """Causal multi-head self-attention of ``x`` [B, T, D]:
  ``softmax(q k^T / sqrt(d_head) + mask) v`` per head, then the output projection."""
  b, t, _ = x.shape
  d_head = D_MODEL // HEADS
  q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
  q, k, v = (a.reshape(b, t, HEADS, d_head) for a in (q, k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(d_head))
  causal = np.tril(np.ones((t, t), bool))  # a constant: query i sees keys 0..i
  scores = jnp.where(causal, scores, np.float32(-1e9))
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, D_MODEL)
  return out @ p["proj"]


def logits(p: dict, tokens: jax.Array) -> jax.Array:
  """Next-character logits [B, T, VOCAB] for ``tokens`` int32 [B, T]."""
  x = jax.nn.one_hot(tokens, VOCAB, dtype=jnp.float32) @ p["embed"] + p["pos"][:tokens.shape[1]]
  x = x + attention(p, layer_norm(x, p["ln1_scale"], p["ln1_bias"]))
  h = jax.nn.gelu(layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["mlp_in"])
  x = x + h @ p["mlp_out"]
  return layer_norm(x, p["lnf_scale"], p["lnf_bias"]) @ p["unembed"] + p["unembed_bias"]


def window_losses(p: dict, windows: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats) of each window [B] of windows int32
  [B, CONTEXT + 1]: the first ``CONTEXT`` characters predict the last ``CONTEXT``."""
  inputs, targets = windows[:, :-1], windows[:, 1:]
  log_probs = jax.nn.log_softmax(logits(p, inputs))
  return -jnp.mean(jnp.sum(log_probs * jax.nn.one_hot(targets, VOCAB, dtype=jnp.float32), -1), -1)


def loss(p: dict, windows: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats) over windows int32 [B, CONTEXT + 1]."""
  return jnp.mean(window_losses(p, windows))


def masked_loss(p: dict, windows: jax.Array, mask: jax.Array) -> jax.Array:
  """``loss`` over the real windows of a batch (``mask`` bool [B]):
  ``sum(mask * loss_j) / max(sum(mask), 1)``."""
  real = mask.astype(jnp.float32)
  return jnp.sum(real * window_losses(p, windows)) / jnp.maximum(jnp.sum(real), 1.0)


def sgd_epoch(p: dict, data: fb.Ragged, lr: float) -> tuple[dict, jax.Array]:
  """One pass of SGD over a client's own batches of windows (inside ``fb.map``; ``data`` its
  ``fb.Ragged`` of ``{"tokens": [L, CONTEXT + 1]}``), as ``fb.fold``. Returns the trained params
  and the epoch's training loss: the mean over the client's windows of each one's loss before
  its batch's step (0 for a client with none)."""

  def step(carry, batch, mask):
    p, total = carry
    value, g = jax.value_and_grad(masked_loss)(p, batch["tokens"], mask)
    p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
    return p, total + value * jnp.sum(mask.astype(jnp.float32))

  trained, total = fb.fold(step, (p, jnp.zeros((), jnp.float32)), data)
  return trained, total / jnp.maximum(data.count.astype(jnp.float32), 1.0)

"""A causal pre-norm transformer at any size, with Megatron-style weight sharding over a ``model`` mesh axis.

One definition for two users: the small model of the model-axes tests (``tests/_model_sharding_worker.py``:
4 layers, d=128) and the benchmark's big-model round (``benchmarks/big_model.py``: 100M+ parameters). The
size is data (a ``Transformer``), the math and the sharding are written once here.

Megatron-style: a layer's first matmuls split their columns over ``model`` (heads, hidden units), its
second ones their rows, so a layer needs one all-reduce forward; norms and embeddings are replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

P = jax.sharding.PartitionSpec
MEGATRON = {"wq": P(None, "model"), "wk": P(None, "model"), "wv": P(None, "model"),
            "wo": P("model", None), "w_in": P(None, "model"), "w_out": P("model", None)}


@dataclasses.dataclass(frozen=True)
class Transformer:
  """The shape of the model and of one client's data: ``batch`` windows of ``t`` + 1 tokens."""

  layers: int
  d: int
  heads: int
  f: int
  t: int
  vocab: int
  batch: int

  def params(self, rng: np.random.Generator) -> dict:
    """Normal weights scaled by 1/sqrt(fan-in), unit norm scales, float32."""
    def dense(n_in, n_out):
      return (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    d, f = self.d, self.f
    layers = [{"ln": np.ones(d, np.float32), "wq": dense(d, d), "wk": dense(d, d), "wv": dense(d, d),
               "wo": dense(d, d), "ln2": np.ones(d, np.float32), "w_in": dense(d, f),
               "w_out": dense(f, d)} for _ in range(self.layers)]
    return {"embed": (0.1 * rng.normal(size=(self.vocab, d))).astype(np.float32), "layers": layers,
            "unembed": dense(d, self.vocab)}

  def num_params(self) -> int:
    """Parameters, counted from the shapes (no weights are made)."""
    per_layer = 4 * self.d * self.d + 2 * self.d * self.f + 2 * self.d
    return self.layers * per_layer + 2 * self.vocab * self.d

  def data(self, rng: np.random.Generator, clients: int) -> np.ndarray:
    """Token windows, int32 ``[clients, batch, t + 1]``."""
    return rng.integers(0, self.vocab, size=(clients, self.batch, self.t + 1)).astype(np.int32)

  def loss(self, p: dict, windows: jax.Array) -> jax.Array:
    """Next-token cross-entropy of windows int32 [B, T + 1]."""
    tokens, targets = windows[:, :-1], windows[:, 1:]
    b, t = tokens.shape
    d, heads = self.d, self.heads
    x = jax.nn.one_hot(tokens, self.vocab, dtype=jnp.float32) @ p["embed"]
    causal = np.tril(np.ones((t, t), bool))
    for layer in p["layers"]:
      h = _norm(x, layer["ln"])
      q, k, v = (jnp.reshape(h @ layer[w], (b, t, heads, d // heads)) for w in ("wq", "wk", "wv"))
      scores = jnp.where(causal, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), -1e9)
      attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, d)
      x = x + attn @ layer["wo"]
      x = x + jax.nn.gelu(_norm(x, layer["ln2"]) @ layer["w_in"]) @ layer["w_out"]
    log_probs = jax.nn.log_softmax(x @ p["unembed"])
    return -jnp.mean(jnp.sum(log_probs * jax.nn.one_hot(targets, self.vocab, dtype=jnp.float32), -1))


def megatron_specs(params: dict) -> dict:
  """Each leaf's PartitionSpec: the Megatron split of the layers' matmuls, the rest replicated."""
  def spec(path, _):
    name = getattr(path[-1], "key", None)
    return MEGATRON.get(name, P())
  return jax.tree_util.tree_map_with_path(spec, params)


def _norm(x, scale):
  x = x - jnp.mean(x, -1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * scale

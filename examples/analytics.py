"""Federated analytics on digits: how much ink the clients' handwritten digits carry.

Each client holds the ink of all of its digits (an image's mean pixel intensity, in [0, 1]): its real
Dirichlet label-skew share, from a handful of digits to hundreds (an ``fb.Ragged``; a client reads
its own values in batches with ``fb.fold``). In one round, without any client revealing a value:

- mean: ``fb.weighted_mean`` of the clients' means weighted by their counts (the pooled mean);
- histogram: per-client counts in ``BINS`` equal bins over ``[LO, HI)`` (values outside go to the
  edge bins), summed with ``fb.secure_sum(bitwidth=16)``: the server learns only the total counts,
  which stay below 2^16 for up to 65,535 values in all (digits' train split has 1,438);
- range: ``fb.max`` of the clients' maxima and ``fb.min`` of their minima;
- quantiles: the server reads the quantiles at ``levels`` off the summed histogram, interpolating
  linearly within a bin (the CDF as a piecewise-linear function), so the estimate is within one bin
  width (``(HI - LO) / BINS``) of the pooled data's quantile when no value lies outside the range.

Run ``python -m examples.analytics`` to compare the federated answers with the pooled data's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

from . import _cli, _data

CLIENTS, BATCH_SIZE = 8, 32  # example_inputs: 8 clients holding 1 to 562 values, padded to 576
BINS, LO, HI = 20, 0.1, 0.5  # the histogram's bins over [LO, HI): 0.02 wide
BITWIDTH = 16
LEVELS = (0.1, 0.5, 0.9)


def bin_counts(values: jax.Array, mask: jax.Array) -> jax.Array:
  """int32 [BINS]: how many of the real ``values`` (``mask``) fall in each bin (edges clipped)."""
  bins = jnp.clip(jnp.floor((values - LO) * (BINS / (HI - LO))).astype(jnp.int32), 0, BINS - 1)
  hits = (bins[:, None] == jnp.arange(BINS, dtype=jnp.int32)) & mask[:, None]
  return jnp.sum(hits.astype(jnp.int32), axis=0)


def client_stats(values: fb.Ragged):
  """One client's mean, bin counts (int32 [BINS]), max and min of its own values: one pass over
  its batches (``fb.fold``). A client with none: mean 0, no counts, max -inf, min inf."""

  def step(carry, batch, mask):
    total, counts, high, low = carry
    return (total + jnp.sum(jnp.where(mask, batch, 0.0)), counts + bin_counts(batch, mask),
            jnp.maximum(high, jnp.max(jnp.where(mask, batch, -jnp.inf))),
            jnp.minimum(low, jnp.min(jnp.where(mask, batch, jnp.inf))))

  f32 = lambda v: jnp.asarray(v, jnp.float32)
  init = (f32(0.0), jnp.zeros(BINS, jnp.int32), f32(-jnp.inf), f32(jnp.inf))
  total, counts, high, low = fb.fold(step, init, values)
  return total / jnp.maximum(values.count.astype(jnp.float32), 1.0), counts, high, low


def histogram_quantiles(counts, levels):
  """Quantiles at ``levels`` [Q] of a histogram ``counts`` [BINS] over [LO, HI).

  With C_k the count below bin k, h_k bin k's count and N the total, the level-q quantile is
  ``LO + width * sum_k clip((q N - C_k) / h_k, 0, 1)``: full bins below q N count whole, the bin
  holding q N counts the fraction of it needed (an empty bin counts whole iff it lies below q N).
  """
  h = counts.astype(jnp.float32)
  below = jnp.cumsum(h) - h
  need = levels[:, None] * jnp.sum(h) - below[None, :]  # [Q, BINS]
  frac = jnp.where(h > 0, need / jnp.where(h > 0, h, 1.0), (need > 0).astype(jnp.float32))
  return LO + (HI - LO) / BINS * jnp.sum(jnp.clip(frac, 0.0, 1.0), axis=1)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def analytics(levels, values):
  """``levels`` [Q] at the server, ``values`` each client's own values (an ``fb.Ragged``) -> mean,
  histogram (a secure sum), max, min and the quantile estimates at ``levels``."""
  means, counts, highs, lows = fb.map(client_stats, values)
  histogram = fb.secure_sum(counts, bitwidth=BITWIDTH)
  return {"mean": fb.weighted_mean(means, values.count), "histogram": histogram, "max": fb.max(highs),
          "min": fb.min(lows), "quantiles": histogram_quantiles(histogram, levels)}


computation = analytics


def client_ink(clients: int = CLIENTS, seed: int = 0) -> fb.Ragged:
  """The ink of every digit each client holds (the digits clients of ``_data.example_clients``:
  Dirichlet label skew, padded to 576), in batches of ``BATCH_SIZE``."""
  digits = _data.example_clients(clients, batch_size=BATCH_SIZE, seed=seed)
  return fb.Ragged(digits.examples["x"].mean(axis=-1), digits.count, BATCH_SIZE)


def pooled(values: fb.Ragged) -> np.ndarray:
  """Every client's real values in one array (what the federated answers estimate)."""
  x, count = np.asarray(values.examples), np.asarray(values.count)
  return np.concatenate([x[i, :m] for i, m in enumerate(count)])


def example_inputs(clients: int = CLIENTS) -> tuple[np.ndarray, fb.Ragged]:
  return np.asarray(LEVELS, np.float32), client_ink(clients)


def main(clients: int = 32, log=print) -> dict:
  """The federated answers on ``clients`` clients next to the pooled data's (numpy); returns both."""
  levels, ink = example_inputs(clients)
  result = {k: np.asarray(v) for k, v in analytics(levels, ink).items()}
  values = pooled(ink)
  exact = {"mean": values.mean(), "max": values.max(), "min": values.min(),
           "quantiles": np.quantile(values, levels)}
  if log:
    counts = np.asarray(ink.count)
    log(f"{clients} clients holding {counts.min()} to {counts.max()} digits ({counts.sum()} in all):"
        " federated vs pooled data")
    for key in ("mean", "max", "min"):
      log(f"  {key:10s} {float(result[key]):.4f}  {float(exact[key]):.4f}")
    for q, got, want in zip(levels, result["quantiles"], exact["quantiles"]):
      log(f"  q{q:.1f}       {got:.4f}  {want:.4f}   (bin width {(HI - LO) / BINS:.3f})")
    log(f"  histogram  {result['histogram'].tolist()} (secure sum, bitwidth {BITWIDTH})")
  return {"federated": result, "pooled": exact}


if __name__ == "__main__":
  _cli.run(main)

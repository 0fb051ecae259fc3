"""Federated analytics on digits: how much ink the clients' handwritten digits carry.

Each client holds the ink of some of its digits (an image's mean pixel intensity, in [0, 1]). In one
round, without any client revealing a value:

- mean: ``fb.mean`` of the clients' means (every client holds the same number of values, so this is
  the pooled mean);
- histogram: per-client counts in ``BINS`` equal bins over ``[LO, HI)`` (values outside go to the
  edge bins), summed with ``fb.secure_sum(bitwidth=16)``: the server learns only the total counts,
  which stay below 2^16 for up to 65,535 values in all;
- range: ``fb.max`` of the clients' maxima and ``fb.min`` of their minima;
- quantiles: the server reads the quantiles at ``levels`` off the summed histogram, interpolating
  linearly within a bin (the CDF as a piecewise-linear function), so the estimate is within one bin
  width (``(HI - LO) / BINS``) of the pooled data's quantile when no value lies outside the range.

Run ``python -m examples.analytics`` to compare the federated answers with the pooled data's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import faxbridge as fb

from . import _cli, _data

CLIENTS, VALUES = 8, 32  # clients and ink values per client in example_inputs
BINS, LO, HI = 20, 0.1, 0.5  # the histogram's bins over [LO, HI): 0.02 wide
BITWIDTH = 16
LEVELS = (0.1, 0.5, 0.9)


def client_stats(values):
  """One client's mean, bin counts (int32 [BINS]), max and min of its values [n]."""
  bins = jnp.clip(jnp.floor((values - LO) * (BINS / (HI - LO))).astype(jnp.int32), 0, BINS - 1)
  counts = jnp.sum((bins[:, None] == jnp.arange(BINS, dtype=jnp.int32)).astype(jnp.int32), axis=0)
  return jnp.mean(values), counts, jnp.max(values), jnp.min(values)


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
  """``levels`` [Q] at the server, ``values`` [n] per client -> mean, histogram (a secure sum),
  max, min and the quantile estimates at ``levels``."""
  means, counts, highs, lows = fb.map(client_stats, values)
  histogram = fb.secure_sum(counts, bitwidth=BITWIDTH)
  return {"mean": fb.mean(means), "histogram": histogram, "max": fb.max(highs),
          "min": fb.min(lows), "quantiles": histogram_quantiles(histogram, levels)}


computation = analytics


def client_ink(clients: int = CLIENTS, values: int = VALUES, seed: int = 0) -> np.ndarray:
  """[clients, values] float32: the ink of ``values`` digits of each client's (Dirichlet(0.5)
  label-skewed) share of the digits train split."""
  data, _ = _data.digits_clients(clients, batches=1, batch_size=values, seed=seed)
  return data["x"][:, 0].mean(axis=-1)


def example_inputs(clients: int = CLIENTS) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(LEVELS, np.float32), client_ink(clients)


def main(clients: int = 32, log=print) -> dict:
  """The federated answers on ``clients`` clients next to the pooled data's (numpy); returns both."""
  levels, ink = example_inputs(clients)
  result = {k: np.asarray(v) for k, v in analytics(levels, ink).items()}
  pooled = ink.reshape(-1)
  exact = {"mean": pooled.mean(), "max": pooled.max(), "min": pooled.min(),
           "quantiles": np.quantile(pooled, levels)}
  if log:
    log(f"{clients} clients, {ink.shape[1]} digits each: federated vs pooled data")
    for key in ("mean", "max", "min"):
      log(f"  {key:10s} {float(result[key]):.4f}  {float(exact[key]):.4f}")
    for q, got, want in zip(levels, result["quantiles"], exact["quantiles"]):
      log(f"  q{q:.1f}       {got:.4f}  {want:.4f}   (bin width {(HI - LO) / BINS:.3f})")
    log(f"  histogram  {result['histogram'].tolist()} (secure sum, bitwidth {BITWIDTH})")
  return {"federated": result, "pooled": exact}


if __name__ == "__main__":
  _cli.run(main)

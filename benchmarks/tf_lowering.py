"""Lowering time of the tf converter against the number of jaxpr equations (not a test).

Builds straight-line jaxprs of ~1k and ~10k equations (a chain of elementwise ops, reshapes and
small matmuls, like an unrolled training step), lowers each with ``lower_jaxpr`` into a TF1 graph,
and writes ``benchmarks/results/tf_lowering.md`` (a table) and ``tf_lowering.png`` (a plot).
Run: ``.venv/bin/python benchmarks/tf_lowering.py``.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge.converters.tf as fbtf

OUT = pathlib.Path(__file__).resolve().parent / "results"


def program(blocks: int):
  """A function whose jaxpr has about 10 equations per block."""
  def f(x, w):
    for _ in range(blocks):
      h = jnp.tanh(x @ w) * 0.5 + x
      x = jnp.where(h > 0, h, 0.1 * h) - h.mean() / (1.0 + jnp.abs(h).max())
    return x
  return f


def measure(target_eqns: int, repeats: int = 3) -> tuple[int, float, int]:
  blocks = max(1, target_eqns // 12)
  x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  closed = jax.make_jaxpr(program(blocks))(x, w)
  n = len(closed.jaxpr.eqns)
  best = np.inf
  nodes = 0
  for _ in range(repeats):
    start = time.perf_counter()
    graph = fbtf.lower_jaxpr(closed, ["x", "w"], ["y"])
    best = min(best, time.perf_counter() - start)
    nodes = len(graph.as_graph_def().node)
  return n, best, nodes


def main() -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  rows = [measure(t) for t in (1000, 2000, 5000, 10000)]
  lines = ["# tf converter: lowering time vs jaxpr size", "",
           "`lower_jaxpr` into a fresh tf.Graph, best of 3 (`benchmarks/tf_lowering.py`).", "",
           "| equations | TF nodes | seconds | microseconds / equation |", "|---|---|---|---|"]
  for n, s, nodes in rows:
    lines.append(f"| {n} | {nodes} | {s:.3f} | {1e6 * s / n:.0f} |")
  (OUT / "tf_lowering.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-")
  ax.set_xlabel("jaxpr equations")
  ax.set_ylabel("lowering time (s)")
  ax.set_title("faxbridge tf converter")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(OUT / "tf_lowering.png", dpi=120)


if __name__ == "__main__":
  main()

"""What ``fb.export`` costs: time, peak memory and bytes written, against model size and jaxpr size.

Two families of programs, both FedAvg-shaped (broadcast, client work, mean, server update):

* ``params``: SERVER parameters of 0.1M .. 100M float32 (four leaves), a small client step; the
  parameters are inputs (``jax.ShapeDtypeStruct``, no array is ever made), so the files written
  stay small whatever the size: nothing is embedded as a constant.
* ``eqns``: client work that is a straight chain of elementwise operations (a Python loop,
  unrolled), about 1k or 10k equations in the traced jaxpr.

Each (case, target) runs in a fresh process: ``ru_maxrss`` after the imports (baseline) and after
the export (peak).

  .venv/bin/python benchmarks/export_cost.py one --kind params --size 1000000 --target tff

prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import faxbridge as fb  # noqa: E402

CLIENTS = 4


def params_program(size: int):
  """Parameters of ``size`` float32 in four equal leaves; each client moves them towards the mean
  of its data: ``p_new = p + mean_c(0.1 * (mean(x_c) - p))``."""
  leaf = max(1, size // 4)
  params = {f"w{i}": jax.ShapeDtypeStruct((leaf,), jnp.float32) for i in range(4)}
  data = jax.ShapeDtypeStruct((CLIENTS, 8), jnp.float32)

  def client(p, x):
    return jax.tree.map(lambda w: 0.1 * (jnp.mean(x) - w), p)

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def step(p, x):
    return jax.tree.map(jnp.add, p, fb.mean(fb.map(client, fb.broadcast(p), x)))

  return step, (params, data)


def eqns_program(eqns: int):
  """Client work of about ``eqns`` elementwise equations (three per unrolled step)."""
  w = jax.ShapeDtypeStruct((16,), jnp.float32)
  data = jax.ShapeDtypeStruct((CLIENTS, 16), jnp.float32)

  def client(w, x):
    h = w + x
    for i in range(max(1, eqns // 3)):
      h = jnp.tanh(h) * (0.5 + 1e-4 * (i % 7)) + x
    return h

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def step(w, x):
    return w + fb.mean(fb.map(client, fb.broadcast(w), x))

  return step, (w, data)


def count_eqns(comp, args) -> int:
  """Equations of the traced computation, those of the client work (sub-jaxprs) included."""

  def walk(jaxpr) -> int:
    n = len(jaxpr.eqns)
    for eqn in jaxpr.eqns:
      for v in eqn.params.values():
        sub = getattr(v, "jaxpr", v)
        if hasattr(sub, "eqns"):
          n += walk(sub)
    return n

  return walk(comp.trace(*args).jaxpr.jaxpr)


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one(kind: str, size: int, target: str) -> dict:
  comp, args = (params_program if kind == "params" else eqns_program)(size)
  eqns = count_eqns(comp, args)
  if target in ("tff", "tflite"):
    import tensorflow  # noqa: F401 - imported before the baseline, as any exporting process has it
  baseline = _maxrss_mb()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    out = fb.export(comp, *args, target=target, out_dir=Path(tmp) / "out")
    seconds = time.perf_counter() - start
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  peak = _maxrss_mb()
  return {"kind": kind, "size": size, "target": target, "eqns": eqns, "export_s": seconds,
          "baseline_mb": baseline, "peak_mb": peak, "delta_mb": peak - baseline,
          "bytes_written": written, "param_bytes": 4 * size if kind == "params" else 64}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=["one"])
  parser.add_argument("--kind", choices=["params", "eqns"], required=True)
  parser.add_argument("--size", type=int, required=True)
  parser.add_argument("--target", default="tff")
  ns = parser.parse_args()
  print(json.dumps(one(ns.kind, ns.size, ns.target)))


if __name__ == "__main__":
  np.seterr(all="ignore")
  main()

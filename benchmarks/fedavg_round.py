"""One FedAvg round over 128 clients: faxbridge native vs hand-written ``jax.jit`` + ``vmap`` vs
TFF 0.87 executing faxbridge's export, measured side by side in one run.

  .venv/bin/python benchmarks/fedavg_round.py [--clients 128] [--repeats 30]

Writes ``benchmarks/results/fedavg_round.md`` (a table) and ``fedavg_round.png`` (a plot). The
machine is shared and noisy: quote the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _median_ms(fn, repeats: int) -> tuple[float, float]:
  import jax
  import numpy as np

  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3), float(np.percentile(times, 90) * 1e3)


def measure_in_process(clients: int, repeats: int) -> dict[str, tuple[float, float]]:
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(ROOT))
  from examples import fedavg

  params, data = fedavg.example_inputs(clients)
  data = jax.device_put(data)
  params = jax.device_put(params)

  @jax.jit
  def handwritten(params, data):
    deltas, weights, losses = jax.vmap(fedavg.client_update, in_axes=(None, 0))(params, data)
    mean = jax.tree.map(lambda d: jnp.tensordot(weights, d, 1) / jnp.sum(weights), deltas)
    return jax.tree.map(jnp.add, params, mean), jnp.mean(losses)

  return {
      "faxbridge native": _median_ms(lambda: fedavg.fedavg_round(params, data), repeats),
      "jax.jit + vmap (hand-written)": _median_ms(lambda: handwritten(params, data), repeats),
  }


def measure_tff(clients: int, rounds: int) -> tuple[float, float]:
  """Median per-round time of TFF's native context running faxbridge's export of the process."""
  import numpy as np

  sys.path.insert(0, str(ROOT))
  import faxbridge as fb
  from examples import fedavg
  from faxbridge.converters.runtimes.tff import run_computation
  from faxbridge.export import read_manifest

  _, data = fedavg.example_inputs(clients)
  with tempfile.TemporaryDirectory() as tmp:
    out = fb.export(fedavg.process, data, target="tff", out_dir=Path(tmp) / "fedavg")
    block = read_manifest(out)["next"]
    import jax

    inputs = {s["name"]: np.asarray(v) for s, v in zip(block["inputs"], jax.tree.leaves(data))}
    run = run_computation(out, inputs, rounds=rounds)
  per_round = run.timings["round_s"][1:]  # round 1 starts TFF's worker and compiles
  return float(np.median(per_round) * 1e3), float(np.percentile(per_round, 90) * 1e3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--clients", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--tff-rounds", type=int, default=12)
  ns = parser.parse_args()

  rows = measure_in_process(ns.clients, ns.repeats)
  # Two host devices (one per core) with the clients axis split over them: a separate process,
  # since XLA reads the device count when JAX starts.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  done = subprocess.run([sys.executable, __file__, "--sharded-child", str(ns.clients),
                         str(ns.repeats)], env=env, capture_output=True, text=True, check=True)
  median, p90 = map(float, done.stdout.split()[-2:])
  rows["faxbridge native, clients sharded over 2 CPU devices"] = (median, p90)
  rows["TFF 0.87 (faxbridge export, native context)"] = measure_tff(ns.clients, ns.tff_rounds)

  base = rows["jax.jit + vmap (hand-written)"][0]
  RESULTS.mkdir(parents=True, exist_ok=True)
  lines = [f"# FedAvg round, {ns.clients} clients (MLP, 3 local SGD steps of 16 examples)", "",
           "| implementation | median ms | p90 ms | vs jit+vmap |", "|---|---:|---:|---:|"]
  for name, (median, p90) in rows.items():
    lines.append(f"| {name} | {median:.2f} | {p90:.2f} | {base / median:.2f}x |")
  table = "\n".join(lines) + "\n"
  (RESULTS / "fedavg_round.md").write_text(table)
  print(table)

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3))
  names = list(rows)
  ax.barh(names, [rows[n][0] for n in names], xerr=[rows[n][1] - rows[n][0] for n in names])
  ax.set_xlabel("ms per round (median, error bar to p90)")
  ax.set_title(f"FedAvg round, {ns.clients} clients")
  fig.tight_layout()
  fig.savefig(RESULTS / "fedavg_round.png", dpi=120)


def _sharded_child(clients: int, repeats: int) -> None:
  import jax

  sys.path.insert(0, str(ROOT))
  from examples import fedavg

  params, data = fedavg.example_inputs(clients)
  mesh = jax.make_mesh((2,), ("clients",))
  with jax.set_mesh(mesh):
    median, p90 = _median_ms(lambda: fedavg.fedavg_round(params, data), repeats)
  print(median, p90)


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--sharded-child":
    _sharded_child(int(sys.argv[2]), int(sys.argv[3]))
  else:
    main()

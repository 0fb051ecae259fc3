"""The big-model round (issue 20): FedAvg of a 100M+ parameter transformer on a (``clients``, ``model``)
device mesh, Megatron-style weight sharding, by faxbridge (both execution strategies) and drjax.

The model and its sharding are ``benchmarks/transformer_model.py``; the rounds, written once for one
client, are the model-axes tests' own (``tests/_model_sharding_worker.py``: ``faxbridge_round``,
``drjax_round``, 8 clients, one local SGD step each, the mean of the clients' weights), so the benchmark
measures the programs the tests prove equal to plain JAX. Per implementation: the compiled per-device
memory (``memory_analysis``: arguments, outputs, temporaries and their total), the first call (compile)
and the median of interleaved timed rounds; the values of all three agree (max abs difference to
faxbridge vmap).

On CPU it runs on 8 host devices (``--xla_force_host_platform_device_count=8``, set here before JAX
starts) as a 2 x 4 mesh; on one accelerator, a 1 x 1 mesh. Prints one JSON object on its last line.

  .venv/bin/python benchmarks/big_model.py                      # 8 layers, d=1024: 100.7M parameters
  .venv/bin/python benchmarks/big_model.py --layers 2 --d 64 --f 256 --heads 4 --repeats 1   # tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import _model_sharding_worker as rounds  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.transformer_model import Transformer, megatron_specs  # noqa: E402

P = jax.sharding.PartitionSpec
NS = jax.sharding.NamedSharding
# The target: 100M+ parameters. 8 layers of d=1024, 16 heads, f=4096 (100.7M); per client 2
# windows of 2 tokens, as the tests' transformer (the weights dominate, as in a large-model round).
DEFAULT = Transformer(layers=8, d=1024, heads=16, f=4096, t=2, vocab=32, batch=2)
IMPLS = {"faxbridge vmap": "vmap", "faxbridge stream": "stream", "drjax": None}


def default_mesh_shape() -> dict:
  n = len(jax.devices())
  if n == 8:
    return {"clients": 2, "model": 4}
  return {"clients": 1, "model": n}


def memory(exe) -> dict:
  """One device's share, from the compiled program: arguments, outputs, temporaries, and ``total``,
  what they take if all live at once (an upper bound of the peak; ``xla_peak``: XLA's own figure, which
  on CPU leaves out temporaries)."""
  m = exe.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
         "xla_peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def build(name: str, loss, mesh):
  strategy = IMPLS[name]
  if strategy is None:
    return rounds.drjax_round(loss, mesh)
  return rounds.faxbridge_round(loss, mesh, strategy)


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(model: Transformer, shape: dict, names: list[str], repeats: int) -> dict:
  mesh = rounds.mesh_of(shape)
  rng = np.random.default_rng(0)
  params = model.params(rng)
  data = model.data(rng, rounds.CLIENTS)
  w = jax.device_put(params, jax.tree.map(lambda s: NS(mesh, s), megatron_specs(params)))
  x = jax.device_put(data, NS(mesh, P("clients")))
  del params
  out: dict = {"model": dataclasses.asdict(model) | {"parameters": model.num_params()}, "mesh": shape,
               "clients": rounds.CLIENTS, "platform": jax.devices()[0].platform,
               "device_kind": jax.devices()[0].device_kind, "shard_bytes": rounds.shard_bytes(w, x),
               "impls": {}}
  exes, results = {}, {}
  for name in names:
    fn = build(name, model.loss, mesh)
    # All three compile with the mesh set (drjax reads the ambient mesh where it is not given one;
    # faxbridge is given its mesh as well).
    with jax.set_mesh(mesh):
      start = time.perf_counter()
      exe = jax.jit(fn).lower(w, x).compile()
      compile_s = time.perf_counter() - start
    start = time.perf_counter()
    results[name] = jax.block_until_ready(exe(w, x))
    row = {"compile_s": compile_s, "first_run_s": time.perf_counter() - start,
           "memory": memory(exe), "out_specs": sorted(set(rounds.specs(results[name])))}
    if IMPLS[name] is not None:
      row["strategy"] = str(fn.strategy_for(w, x))
    out["impls"][name] = row
    exes[name] = exe
  times: dict[str, list[float]] = {n: [] for n in names}
  for _ in range(repeats):
    for name, exe in exes.items():
      start = time.perf_counter()
      jax.block_until_ready(exe(w, x))
      times[name].append(time.perf_counter() - start)
  first = names[0]
  for name in names:
    row = out["impls"][name]
    row.update(median_s=statistics.median(times[name]), min_s=min(times[name]), runs=len(times[name]),
               max_abs_diff_vs=[first, max_diff(results[name], results[first])])
  out["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  for field in ("layers", "d", "heads", "f", "t", "vocab", "batch"):
    parser.add_argument(f"--{field}", type=int, default=getattr(DEFAULT, field))
  parser.add_argument("--mesh", help="clients x model, e.g. 2x4 (default: 2x4 on 8 devices, else 1xN)")
  parser.add_argument("--impl", action="append", choices=list(IMPLS), help="repeatable; default all")
  parser.add_argument("--repeats", type=int, default=3)
  ns = parser.parse_args(argv)
  model = Transformer(**{f: getattr(ns, f) for f in ("layers", "d", "heads", "f", "t", "vocab", "batch")})
  shape = default_mesh_shape()
  if ns.mesh:
    c, m = (int(v) for v in ns.mesh.lower().split("x"))
    shape = {"clients": c, "model": m}
  print(json.dumps(run(model, shape, ns.impl or list(IMPLS), ns.repeats)))


if __name__ == "__main__":
  main()

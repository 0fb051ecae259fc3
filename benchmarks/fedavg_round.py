"""One FedAvg round (``benchmarks/_fedavg_model.py``) executed natively by several JAX programs.

Implementations (``impls``): faxbridge with each execution strategy, hand-written ``jax.jit`` +
``vmap``, ``jax.jit`` + ``lax.map``, the hand-written streaming round (``scan of vmap blocks``: a
jitted ``lax.scan`` over blocks of 8 clients, ``vmap`` inside) and drjax. Each is built for one
number of clients and called as ``fn(params, data) -> new params``. Two modes, each run in its
own process by ``run.py``:

* ``time``: every implementation compiled once, then timed round-robin (interleaved), so noise on
  the shared machine hits all alike; a per-run time budget caps the repeats at large sizes.
* ``memory``: one implementation in a fresh process: ``ru_maxrss`` after the data is made
  (baseline) and after compile + one round (peak).
* ``huge``: one implementation at many clients (100,000) in a fresh process: time and memory together.
* ``export`` and ``peers``: the inputs of the TFF rounds (``tff_round.py``) and of pfl's and Flower's
  (``pfl_round.py``, ``flower_round.py``), with the reference round's result.

  .venv/bin/python benchmarks/fedavg_round.py time --clients 128 --repeats 5
  .venv/bin/python benchmarks/fedavg_round.py memory --clients 128 --impl "jit+vmap"

Each prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _fedavg_model as model  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import faxbridge as fb  # noqa: E402


def strategies() -> list:
  """The execution strategies this faxbridge offers (``[None]``: no ``strategy`` argument yet)."""
  if "strategy" not in inspect.signature(fb.computation).parameters:
    return [None]
  return ["auto", "vmap", "stream"]


def _strategy_label(strategy) -> str:
  return "faxbridge" if strategy is None else f"faxbridge {strategy}"


def _mean_update(params, deltas):
  return jax.tree.map(lambda p, d: p + jnp.mean(d, axis=0), params, deltas)


def faxbridge_round(strategy=None) -> fb.Computation:
  """The round as a faxbridge computation (``strategy`` None: faxbridge's default)."""
  kwargs = {} if strategy is None else {"strategy": strategy}

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS), **kwargs)
  def fedavg_round(params, data):
    deltas = fb.map(model.client_update, fb.broadcast(params), data)
    return jax.tree.map(jnp.add, params, fb.mean(deltas))

  return fedavg_round


def jit_vmap() -> Callable:
  return jax.jit(lambda p, d: _mean_update(p, jax.vmap(model.client_update, (None, 0))(p, d)))


def jit_lax_map() -> Callable:
  return jax.jit(lambda p, d: _mean_update(p, jax.lax.map(lambda c: model.client_update(p, c), d)))


STREAM_BLOCK = 8  # clients per block of the hand-written streaming round


def scan_blocks(clients: int, block: int = STREAM_BLOCK) -> Callable:
  """The best hand-written streaming round: a jitted ``lax.scan`` over blocks of ``block`` clients
  with ``vmap`` inside, summing the deltas as it goes (memory of one block), then one more
  ``vmap`` over the last ``clients % block`` clients."""
  full, rest = divmod(clients, block)

  def block_sum(p, d):
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(model.client_update, (None, 0))(p, d))

  def round_(p, d):
    total = jax.tree.map(jnp.zeros_like, p)
    if full:
      blocks = jax.tree.map(lambda x: x[: full * block].reshape(full, block, *x.shape[1:]), d)

      def step(acc, db):
        return jax.tree.map(jnp.add, acc, block_sum(p, db)), None

      total, _ = jax.lax.scan(step, total, blocks)
    if rest:
      total = jax.tree.map(jnp.add, total, block_sum(p, jax.tree.map(lambda x: x[full * block:], d)))
    return jax.tree.map(lambda w, t: w + t / clients, p, total)

  return jax.jit(round_)


def drjax_round(clients: int) -> Callable:
  import logging

  import drjax

  logging.getLogger("absl").setLevel(logging.ERROR)  # "no mesh axis named clients": none is wanted

  @drjax.program(placements={"clients": clients})
  def fedavg_round(params, data):
    # map_fn unpacks a tuple argument into positional arguments.
    deltas = drjax.map_fn(model.client_update, (drjax.broadcast(params), data))
    return jax.tree.map(jnp.add, params, drjax.reduce_mean(deltas))

  return jax.jit(fedavg_round)


def impls(clients: int) -> dict[str, Callable[[], Callable]]:
  """Name -> builder of ``fn(params, data)``; every name is a row of the results."""
  table: dict[str, Callable[[], Callable]] = {}
  for s in strategies():
    table[_strategy_label(s)] = lambda s=s: faxbridge_round(s)
  table["jit+vmap"] = jit_vmap
  table["jit+lax.map"] = jit_lax_map
  table["scan of vmap blocks"] = lambda: scan_blocks(clients)
  table["drjax"] = lambda: drjax_round(clients)
  return table


def auto_choice(fn, params, data) -> str | None:
  """Which strategy ``auto`` picked, where faxbridge says (a ``strategy_for``/``plan`` method)."""
  for attr in ("chosen_strategy", "strategy_for", "plan"):
    method = getattr(fn, attr, None)
    if callable(method):
      try:
        return str(method(params, data))
      except Exception:
        return None
  return None


def _inputs(clients: int):
  return jax.device_put(model.init_params()), jax.device_put(model.client_data(clients))


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def time_mode(clients: int, names: list[str], repeats: int, budget_s: float) -> dict:
  """Compile each, then ``repeats`` round-robin passes (fewer when ``budget_s`` runs out)."""
  params, data = _inputs(clients)
  table = impls(clients)
  fns, compile_s, picked, errors = {}, {}, {}, {}
  for name in names:
    fn = table[name]()
    start = time.perf_counter()
    try:
      jax.block_until_ready(fn(params, data))
    except Exception as e:  # out of memory on an accelerator (jit+vmap at many clients): its row says so
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      continue
    compile_s[name] = time.perf_counter() - start
    fns[name] = fn
    if name.endswith("auto"):
      picked[name] = auto_choice(fn, params, data)
  times: dict[str, list[float]] = {n: [] for n in fns}
  start_all = time.perf_counter()
  for r in range(repeats):
    # Every other pass in reverse order: the one that runs right after another pays for what that
    # one left in the caches, so neither may always come first.
    for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(fn(params, data))
      times[name].append(time.perf_counter() - start)
    if r >= 2 and time.perf_counter() - start_all > budget_s:
      break
  return {"clients": clients, "times_s": times, "first_call_s": compile_s, "auto_picked": picked,
          "errors": errors}


def memory_mode(clients: int, name: str) -> dict:
  params, data = _inputs(clients)
  jax.block_until_ready(data)
  baseline = _maxrss_mb()
  fn = impls(clients)[name]()
  jax.block_until_ready(fn(params, data))
  peak = _maxrss_mb()
  return {"clients": clients, "impl": name, "baseline_mb": baseline, "peak_mb": peak,
          "delta_mb": peak - baseline}


def export_mode(clients: int, out_dir: Path, export_dir: Path | None = None) -> dict:
  """``fb.export`` of the round (to ``export_dir`` unless it exists: an export runs on TFF with
  any number of clients) and the inputs, by manifest name, to ``out_dir/inputs.npz`` (what
  ``benchmarks/tff_round.py`` reads)."""
  from faxbridge._src.export import read_manifest

  params, data = model.init_params(), model.client_data(clients)
  out_dir.mkdir(parents=True, exist_ok=True)
  export = Path(export_dir or out_dir / "export")
  export_s = 0.0
  if not (export / "manifest.json").exists():
    start = time.perf_counter()
    export = fb.export(faxbridge_round(), params, data, target="tff", out_dir=export)
    export_s = time.perf_counter() - start
  entries = read_manifest(export)["computation"]["inputs"]
  args = (params, data)
  np.savez(out_dir / "inputs.npz", **{e["name"]: args[e["path"][0]][e["path"][-1]]
                                      for e in entries})
  return {"clients": clients, "export": str(export), "export_s": export_s}


def huge_mode(clients: int, name: str, repeats: int, budget_s: float) -> dict:
  """One implementation at many clients in a fresh process (``run.py``'s 100,000-client round): the
  data made and put on the device (its host copy dropped), then compile + one round, then timed rounds
  (at least one, more while ``budget_s`` lasts). Memory is this process's resident set sampled while
  the rounds run (``peer_io.PeakMemory``: ``ru_maxrss`` would keep the moment the data existed twice):
  ``baseline_mb`` before compiling, ``peak_mb`` the most during the rounds. ``xla_temp_mb``: the
  compiled round's temporaries (``memory_analysis``, compiled again after the timed rounds), which
  unlike the resident set do not move with the allocator's and the OS's bookkeeping."""
  import gc

  import peer_io

  data = model.client_data(clients)
  data_mb = sum(v.nbytes for v in data.values()) / 2**20
  params, data = jax.device_put(model.init_params()), jax.block_until_ready(jax.device_put(data))
  gc.collect()
  fn = impls(clients)[name]()
  times: list[float] = []
  with peer_io.PeakMemory() as mem:
    start = time.perf_counter()
    jax.block_until_ready(fn(params, data))
    first = time.perf_counter() - start
    start_all = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start_all < budget_s):
      start = time.perf_counter()
      jax.block_until_ready(fn(params, data))
      times.append(time.perf_counter() - start)
  out = {"clients": clients, "impl": name, "data_mb": data_mb, "baseline_mb": mem.baseline_mb,
         "peak_mb": mem.peak_mb, "delta_mb": mem.peak_mb - mem.baseline_mb, "first_call_s": first,
         "times_s": times, "process_maxrss_mb": _maxrss_mb()}
  compiled = jax.jit(fn).lower(params, data).compile()
  out["xla_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  if name.endswith("auto"):
    out["auto_picked"] = auto_choice(fn, params, data)
  return out


def peers_mode(clients: int, out_dir: Path) -> dict:
  """The inputs of the peers' rounds (``pfl_round.py``, ``flower_round.py``; read by
  ``benchmarks/peer_io.py``): the model, the clients' data and the reference round's result."""
  params, data = model.init_params(), model.client_data(clients)
  out_dir.mkdir(parents=True, exist_ok=True)
  np.savez(out_dir / "params.npz", **params)
  np.save(out_dir / "x.npy", data["x"])
  np.save(out_dir / "y.npy", data["y"])
  start = time.perf_counter()
  np.savez(out_dir / "reference.npz", **model.reference_round(params, data))
  return {"clients": clients, "inputs": str(out_dir), "reference_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=["time", "memory", "huge", "export", "peers", "list"])
  parser.add_argument("--out-dir", type=Path, help="export and peers modes: where to write")
  parser.add_argument("--export-dir", type=Path, help="export mode: the export (reused if there)")
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--impl", action="append", help="an implementation (repeatable; default all)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=60.0)
  ns = parser.parse_args(argv)
  names = ns.impl or list(impls(ns.clients))
  if ns.mode == "list":
    out: dict = {"impls": names}
  elif ns.mode == "export":
    out = export_mode(ns.clients, ns.out_dir, ns.export_dir)
  elif ns.mode == "huge":
    out = huge_mode(ns.clients, names[0], ns.repeats, ns.budget_s)
  elif ns.mode == "peers":
    out = peers_mode(ns.clients, ns.out_dir)
  elif ns.mode == "time":
    out = time_mode(ns.clients, names, ns.repeats, ns.budget_s)
  else:
    out = memory_mode(ns.clients, names[0])
  print(json.dumps(out))


if __name__ == "__main__":
  main()

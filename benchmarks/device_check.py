"""The accelerator check of issue 20, run by ``benchmarks/device_check.sh`` (at most 8 minutes on one H100):
the anchor FedAvg round at 128, 2,048 and 32,768 clients (faxbridge's default strategy against jit+vmap
and the hand-written streaming round, ``fedavg_round.py``'s "scan of vmap blocks") and the big-model
transformer round (``big_model.py``), written to ``benchmarks/results-gpu.md`` and ``.json`` beside it.

Nothing here needs an accelerator: on a machine without one it runs on the CPU, and ``--small`` (8, 32
and 64 clients, a tiny transformer) is how it is tested there. Each size and the transformer run in a
fresh process with a time limit of their own, so one that runs out of memory or time is reported in its
row and the rest still run.

  python benchmarks/device_check.py --small --out /tmp/results-gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES, SMALL_SIZES = [128, 2048, 32768], [8, 32, 64]
IMPLS = ["faxbridge auto", "jit+vmap", "scan of vmap blocks"]
TINY_TRANSFORMER = ["--layers", "2", "--d", "64", "--f", "256", "--heads", "4"]


def run_json(cmd: list[str], timeout: float) -> dict:
  """A benchmark process's last stdout line as JSON, or ``{"error": why}`` (its exit, its time limit)."""
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
  except subprocess.TimeoutExpired:
    return {"error": f"over its {timeout:.0f} s limit"}
  if done.returncode != 0:
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    return {"error": f"exit {done.returncode}: " + " / ".join(tail)[-600:]}
  return json.loads(done.stdout.strip().splitlines()[-1])


def environment() -> dict:
  code = ("import jax, json; d = jax.devices()[0]; print(json.dumps({'jax': jax.__version__, "
          "'jaxlib': __import__('jaxlib').__version__, 'platform': d.platform, 'device_kind': d.device_kind, "
          "'devices': len(jax.devices())}))")
  env = run_json([sys.executable, "-c", code], 120)
  env["python"] = platform.python_version()
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    env["nvidia_smi"] = smi.stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    env["nvidia_smi"] = None
  return env


def anchor(sizes: list[int], repeats: int, limit_s: float, log) -> dict:
  rows = {}
  for size in sizes:
    log(f"anchor round, {size} clients")
    cmd = [sys.executable, str(HERE / "fedavg_round.py"), "time", "--clients", str(size), "--repeats",
           str(repeats), "--budget-s", str(limit_s / 3)] + [a for n in IMPLS for a in ("--impl", n)]
    rows[str(size)] = run_json(cmd, limit_s)
  return rows


def transformer(small: bool, repeats: int, limit_s: float, log) -> dict:
  log("transformer round")
  return run_json([sys.executable, str(HERE / "big_model.py"), "--repeats", str(repeats),
                   *(TINY_TRANSFORMER if small else [])], limit_s)


def _median(xs: list[float]) -> float:
  xs = sorted(xs)
  mid = len(xs) // 2
  return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def report(results: dict) -> str:
  env = results["environment"]
  small = " --small (tiny sizes: a test, not a measurement)" if results["small"] else ""
  lines = ["# Benchmarks on an accelerator (issue 20)", "",
           f"Written by `benchmarks/device_check.sh{small}` in {results['total_s']:.0f} s. "
           f"Device: {env.get('device_kind')} ({env.get('platform')}, "
           f"{env.get('devices')} device(s)); nvidia-smi: {env.get('nvidia_smi') or '-'}. "
           f"Python {env.get('python')}, jax {env.get('jax')}, jaxlib {env.get('jaxlib')}.", "",
           "## Anchor FedAvg round (MLP 256-512-10, 32 examples per client, 2 local SGD steps)", "",
           "Per size one process: every implementation compiled and called once (first call), then timed "
           "round-robin (median of the interleaved runs).", "",
           "| clients | implementation | median s | min s | runs | first call s | ms per client | "
           "vs scan of vmap blocks | note |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for size, got in results["anchor"].items():
    n = int(size)
    if "error" in got:
      lines.append(f"| {n:,} | all | - | - | - | - | - | - | {got['error']} |")
      continue
    times = {k: v for k, v in got["times_s"].items() if v}
    base = _median(times["scan of vmap blocks"]) if "scan of vmap blocks" in times else None
    for name in IMPLS:
      if name in got.get("errors", {}):
        lines.append(f"| {n:,} | {name} | - | - | - | - | - | - | {got['errors'][name]} |")
        continue
      t = times[name]
      med = _median(t)
      ratio = f"{med / base:.2f}x" if base else "-"
      note = f"auto picked {got['auto_picked'][name]}" if name in got.get("auto_picked", {}) else ""
      lines.append(f"| {n:,} | {name} | {med:.4f} | {min(t):.4f} | {len(t)} | "
                   f"{got['first_call_s'][name]:.2f} | {1e3 * med / n:.4f} | {ratio} | {note} |")
  lines += ["", "## Transformer round", ""]
  big = results["transformer"]
  if "error" in big:
    lines.append(f"Failed: {big['error']}")
  else:
    m = big["model"]
    mesh = " x ".join(f"{k} {v}" for k, v in big["mesh"].items())
    lines += [f"{m['parameters'] / 1e6:.1f}M parameters ({m['layers']} layers, d={m['d']}), FedAvg of "
              f"{big['clients']} clients on {big['device_kind']} devices as a {mesh} mesh. Per device, from "
              "the compiled program (`memory_analysis`).", "",
              "| implementation | strategy | median s | min s | compile s | arguments MB | outputs MB | "
              "temporaries MB | total MB | XLA peak MB | max abs diff |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in big["impls"].items():
      mem = {k: v / 2**20 for k, v in r["memory"].items()}
      lines.append(f"| {name} | {r.get('strategy', '-')} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
                   f"{r['compile_s']:.1f} | {mem['arguments']:.1f} | {mem['outputs']:.1f} | "
                   f"{mem['temporaries']:.1f} | {mem['total']:.1f} | {mem['xla_peak']:.1f} | "
                   f"{r['max_abs_diff_vs'][1]:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true", help="8, 32, 64 clients and a tiny transformer")
  parser.add_argument("--out", type=Path, default=HERE / "results-gpu.md")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--size-limit-s", type=float, default=90.0, help="per anchor size")
  parser.add_argument("--transformer-limit-s", type=float, default=120.0)
  ns = parser.parse_args(argv)
  started = time.perf_counter()

  def log(msg: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {msg}", flush=True)

  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  results: dict = {"small": ns.small, "environment": environment()}
  log(f"environment: {results['environment']}")
  results["anchor"] = anchor(SMALL_SIZES if ns.small else SIZES, ns.repeats, ns.size_limit_s, log)
  results["transformer"] = transformer(ns.small, min(ns.repeats, 3), ns.transformer_limit_s, log)
  results["total_s"] = time.perf_counter() - started
  ns.out.parent.mkdir(parents=True, exist_ok=True)
  ns.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
  ns.out.write_text(report(results))
  log(f"wrote {ns.out}")
  failed = [s for s, r in results["anchor"].items() if "error" in r] + \
      (["transformer"] if "error" in results["transformer"] else [])
  return 1 if failed and ns.small else 0


if __name__ == "__main__":
  sys.exit(main())

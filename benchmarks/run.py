"""All benchmarks, one command: ``make bench`` (= ``.venv/bin/python benchmarks/run.py``, after building
``.venv-bench`` from ``requirements/bench.lock``).

1. The FedAvg round (``_fedavg_model.py``: MLP 256-512-10, 136,714 parameters, 32 examples per
   client, 2 local SGD steps, unweighted mean) at 8 .. 8,192 clients: every native implementation
   (``fedavg_round.py``: faxbridge with each strategy, jit+vmap, jit+lax.map, the hand-written
   streaming round, drjax) timed interleaved in one process per size, peak memory in a fresh process
   per (implementation, size); TFF 0.87 hand-written and TFF running faxbridge's export
   (``tff_round.py``, in .venv-tff), timed interleaved with each other, peak memory fresh too; what a
   user would pick instead, in .venv-bench: pfl 0.6 (``pfl_round.py``, under Keras 3 and tf-keras) and
   Flower's simulation engine (``flower_round.py``), each process checking its first round against
   the reference round before timing any (a mismatch is reported instead of a time).
2. The same round at 10,000 and 100,000 clients (``--skip huge`` leaves it out), faxbridge's default
   strategy, each size in one fresh process: seconds, ms per client, memory beside the data's size.
3. The big-model round (``big_model.py``): a 100.7M-parameter transformer, FedAvg of 8 clients on 8
   host devices as a 2 x 4 (clients x model) mesh with Megatron-style sharding, by faxbridge (vmap and
   stream) and drjax: per-device memory (``memory_analysis``) and time per round.
4. The structure of both TFF rounds (intrinsic calls and TF computations per round).
5. The cost of ``fb.export`` (``export_cost.py``) against parameters and equations.
6. Clients with their own data sizes (``ragged_round.py``): a FedAvg round over skewed client sizes
   (the largest 10x the mean) beside the same round with every client at the mean size, per
   execution strategy, at 128 and 512 clients.
7. faxbridge's overhead: its default (``auto``) against the hand-written streaming round (a jitted
   ``lax.scan`` over blocks of 8 clients, ``vmap`` inside) at 8, 32, 128 and 2,048 clients, the two
   alone in one process per size, interleaved, many runs (the ratios are a few percent: the
   FedAvg table's 3 runs per implementation cannot show them).

Writes ``benchmarks/results.json``, ``benchmarks/results.md`` and plots in ``benchmarks/results/``.
``--quick`` runs everything at tiny sizes (the smoke test, ``tests/test_benchmarks.py``), into
``--out`` (default: a temporary directory; nothing committed is touched).

``--update --skip ...`` reruns some sections and keeps the others of the existing results.json (each
section dated in its ``sections`` block, and in results.md when they differ): the overhead on a
quiet machine, say, without the half hour of everything else.

A size is skipped, with the reason recorded, when the estimate from the size before (time and
memory grow linearly in the clients) says a round would take longer than ``--round-budget-s`` or
need more than ``--memory-fraction`` of this machine's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORE = sys.executable


def _tff_python() -> Path:
  """The TFF environment the runtime uses ($FAXBRIDGE_TFF_PYTHON or <repo>/.venv-tff: the runtime's
  own lookup), or a path that does not exist when there is none (its rows are then skipped)."""
  from faxbridge.converters.runtimes.tff.launch import tff_python
  from faxbridge.extend import VerificationError

  try:
    return tff_python()
  except VerificationError:
    return Path("/nonexistent")


TFF_PY = _tff_python()
# The peers' environment (make bench builds it from requirements/bench.lock); their rows are skipped,
# with the reason recorded, where it is not built.
BENCH_PY = Path(os.environ.get("FAXBRIDGE_BENCH_PYTHON", ROOT / ".venv-bench" / "bin" / "python"))
PEERS = {"pfl (Keras 3)": ["pfl_round.py", "--keras", "3"],
         "pfl (tf-keras)": ["pfl_round.py", "--keras", "2"],
         "Flower simulation (Ray)": ["flower_round.py"]}
HUGE_SIZES, QUICK_HUGE_SIZES = [10_000, 100_000], [64, 256]
HUGE_IMPL = "faxbridge auto"

FULL_SIZES = [8, 32, 128, 512, 2048, 8192]
QUICK_SIZES = [2, 4]
TFF_NAMES = {"hand": "TFF hand-written", "export": "TFF running faxbridge's export"}


# -- running the pieces ---------------------------------------------------------------------
def _run_json(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
  """Runs a benchmark process; its last stdout line is a JSON object."""
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd[1:4])}... failed ({done.returncode}):\n"
                       f"{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": len(times)}


def machine() -> dict:
  model = platform.processor()
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
          "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
  found = {}
  for pkg in ("jax", "jaxlib", "drjax", "tensorflow", "tensorflow-cpu", "numpy"):
    with contextlib.suppress(metadata.PackageNotFoundError):
      found[pkg] = metadata.version(pkg)
  sys.path.insert(0, str(ROOT))
  import faxbridge

  found["faxbridge"] = faxbridge.__version__
  if TFF_PY.exists():
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('tensorflow_federated', 'tensorflow', 'numpy')}))")
    tff = json.loads(subprocess.run([str(TFF_PY), "-c", code], capture_output=True,
                                    text=True).stdout)
    found.update({f".venv-tff {k}": v for k, v in tff.items()})
  if BENCH_PY.exists():
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('pfl', 'dp-accounting', 'tensorflow', 'keras', 'tf-keras', 'flwr', 'ray', 'jax')}))")
    bench = json.loads(subprocess.run([str(BENCH_PY), "-c", code], capture_output=True,
                                      text=True).stdout)
    found.update({f".venv-bench {k}": v for k, v in bench.items()})
  return found


def _fits(prev: dict | None, size: int, prev_size: int, budget_s: float,
          memory_mb: float) -> str | None:
  """Why ``size`` is skipped, from the measurement at ``prev_size``; None if it should fit."""
  if prev is None:
    return None
  scale = size / prev_size
  if "median_s" in prev and prev["median_s"] * scale > budget_s:
    return (f"estimated {prev['median_s'] * scale:.0f} s per round (from {prev_size} clients) "
            f"> budget {budget_s:.0f} s")
  if prev.get("delta_mb") and prev["delta_mb"] * scale > memory_mb:
    return (f"estimated {prev['delta_mb'] * scale / 1024:.1f} GiB per round (from {prev_size} "
            f"clients) > {memory_mb / 1024:.1f} GiB available")
  return None


def fedavg(sizes: list[int], repeats: int, budget_s: float, memory_mb: float,
           work: Path, log, peers: bool = True) -> dict:
  """Every implementation at every size: {size: {impl: row}}, skipped rows with a reason."""
  script = str(HERE / "fedavg_round.py")
  names = _run_json([CORE, script, "list"], 300)["impls"]
  rows: dict[int, dict[str, dict]] = {}
  last: dict[str, tuple[int, dict]] = {}
  tff_ok = TFF_PY.exists()
  mismatched: dict[str, str] = {}
  for size in sizes:
    rows[size] = {}
    run, skipped = [], {}
    for name in names:
      prev = last.get(name)
      why = _fits(prev[1], size, prev[0], budget_s, memory_mb) if prev else None
      if why:
        skipped[name] = why
      else:
        run.append(name)
    log(f"{size} clients: {run} (skipped {sorted(skipped)})")
    if run:
      impl_args = [a for n in run for a in ("--impl", n)]
      timed = _run_json([CORE, script, "time", "--clients", str(size), "--repeats", str(repeats),
                         "--budget-s", str(budget_s * repeats), *impl_args], 4 * 3600)
      for name in run:
        if name in timed.get("errors", {}):
          rows[size][name] = {"error": timed["errors"][name]}
          continue
        row = _summary(timed["times_s"][name])
        row["first_call_s"] = timed["first_call_s"][name]
        if name in timed.get("auto_picked", {}):
          row["auto_picked"] = timed["auto_picked"][name]
        mem = _run_json([CORE, script, "memory", "--clients", str(size), "--impl", name], 3600)
        row.update({k: mem[k] for k in ("baseline_mb", "peak_mb", "delta_mb")})
        rows[size][name] = row
        last[name] = (size, row)
    for name, why in skipped.items():
      rows[size][name] = {"skipped": why}
    if tff_ok:
      rows[size].update(tff_rows(size, repeats, budget_s, memory_mb, work, last, log))
    if peers:
      rows[size].update(peer_rows(size, repeats, budget_s, memory_mb, work, last, mismatched, log))
  return rows


# The measured parts of results.json (the rest describes the run); --update keeps the ones it skips.
SECTIONS = ("fedavg", "tff_profile", "huge", "big_model", "overhead", "ragged", "export_cost")
OVERHEAD_SIZES, QUICK_OVERHEAD_SIZES = [8, 32, 128, 2048], [2, 4]
OVERHEAD_PAIR = ("faxbridge auto", "scan of vmap blocks")


def overhead(sizes: list[int], runs: int, budget_s: float, log) -> dict:
  """faxbridge's default against the hand-written streaming round, the two alone, interleaved, up
  to ``runs`` passes (fewer when a size's ``budget_s`` runs out): {size: {impl: row, "ratio":
  median / median, "ratio_min": fastest / fastest}}."""
  script = str(HERE / "fedavg_round.py")
  out: dict[int, dict] = {}
  for size in sizes:
    log(f"overhead, {size} clients: {list(OVERHEAD_PAIR)}, up to {runs} interleaved runs")
    impl_args = [a for n in OVERHEAD_PAIR for a in ("--impl", n)]
    timed = _run_json([CORE, script, "time", "--clients", str(size), "--repeats", str(runs),
                       "--budget-s", str(budget_s), *impl_args], 3600)
    rows = {n: _summary(timed["times_s"][n]) for n in OVERHEAD_PAIR if n in timed["times_s"]}
    if len(rows) == 2:
      auto, hand = (rows[n] for n in OVERHEAD_PAIR)
      rows["ratio"] = auto["median_s"] / hand["median_s"]
      rows["ratio_min"] = auto["min_s"] / hand["min_s"]
    out[size] = rows
  return out


def ragged(sizes: list[int], repeats: int, budget_s: float, log) -> dict:
  """The skewed round beside the equal-size one (``ragged_round.py``): {size: {row: ...}}."""
  script = str(HERE / "ragged_round.py")
  names = _run_json([CORE, script, "list"], 300)["impls"]
  rows: dict[int, dict[str, dict]] = {}
  for size in sizes:
    log(f"ragged, {size} clients: {names}")
    impl_args = [a for n in names for a in ("--impl", n)]
    timed = _run_json([CORE, script, "time", "--clients", str(size), "--repeats", str(repeats),
                       "--budget-s", str(budget_s * repeats), *impl_args], 4 * 3600)
    rows[size] = {}
    for name in names:
      row = {**_summary(timed["times_s"][name]), **timed["info"][name],
             "first_call_s": timed["first_call_s"][name]}
      mem = _run_json([CORE, script, "memory", "--clients", str(size), "--impl", name], 3600)
      row.update({k: mem[k] for k in ("baseline_mb", "peak_mb", "delta_mb", "temp_mb")})
      rows[size][name] = row
  return rows


def tff_rows(size: int, repeats: int, budget_s: float, memory_mb: float, work: Path,
             last: dict, log) -> dict:
  """The two TFF rounds at ``size`` clients (one export, made once, serves every size: TFF takes
  the number of clients from the argument)."""
  out: dict[str, dict] = {}
  prev = [last[n] for n in TFF_NAMES.values() if n in last]
  why = _fits(max((p[1] for p in prev), key=lambda r: r["median_s"]), size, prev[0][0],
              budget_s, memory_mb) if prev else None
  if why:
    return {name: {"skipped": why} for name in TFF_NAMES.values()}
  size_dir = work / f"tff{size}"
  size_dir.mkdir(parents=True, exist_ok=True)
  made = _run_json([CORE, str(HERE / "fedavg_round.py"), "export", "--clients", str(size),
                    "--out-dir", str(size_dir), "--export-dir", str(work / "tff_export")], 1800)
  log(f"{size} clients: TFF (export took {made['export_s']:.1f} s)")
  common = ["--export", made["export"], "--inputs", str(size_dir / "inputs.npz")]
  script = str(HERE / "tff_round.py")
  timed = _run_json([str(TFF_PY), script, "time", *common, "--repeats", str(repeats),
                     "--budget-s", str(budget_s * repeats)], 4 * 3600)
  for key, name in TFF_NAMES.items():
    row = _summary(timed["times_s"][key])
    row["first_call_s"] = timed["first_call_s"][key]
    mem = _run_json([str(TFF_PY), script, "memory", *common, "--impl", key], 3600)
    row.update({k: mem[k] for k in ("baseline_mb", "peak_mb", "delta_mb", "worker_peak_mb")})
    out[name] = row
    last[name] = (size, row)
  out[TFF_NAMES["export"]]["max_abs_diff_vs_hand"] = timed.get("max_abs_diff")
  return out


def peer_rows(size: int, repeats: int, budget_s: float, memory_mb: float, work: Path, last: dict,
              mismatched: dict, log) -> dict:
  """pfl's and Flower's rounds at ``size`` clients, each in its own .venv-bench process on the same
  inputs, checked against the reference round first. A peer whose round differed is not run again at
  larger sizes (its row says where it was checked)."""
  if not BENCH_PY.exists():
    return {name: {"skipped": f"{BENCH_PY} not built (make bench builds it)"} for name in PEERS}
  folder = work / f"peers{size}"
  made = _run_json([CORE, str(HERE / "fedavg_round.py"), "peers", "--clients", str(size),
                    "--out-dir", str(folder)], 3600)
  log(f"{size} clients: peers (reference round {made['reference_s']:.1f} s)")
  out: dict[str, dict] = {}
  for name, (script, *args) in PEERS.items():
    prev = last.get(name)
    why = _fits(prev[1], size, prev[0], budget_s, memory_mb) if prev else None
    if name in mismatched:
      out[name] = {"mismatch": mismatched[name]}
      continue
    if why:
      out[name] = {"skipped": why}
      continue
    log(f"{size} clients: {name}")
    try:
      got = _run_json([str(BENCH_PY), str(HERE / script), "--inputs", str(folder), "--repeats",
                       str(repeats), "--budget-s", str(budget_s * repeats), *args], 4 * 3600)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      out[name] = {"error": str(e)[-800:]}
      continue
    check = got.get("check") or {}
    diff = max((check.get("max_abs_diff") or {"-": float("nan")}).values())
    if "mismatch" in got:
      out[name] = {"mismatch": got["mismatch"], "max_abs_diff_vs_reference": diff}
      mismatched[name] = f"at {size} clients: {got['mismatch']} (not run at larger sizes)"
      continue
    row = _summary(got["times_s"])
    row.update(first_call_s=got["first_call_s"], max_abs_diff_vs_reference=diff,
               **{k: got["memory"][k] for k in ("baseline_mb", "peak_mb", "delta_mb")})
    out[name] = row
    last[name] = (size, row)
  shutil.rmtree(folder, ignore_errors=True)
  return out


def huge(sizes: list[int], repeats: int, budget_s: float, memory_mb: float, log) -> dict:
  """faxbridge's default strategy at ``sizes`` clients, one fresh process each (``fedavg_round.py
  huge``): {size: row}. A size whose data, made on the host and copied to the device (twice its
  size for a moment), would not fit in ``memory_mb`` is skipped with the reason."""
  sys.path.insert(0, str(HERE))
  import _fedavg_model as model

  rows: dict[str, dict] = {}
  examples = model.BATCHES * model.BATCH_SIZE  # client_data: x float32 features, y int32 labels
  per_client_mb = examples * (model.FEATURES * 4 + 4) / 2**20
  for size in sizes:
    if 2 * size * per_client_mb > memory_mb:
      rows[str(size)] = {"skipped": f"its data twice ({2 * size * per_client_mb / 1024:.1f} GiB) > "
                                    f"{memory_mb / 1024:.1f} GiB available"}
      continue
    log(f"{size} clients: {HUGE_IMPL} (one process)")
    got = _run_json([CORE, str(HERE / "fedavg_round.py"), "huge", "--clients", str(size), "--impl",
                     HUGE_IMPL, "--repeats", str(repeats), "--budget-s", str(budget_s)], 4 * 3600)
    row = _summary(got["times_s"])
    row.update({k: got[k] for k in ("first_call_s", "data_mb", "baseline_mb", "peak_mb", "delta_mb",
                                    "process_maxrss_mb")})
    row["auto_picked"] = got.get("auto_picked")
    row["xla_temp_mb"] = got.get("xla_temp_mb")
    rows[str(size)] = row
  return rows


def big_model(quick: bool, repeats: int, log) -> dict:
  """The transformer round on 8 host devices (``big_model.py``, a fresh process: the device count is
  fixed when JAX starts); tiny with ``quick``."""
  args = ["--layers", "2", "--d", "64", "--f", "256", "--heads", "4"] if quick else []
  log("big-model round" + (" (tiny)" if quick else ""))
  return _run_json([CORE, str(HERE / "big_model.py"), "--repeats", str(repeats), *args], 4 * 3600,
                   env={"JAX_PLATFORMS": "cpu"})


def tff_profile(work: Path, clients: int, repeats: int) -> dict | None:
  if not TFF_PY.exists():
    return None
  size_dir = work / f"profile{clients}"
  size_dir.mkdir(parents=True, exist_ok=True)
  made = _run_json([CORE, str(HERE / "fedavg_round.py"), "export", "--clients", str(clients),
                    "--out-dir", str(size_dir), "--export-dir", str(work / "tff_export")], 1800)
  got = _run_json([str(TFF_PY), str(HERE / "tff_round.py"), "profile", "--export",
                   made["export"], "--inputs", str(size_dir / "inputs.npz"), "--repeats",
                   str(repeats)], 3600)
  return {"clients": clients, "structure": got["structure"], "client_graph": got["client_graph"],
          "median_s": {k: statistics.median(v) for k, v in got["times_s"].items()}}


def export_cost(params: list[int], eqns: list[int], targets: list[str], log) -> list[dict]:
  rows = []
  for kind, sizes in (("params", params), ("eqns", eqns)):
    for size in sizes:
      for target in targets:
        log(f"export {kind}={size} {target}")
        try:
          rows.append(_run_json([CORE, str(HERE / "export_cost.py"), "one", "--kind", kind,
                                 "--size", str(size), "--target", target], 3600))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
          rows.append({"kind": kind, "size": size, "target": target, "error": str(e)[-500:]})
  return rows


# -- the report -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
  parser.add_argument("--out", type=Path, help="where results go (default: benchmarks/, or a "
                      "temporary directory with --quick)")
  parser.add_argument("--sizes", type=int, nargs="*", help="numbers of clients")
  parser.add_argument("--repeats", type=int, help="interleaved timed runs per size")
  parser.add_argument("--round-budget-s", type=float, default=12.0,
                      help="skip a size whose estimated round takes longer")
  parser.add_argument("--memory-fraction", type=float, default=0.7)
  parser.add_argument("--skip", nargs="*", default=[],
                      choices=["fedavg", "tff", "peers", "huge", "big_model", "export", "ragged",
                               "overhead"])
  parser.add_argument("--huge-sizes", type=int, nargs="*", help="clients of the one-process rounds "
                      "(default 10,000 and 100,000; --quick: 64 and 256)")
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite results.md and the plots from results.json")
  parser.add_argument("--update", action="store_true",
                      help="keep the sections of the existing results.json this run skips (each "
                      "section's run is dated in `sections`): rerun one part on a quieter machine")
  ns = parser.parse_args(argv)
  if ns.update and "fedavg" not in ns.skip and {"tff", "peers"} & set(ns.skip):
    # The FedAvg section holds the TFF and peer rows: rerun without them, it would lose them.
    parser.error("--update replaces the FedAvg section whole, its TFF and peer rows and the TFF "
                 "profile included: skip fedavg as well, or neither tff nor peers")
  if ns.report_only:
    out = ns.out or HERE
    sys.path.insert(0, str(HERE))
    import report

    report.write(json.loads((out / "results.json").read_text()), out)
    return 0

  quick = ns.quick
  sizes = ns.sizes or (QUICK_SIZES if quick else FULL_SIZES)
  repeats = ns.repeats or (1 if quick else 3)
  out = ns.out or (Path(tempfile.mkdtemp(prefix="faxbridge-bench-")) if quick else HERE)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()

  def log(msg: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

  global TFF_PY
  if "tff" in ns.skip:
    TFF_PY = Path("/nonexistent")
  mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * ns.memory_fraction
  results: dict = {"machine": machine(), "versions": versions(), "quick": quick,
                   "repeats": repeats, "round_budget_s": ns.round_budget_s}
  with tempfile.TemporaryDirectory(prefix="faxbridge-bench-work-") as tmp:
    work = Path(tmp)
    if "fedavg" not in ns.skip:
      results["fedavg"] = {str(k): v for k, v in fedavg(
          sizes, repeats, ns.round_budget_s, mem_mb, work, log, "peers" not in ns.skip).items()}
      results["tff_profile"] = tff_profile(work, 128 if 128 in sizes else sizes[0],
                                           max(5, repeats))
  if "huge" not in ns.skip:
    # Fewer repeats: a round at 100,000 clients takes about a minute on this machine.
    results["huge"] = huge(ns.huge_sizes or (QUICK_HUGE_SIZES if quick else HUGE_SIZES),
                           min(repeats, 2), 120.0, mem_mb, log)
  if "big_model" not in ns.skip:
    results["big_model"] = big_model(quick, repeats, log)
  if "overhead" not in ns.skip:
    results["overhead"] = {str(k): v for k, v in overhead(
        QUICK_OVERHEAD_SIZES if quick else OVERHEAD_SIZES, 3 if quick else 41,
        5.0 if quick else 90.0, log).items()}
  if "ragged" not in ns.skip:
    ragged_sizes = [16] if quick else [128, 512]
    results["ragged"] = {str(k): v for k, v in ragged(
        ragged_sizes, 3 if quick else max(repeats, 7), ns.round_budget_s, log).items()}
  if "export" not in ns.skip:
    # TFLite (a model per piece through the TF converter, seconds even when tiny) only for the
    # smallest of each family, to keep the full run near 15 minutes.
    params = [1000, 10000] if quick else [100_000, 1_000_000, 10_000_000, 100_000_000]
    eqns = [30, 100] if quick else [1000, 10000]
    results["export_cost"] = export_cost(params, eqns, ["tff", "stablehlo"], log)
    if not quick:
      results["export_cost"] += export_cost(params[:1], eqns[:1], ["tflite"], log)
  results["total_s"] = time.perf_counter() - started
  today = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  results["sections"] = {k: today for k in SECTIONS if k in results}
  if ns.update and (out / "results.json").exists():
    earlier = json.loads((out / "results.json").read_text())
    for key in SECTIONS:
      if key not in results and key in earlier:
        results[key] = earlier[key]
        results["sections"][key] = earlier.get("sections", {}).get(key, "an earlier run")
  (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  sys.path.insert(0, str(HERE))
  import report

  report.write(results, out)
  log(f"wrote {out / 'results.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

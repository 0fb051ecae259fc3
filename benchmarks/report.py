"""``results.json`` -> ``results.md`` (tables, the targets checked) and plots in ``results/``.

``benchmarks/notes.md`` (hand-written: where the time goes, what a profile showed) is appended
when the results are written to ``benchmarks/`` itself.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = "jit+vmap"
AUTO = ("faxbridge auto", "faxbridge")  # the first present is the row the targets use
TFF_HAND, TFF_EXPORT = "TFF hand-written", "TFF running faxbridge's export"
HAND_STREAM = "scan of vmap blocks"  # the best hand-written streaming round (fedavg_round.scan_blocks)
HUGE, HUGE_BASE = "100000", "10000"  # the one-process rounds the targets compare
HUGE_IMPL_LABEL = "faxbridge auto"
PEERS_NOTE = (
    "Peers (`.venv-bench`, built from `requirements/bench.lock`), each in its own process on the same "
    "inputs, its first round checked against the reference round (`_fedavg_model.reference_round`) "
    "before any is timed: a round that differs is reported as a mismatch, not timed. **pfl** "
    "(`pfl_round.py`): a Keras MLP in `TFModel`, `FederatedAveraging` on a `SimulatedBackend`, "
    "`local_batch_size=16`, one epoch at learning rate 0.1, central SGD at 1.0; under Keras 3 and under "
    "tf-keras (`TF_USE_LEGACY_KERAS=1`). **Flower simulation** (`flower_round.py`): a `ClientApp` per "
    "virtual SuperNode running the benchmark's own jitted JAX client update, the message-API `FedAvg`, "
    "`run_simulation` on Ray with its default resources (2 CPUs per ClientApp); its round runs from "
    "`configure_train` to the end of `aggregate_train`, its first call includes starting Ray's actor "
    "and compiling. Peers' memory is their whole process tree (Ray's processes included), sampled.")


def _auto(rows: dict) -> str | None:
  return next((n for n in AUTO if n in rows and "median_s" in rows[n]), None)


def _ratio(rows: dict, a: str | None, b: str) -> float | None:
  if a is None or "median_s" not in rows.get(a, {}) or "median_s" not in rows.get(b, {}):
    return None
  return rows[a]["median_s"] / rows[b]["median_s"]


def _fmt(x, spec: str = ".3f") -> str:
  return "-" if x is None else format(x, spec)


def _mb(value: float | None) -> str:
  """A size in MB for a table cell; ``-`` where a run before the column existed left none."""
  return "-" if value is None else f"{value:.1f}"


def _cell(text: str) -> str:
  """Text for a table cell: one line, no column separators."""
  return " ".join(str(text).split()).replace("|", "/")


def fedavg_tables(fedavg: dict) -> list[str]:
  lines = []
  for size, rows in fedavg.items():
    n = int(size)
    lines += [f"### {n} clients", "",
              "| implementation | median s | min s | max s | runs | peak MB | +MB per round | "
              "ms per client | vs jit+vmap | note |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
      if "skipped" in row or "mismatch" in row or "error" in row:
        why = next(f"{k}: {row[k]}" for k in ("skipped", "mismatch", "error") if k in row)
        lines.append(f"| {name} | - | - | - | - | - | - | - | - | {_cell(why)} |")
        continue
      ratio = _ratio(rows, name, BASE)
      note = f"auto picked {row['auto_picked']}" if row.get("auto_picked") else ""
      if row.get("worker_peak_mb"):
        note += f"; worker_binary peak {row['worker_peak_mb']:.0f} MB"
      if row.get("max_abs_diff_vs_reference") is not None:
        note += f"; checked: max abs diff {row['max_abs_diff_vs_reference']:.1e} to the reference"
      lines.append(
          f"| {name} | {row['median_s']:.4f} | {row['min_s']:.4f} | {row['max_s']:.4f} | "
          f"{row['runs']} | {row['peak_mb']:.0f} | {row['delta_mb']:.0f} | "
          f"{1e3 * row['median_s'] / n:.3f} | {_fmt(ratio, '.2f')}x | {note.strip('; ')} |")
    lines.append("")
  return lines


def targets(fedavg: dict, huge: dict | None = None, overhead: dict | None = None) -> list[str]:
  """The issue's targets, each met or missed by how much, from this run's ratios."""
  out = ["| target | measured | verdict |", "|---|---|---|"]

  def check(label: str, value: float | None, limit: float, unit: str = "x") -> None:
    if value is None:
      out.append(f"| {label} | not measured | - |")
      return
    verdict = "met" if value <= limit else f"missed by {100 * (value / limit - 1):.0f}%"
    out.append(f"| {label} | {value:.2f}{unit} | {verdict} |")

  r128, r2048 = fedavg.get("128", {}), fedavg.get("2048", {})
  check("auto at 128 clients <= 0.45x jit+vmap", _ratio(r128, _auto(r128), BASE), 0.45)
  check("auto at 128 clients <= 0.5x hand-written TFF", _ratio(r128, _auto(r128), TFF_HAND), 0.5)
  check("auto at 2,048 clients <= 0.3x jit+vmap", _ratio(r2048, _auto(r2048), BASE), 0.3)
  a = _auto(r2048)
  check("auto at 2,048 clients: peak memory <= 1 GiB (absolute, fresh process)",
        r2048[a]["peak_mb"] / 1024 if a else None, 1.0, " GiB")
  per_client = {int(s): rows[_auto(rows)]["median_s"] / int(s) for s, rows in fedavg.items()
                if int(s) >= 128 and _auto(rows)}
  if len(per_client) >= 2:
    spread = max(per_client.values()) / min(per_client.values())
    check(f"auto cost per client flat (max/min) over {sorted(per_client)} clients", spread, 1.2)
  else:
    check("auto cost per client flat 128..8,192 clients", None, 1.2)
  for size, limit in (("8", 1.03), ("32", 1.03), ("128", 1.03), ("2048", 1.0)):
    # The dedicated interleaved runs (run.py's overhead) where there are some, else the table's.
    measured = (overhead or {}).get(size, {}).get("ratio")
    if measured is None:
      rows = fedavg.get(size, {})
      measured = _ratio(rows, _auto(rows), HAND_STREAM)
    check(f"auto at {int(size):,} clients <= {limit:.2f}x the hand-written streaming round "
          "(medians)", measured, limit)
  check("exported round on TFF <= 1.10x hand-written TFF at 128 clients",
        _ratio(r128, TFF_EXPORT, TFF_HAND), 1.10)
  huge = {k: v for k, v in (huge or {}).items() if "median_s" in v}
  big, base = huge.get(HUGE), huge.get(HUGE_BASE)
  check("auto at 100,000 clients (one process) <= 0.3 ms per client",
        1e3 * big["median_s"] / int(HUGE) if big else None, 0.3, " ms")
  check("memory flat in clients: the round's own memory (peak - baseline) at 100,000 <= 1.1x at 10,000",
        big["delta_mb"] / max(base["delta_mb"], 1.0) if big and base else None, 1.1)
  temps = big and base and big.get("xla_temp_mb") and base.get("xla_temp_mb")
  check("memory flat in clients: the compiled round's temporaries at 100,000 <= 1.0x at 10,000",
        big["xla_temp_mb"] / base["xla_temp_mb"] if temps else None, 1.0)
  return out


def ragged_tables(ragged: dict) -> list[str]:
  """The skewed round beside the equal-size one, per strategy and size, and the cost target."""
  lines = ["| clients | strategy | skewed median s | equal median s | skewed / equal (medians) | "
           "(fastest rounds) | ms per real example (skewed) | batch steps skewed / equal | "
           "XLA temporaries MB, skewed / equal |",
           "|---:|---|---:|---:|---:|---:|---:|---|---|"]
  verdicts = []
  for size, rows in ragged.items():
    for strategy in ("stream", "vmap"):
      sk, eq = rows.get(f"{strategy} skewed", {}), rows.get(f"{strategy} equal", {})
      if "median_s" not in sk or "median_s" not in eq:
        lines.append(f"| {size} | {strategy} | - | - | - | - | - | - | "
                     f"{sk.get('skipped') or eq.get('skipped') or 'not measured'} |")
        continue
      ratio = sk["median_s"] / eq["median_s"]
      lines.append(
          f"| {size} | {strategy} | {sk['median_s']:.4f} | {eq['median_s']:.4f} | {ratio:.2f}x | "
          f"{sk['min_s'] / eq['min_s']:.2f}x | "
          f"{1e3 * sk['median_s'] / sk['examples']:.4f} | {sk['batch_steps']} / "
          f"{eq['batch_steps']} | {sk['temp_mb']:.0f} / {eq['temp_mb']:.0f} |")
      if strategy == "stream":
        verdict = "met" if ratio <= 1.5 else f"missed by {100 * (ratio / 1.5 - 1):.0f}%"
        verdicts.append(f"| skewed round <= 1.5x the equal-size round ({size} clients, "
                        f"(\"stream\", 8)) | {ratio:.2f}x | {verdict} |")
  return [*lines, "", "| target | measured | verdict |", "|---|---|---|", *verdicts]


def overhead_table(overhead: dict) -> list[str]:
  lines = ["| clients | auto median ms | hand-written median ms | auto / hand-written (medians) | "
           "(fastest runs) | runs |", "|---:|---:|---:|---:|---:|---:|"]
  for size, rows in overhead.items():
    auto, hand = rows.get("faxbridge auto"), rows.get(HAND_STREAM)
    if not auto or not hand or "ratio" not in rows:
      lines.append(f"| {size} | - | - | - | - | not measured |")
      continue
    lines.append(f"| {size} | {1e3 * auto['median_s']:.3f} | {1e3 * hand['median_s']:.3f} | "
                 f"{rows['ratio']:.3f}x | {rows['ratio_min']:.3f}x | {auto['runs']} |")
  return lines


def huge_table(huge: dict) -> list[str]:
  lines = ["Each size in one fresh process (`fedavg_round.py huge`). Memory is the process's resident set "
           "sampled while compiling and running the rounds: `baseline` once the data is on the device "
           "(its host copy dropped), `peak` the most during the rounds, `peak - data` what is not the "
           "clients' data. `XLA temporaries`: the compiled round's own (`memory_analysis`).", "",
           "| clients | implementation | median s | min s | runs | first call s | ms per client | data MB | "
           "baseline MB | peak MB | round's own MB (peak - baseline) | peak - data MB | "
           "XLA temporaries MB | note |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for size, r in huge.items():
    n = int(size)
    if "skipped" in r:
      lines.append(f"| {n:,} | {HUGE_IMPL_LABEL} |" + " - |" * 11 + f" skipped: {_cell(r['skipped'])} |")
      continue
    note = f"auto picked {r['auto_picked']}" if r.get("auto_picked") else ""
    lines.append(f"| {n:,} | {HUGE_IMPL_LABEL} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['runs']} | "
                 f"{r['first_call_s']:.2f} | {1e3 * r['median_s'] / n:.3f} | {r['data_mb']:.0f} | "
                 f"{r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} | "
                 f"{r['peak_mb'] - r['data_mb']:.0f} | {_mb(r.get('xla_temp_mb'))} | {note} |")
  return lines


def big_model_table(big: dict) -> list[str]:
  m = big["model"]
  mesh = " x ".join(f"{k} {v}" for k, v in big["mesh"].items())
  lines = [
      f"A causal transformer, {m['parameters'] / 1e6:.1f}M parameters ({m['layers']} layers, "
      f"d={m['d']}, {m['heads']} heads, f={m['f']}), FedAvg of {big['clients']} clients (one SGD step "
      f"each on {m['batch']} windows of {m['t']} tokens) on {big['platform']} devices as a {mesh} "
      "mesh, Megatron-style weight sharding (`big_model.py`). Memory per device from the compiled "
      "program (`memory_analysis`); `total` = arguments + outputs + temporaries (- aliased), what "
      "they take if all live at once. Timed interleaved, one process; process peak "
      f"{big['process_peak_mb'] / 1024:.1f} GiB (`ru_maxrss`, all devices).", "",
      "| implementation | strategy | median s | min s | runs | compile s | per device: arguments MB | "
      "outputs MB | temporaries MB | total MB | output shardings | max abs diff |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for name, r in big["impls"].items():
    mem = {k: v / 2**20 for k, v in r["memory"].items() if isinstance(v, int)}
    lines.append(f"| {name} | {r.get('strategy', '-')} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                 f"{r['runs']} | {r['compile_s']:.1f} | {mem['arguments']:.1f} | {mem['outputs']:.1f} | "
                 f"{mem['temporaries']:.1f} | {mem['total']:.1f} | {', '.join(r['out_specs'])} | "
                 f"{r['max_abs_diff_vs'][1]:.1e} |")
  return lines


def profile_table(profile: dict | None) -> list[str]:
  if not profile:
    return ["(TFF not installed: no profile)"]
  s = profile["structure"]
  kinds = sorted(set(s["hand"]["intrinsics"]) | set(s["export"]["intrinsics"]))
  lines = [f"Per round, counted in each computation's proto ({profile['clients']} clients; "
           "`tff_round.py profile`):", "",
           "| | hand-written | faxbridge export |", "|---|---:|---:|"]
  for key in ("intrinsic", "tensorflow", "selection", "struct", "lambda"):
    lines.append(f"| {key} nodes | {s['hand']['nodes'].get(key, 0)} | "
                 f"{s['export']['nodes'].get(key, 0)} |")
  for k in kinds:
    lines.append(f"| `{k}` | {s['hand']['intrinsics'].get(k, 0)} | "
                 f"{s['export']['intrinsics'].get(k, 0)} |")
  med = profile["median_s"]
  lines.append(f"| median s per round | {med['hand']:.4f} | {med['export']:.4f} |")
  graph = profile.get("client_graph")
  if graph:
    lines.append(f"| client TF graph: nodes | {graph['hand']['nodes']} | "
                 f"{graph['export']['nodes']} |")
    lines.append(f"| client TF graph alone: ms per client (TF session) | "
                 f"{graph['hand']['median_ms']:.3f} | {graph['export']['median_ms']:.3f} |")
    for which in ("hand", "export"):
      ops = ", ".join(f"{k} {v}" for k, v in graph[which]["ops"].items())
      lines.append(f"\nMost frequent ops of the {which} client graph: {ops}.")
  return lines


def export_table(rows: list[dict]) -> list[str]:
  lines = ["| program | jaxpr eqns | target | seconds | peak MB | +MB | bytes written |",
           "|---|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    what = f"{r['size'] / 1e6:g}M parameters" if r["kind"] == "params" else \
        f"~{r['size']} equations"
    if "error" in r:
      lines.append(f"| {what} | - | {r['target']} | failed: {r['error'][-120:]!r} | | | |")
      continue
    lines.append(f"| {what} | {r['eqns']} | {r['target']} | {r['export_s']:.2f} | "
                 f"{r['peak_mb']:.0f} | {r['delta_mb']:.0f} | {r['bytes_written']:,} |")
  return lines


def plots(results: dict, out: Path) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folder = out / "results"
  folder.mkdir(parents=True, exist_ok=True)
  made = []
  fedavg = results.get("fedavg") or {}
  names = sorted({n for rows in fedavg.values() for n in rows})
  if fedavg:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in names:
      pts = [(int(s), rows[name]) for s, rows in fedavg.items()
             if "median_s" in rows.get(name, {})]
      if not pts:
        continue
      xs = [p[0] for p in pts]
      axes[0].errorbar(xs, [p[1]["median_s"] for p in pts],
                       yerr=[[p[1]["median_s"] - p[1]["min_s"] for p in pts],
                             [p[1]["max_s"] - p[1]["median_s"] for p in pts]],
                       marker="o", label=name, capsize=2)
      axes[1].plot(xs, [1e3 * p[1]["median_s"] / p[0] for p in pts], "o-", label=name)
      # TFF's peak: its Python process and its worker_binary together.
      axes[2].plot(xs, [p[1]["peak_mb"] + p[1].get("worker_peak_mb", 0.0) for p in pts], "o-",
                   label=name)
    for ax, title, ylabel in zip(axes, ["seconds per round (median; bars: min..max)",
                                        "cost per client",
                                        "peak memory (fresh process; TFF: + its worker)"],
                                 ["s", "ms per client", "MB (ru_maxrss)"]):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("clients")
      ax.set_ylabel(ylabel)
      ax.set_title(title)
      ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("FedAvg round, MLP 256-512-10")
    fig.tight_layout()
    fig.savefig(folder / "fedavg_round.png", dpi=110)
    plt.close(fig)
    made.append("results/fedavg_round.png")
  cost = [r for r in results.get("export_cost") or [] if "error" not in r]
  if cost:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, ax in zip(("params", "eqns"), axes):
      for target in sorted({r["target"] for r in cost}):
        pts = [r for r in cost if r["kind"] == kind and r["target"] == target]
        if pts:
          ax.plot([r["size"] for r in pts], [r["export_s"] for r in pts], "o-", label=target)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("parameters" if kind == "params" else "jaxpr equations (about)")
      ax.set_ylabel("fb.export seconds")
      ax.grid(True, alpha=0.3)
      if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "export_cost.png", dpi=110)
    plt.close(fig)
    made.append("results/export_cost.png")
  return made


def write(results: dict, out: Path) -> None:
  m, v = results["machine"], results["versions"]
  lines = ["# Benchmarks", "",
           "Written by `make bench` (`.venv/bin/python benchmarks/run.py`); numbers in "
           "`results.json`. " + ("**Quick run (tiny sizes): not a measurement.**"
                                 if results.get("quick") else ""), "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
           f"Python {m['python']}, {m['platform']}. Total run: {results['total_s']:.0f} s.", "",
           *(["Sections by the run that measured them (`run.py --update` reruns some): "
              + ", ".join(f"{k} {v}" for k, v in results["sections"].items()) + ".", ""]
             if len(set(results.get("sections", {}).values())) > 1 else []),
           "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
           "Native rows are timed interleaved (round-robin) in one process per size; the two "
           "TFF rows interleaved with each other in one .venv-tff process per size. Peak memory: "
           "`ru_maxrss` of a fresh process after compile + one round (for TFF: the Python "
           "process; its worker_binary's peak in the note); `+MB` subtracts the baseline "
           "after the data is made.", ""]
  if results.get("fedavg"):
    lines += ["## Targets (this run)", "",
              *targets(results["fedavg"], results.get("huge"), results.get("overhead")), ""]
    lines += ["## FedAvg round (MLP 256-512-10, 136,714 parameters, 32 examples per client, "
              "2 local SGD steps, unweighted mean)", "", PEERS_NOTE, "", *fedavg_tables(results["fedavg"])]
  if results.get("overhead"):
    lines += ["## Overhead: the default against the hand-written streaming round", "",
              "`faxbridge auto` and the hand-written round (a jitted `lax.scan` over blocks of 8 "
              "clients, `vmap` inside) alone in one process per size, interleaved, up to 41 runs "
              "each (90 s per size). Both compile to the same HLO, op for op (checked by hand, "
              "2026-12-07); what differs is the call.", "", *overhead_table(results["overhead"]), ""]
  if results.get("huge"):
    lines += ["## The round at many clients, one process", "", *huge_table(results["huge"]), ""]
  if results.get("big_model"):
    lines += ["## Big-model round (clients x model mesh)", "", *big_model_table(results["big_model"]), ""]
    lines += ["## TFF: the export's structure against the hand-written round", ""]
    lines += [*profile_table(results.get("tff_profile")), ""]
  if results.get("ragged"):
    lines += ["## Clients with their own data sizes (`ragged_round.py`)", "",
              "One local epoch of SGD over each client's own batches of 16 (`fb.fold` over "
              "`fb.ragged` data), FedAvg weighted by the real counts; skewed: the largest client "
              "holds 10x the mean (and one client 1 example, one none), equal: every client at the "
              "mean (64 examples), the same total. Timed interleaved (skewed, equal, ...) per "
              "strategy in one process per size; memory in a fresh process per row.", "",
              *ragged_tables(results["ragged"]), ""]
  if results.get("export_cost"):
    lines += ["## Export cost", "", "Parameters are SERVER inputs (`jax.ShapeDtypeStruct`), "
              "never constants: the bytes written do not grow with them.", ""]
    lines += [*export_table(results["export_cost"]), ""]
  made = plots(results, out)
  lines += ["## Plots", "", *(f"![{p}]({p})" for p in made), ""]
  notes = HERE / "notes.md"
  if out.resolve() == HERE and notes.exists():
    lines += [notes.read_text()]
  (out / "results.md").write_text("\n".join(lines))

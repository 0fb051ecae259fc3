"""Every benchmark runs at tiny size, so none rots; no speed target lives here.

Quick: each native FedAvg implementation equals a per-client reference round, the timing and
memory modes return what ``run.py`` reads, export cost stays small with the parameters (they are
inputs), and the report's target verdicts are computed right. Slow: ``run.py --quick`` end to end
at 2 clients, TFF's hand-written round and the export included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _fedavg_model as model  # noqa: E402
import export_cost  # noqa: E402
import fedavg_round  # noqa: E402
import ragged_round  # noqa: E402
import report  # noqa: E402

# The rest: slow (compiles). The plain-JAX baselines (jit+vmap and the others) are the slow suite's:
# the quick suite keeps faxbridge's own rounds.
QUICK_IMPLS = {"faxbridge vmap"}  # one compile; "faxbridge auto" also compiles the streamed round (~10 s)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in QUICK_IMPLS else pytest.mark.slow)
    for n in fedavg_round.impls(3)])
def test_native_round_equals_the_per_client_reference(name):
  params, data = model.init_params(), model.client_data(3)
  expected = model.reference_round(params, data)
  got = fedavg_round.impls(3)[name]()(params, data)
  for k in model.PARAM_NAMES:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-5, atol=1e-6,
                               err_msg=f"{name}: {k}")
  assert model.num_params() == 136_714


@pytest.mark.slow
def test_the_hand_written_streaming_round_covers_full_blocks_and_the_rest():
  """11 clients in blocks of 4: two scanned blocks and a last block of 3 (impls(3) has no scan)."""
  params, data = model.init_params(), model.client_data(11)
  expected = model.reference_round(params, data)
  got = fedavg_round.scan_blocks(11, block=4)(params, data)
  for k in model.PARAM_NAMES:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_time_and_memory_modes_report_what_run_reads():
  timed = fedavg_round.time_mode(2, ["jit+vmap"], repeats=1, budget_s=10)
  assert len(timed["times_s"]["jit+vmap"]) == 1 and timed["times_s"]["jit+vmap"][0] > 0
  mem = fedavg_round.memory_mode(2, "jit+vmap")
  assert mem["peak_mb"] >= mem["baseline_mb"] > 0


def test_skewed_sizes_are_what_the_target_compares():
  for n in (16, 128, 512):
    skewed, equal = ragged_round.sizes(n, "skewed"), ragged_round.sizes(n, "equal")
    assert sum(skewed) == sum(equal) == n * ragged_round.MEAN_EXAMPLES
    assert max(skewed) == ragged_round.SKEW * ragged_round.MEAN_EXAMPLES and {0, 1} <= set(skewed)


@pytest.mark.parametrize("strategy", ["stream", pytest.param("vmap", marks=pytest.mark.slow)])
def test_ragged_round_equals_a_loop_over_each_clients_own_examples(strategy):
  counts = ragged_round.sizes(16, "skewed")
  params, data = model.init_params(), ragged_round.client_data(counts)
  want = ragged_round.reference_round(params, counts, data)
  got = ragged_round.faxbridge_round(ragged_round.STRATEGIES[strategy])(params, data)
  for k in model.PARAM_NAMES:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_ragged_time_mode_reports_what_run_reads():
  timed = ragged_round.time_mode(16, ["stream skewed", "stream equal"], repeats=1, budget_s=10)
  assert timed["info"]["stream skewed"]["largest"] == 640
  assert timed["info"]["stream equal"]["batch_steps"] == 16 * 4
  assert all(len(timed["times_s"][n]) == 1 for n in ("stream skewed", "stream equal"))


def test_export_cost_does_not_embed_the_parameters():
  row = export_cost.one("params", 100_000, "stablehlo")
  assert row["eqns"] > 0 and row["export_s"] > 0
  assert row["bytes_written"] < row["param_bytes"] / 4  # 400 kB of parameters, none written


@pytest.mark.slow  # draws the plots: importing matplotlib and rendering take ~8 s
def test_report_verdicts_and_files(tmp_path):
  def row(s, peak=300.0):
    return {"median_s": s, "min_s": s, "max_s": s, "runs": 1, "peak_mb": peak, "delta_mb": 1.0}

  fedavg = {
      "128": {"faxbridge auto": row(0.4), "jit+vmap": row(1.0), "TFF hand-written": row(1.0),
              "TFF running faxbridge's export": row(1.2)},
      "2048": {"faxbridge auto": row(6.4, peak=2048.0), "jit+vmap": row(16.0)},
      "8192": {"faxbridge auto": row(25.6), "jit+vmap": {"skipped": "too big"}},
  }
  results = {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "python": "3", "platform": "p"},
             "versions": {"jax": "0"}, "total_s": 1.0, "fedavg": fedavg,
             "export_cost": [{"kind": "params", "size": 100, "target": "tff", "eqns": 5,
                              "export_s": 0.1, "peak_mb": 1.0, "delta_mb": 0.5,
                              "bytes_written": 10}]}
  skew = {"examples": 8192, "batch_steps": 576, "temp_mb": 30.0}
  equal = {"batch_steps": 512, "temp_mb": 30.0}
  results["ragged"] = {"128": {
      "stream skewed": {**row(1.2), **skew}, "stream equal": {**row(1.0), **equal},
      "vmap skewed": {**row(8.0), **skew}, "vmap equal": {**row(1.0), **equal}}}
  report.write(results, tmp_path)
  text = (tmp_path / "results.md").read_text()
  assert '(128 clients, ("stream", 8)) | 1.20x | met |' in text
  assert "| 128 | vmap | 8.0000 | 1.0000 | 8.00x | 8.00x |" in text
  assert "| auto at 128 clients <= 0.45x jit+vmap | 0.40x | met |" in text
  assert "| auto at 2,048 clients <= 0.3x jit+vmap | 0.40x | missed by 33% |" in text
  assert "peak memory <= 1 GiB (absolute, fresh process) | 2.00 GiB | missed by 100% |" in text
  # 0.4/128, 6.4/2048, 25.6/8192 s per client: 3.1, 3.1, 3.1 ms: flat.
  assert "[128, 2048, 8192] clients | 1.00x | met |" in text
  assert "<= 1.10x hand-written TFF at 128 clients | 1.20x | missed by 9% |" in text
  assert "skipped: too big" in text
  assert (tmp_path / "results" / "fedavg_round.png").stat().st_size > 0
  assert (tmp_path / "results" / "export_cost.png").stat().st_size > 0


@pytest.mark.slow
def test_run_quick_end_to_end(tmp_path):
  """``run.py --quick`` at one size, 2 clients (every row starts fresh processes, TFF's too: a
  second size would start them all again and show nothing new): every row, TFF's two rounds
  agreeing."""
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--sizes", "2",
                  "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=1800)
  results = json.loads((tmp_path / "results.json").read_text())
  names = set(fedavg_round.impls(2))
  for size in ("2",):
    rows = results["fedavg"][size]
    assert names <= set(rows)
    assert all("median_s" in rows[n] for n in names)
    if (ROOT / ".venv-tff" / "bin" / "python").exists():
      export = rows["TFF running faxbridge's export"]
      assert export["max_abs_diff_vs_hand"] < 1e-5
  if results.get("tff_profile"):
    s = results["tff_profile"]["structure"]
    # The export has the hand-written round's structure: no extra intrinsic calls or TF pieces.
    assert s["export"]["nodes"]["intrinsic"] == s["hand"]["nodes"]["intrinsic"]
    assert s["export"]["nodes"]["tensorflow"] == s["hand"]["nodes"]["tensorflow"]
  assert {r["target"] for r in results["export_cost"]} == {"tff", "stablehlo"}
  assert set(results["ragged"]["16"]) == set(ragged_round.impls())
  assert (tmp_path / "results.md").exists()

"""Every benchmark runs at tiny size, so none rots; no speed target lives here.

Quick: each native FedAvg implementation equals a per-client reference round, the timing and
memory modes return what ``run.py`` reads, export cost stays small with the parameters (they are
inputs), the peers' check names what differs, memory counts a peer's child processes, and the report's
target verdicts are computed right. Slow: ``run.py --quick`` end to end at 2 clients, TFF's
hand-written round and the export included; the big-model round and the accelerator check at tiny
sizes on the CPU. Marked ``bench`` (deselected by ``make test``, run by ``make test-bench``): pfl's and
Flower's rounds in .venv-bench, each checked against the reference round.
"""

from __future__ import annotations

import json
import os
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
import peer_io  # noqa: E402
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
                  "--huge-sizes", "16", "--skip", "peers", "--out", str(tmp_path)], check=True, cwd=ROOT,
                 timeout=1800)
  results = json.loads((tmp_path / "results.json").read_text())
  huge = results["huge"]["16"]
  assert huge["median_s"] > 0 and huge["peak_mb"] >= huge["baseline_mb"]
  assert set(results["big_model"]["impls"]) == {"faxbridge vmap", "faxbridge stream", "drjax"}
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
  text = (tmp_path / "results.md").read_text()
  assert "## The round at many clients, one process" in text and "| 16 | faxbridge auto |" in text
  assert "## Big-model round (clients x model mesh)" in text


# -- the transformer the model-axes tests and the big-model round share --------------------------------
def test_the_transformer_counts_its_parameters_and_shards_its_matmuls():
  import jax
  from transformer_model import MEGATRON, Transformer, megatron_specs

  small = Transformer(layers=2, d=16, heads=4, f=32, t=3, vocab=11, batch=2)
  params = small.params(np.random.default_rng(0))
  assert small.num_params() == sum(leaf.size for leaf in jax.tree.leaves(params))
  specs = megatron_specs(params)
  for layer in specs["layers"]:
    assert {k: v for k, v in layer.items() if k in MEGATRON} == MEGATRON
    assert layer["ln"] == jax.sharding.PartitionSpec() == layer["ln2"]
  assert specs["embed"] == jax.sharding.PartitionSpec()
  data = small.data(np.random.default_rng(1), clients=5)
  assert data.shape == (5, 2, 4) and data.dtype == np.int32 and data.max() < 11


@pytest.mark.slow  # a fresh process on 8 host devices compiling three rounds: ~15 s
def test_big_model_round_tiny_agrees_and_keeps_the_model_sharding(tmp_path):
  """``big_model.py`` at a tiny size: the three rounds agree, their outputs keep the Megatron sharding,
  and faxbridge takes per device no more than drjax on the same program and mesh."""
  done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "big_model.py"), "--layers", "2", "--d",
                         "64", "--f", "256", "--heads", "4", "--repeats", "1"], capture_output=True,
                        text=True, cwd=ROOT, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert got["mesh"] == {"clients": 2, "model": 4} and got["clients"] == 8
  impls = got["impls"]
  assert set(impls) == {"faxbridge vmap", "faxbridge stream", "drjax"}
  assert impls["faxbridge stream"]["strategy"] == "('stream', 1)"
  for name, row in impls.items():
    assert row["max_abs_diff_vs"][1] <= 1e-5, name
    assert "P(None, 'model')" in row["out_specs"] and "P('model',)" in row["out_specs"], name
    assert row["median_s"] > 0 and row["memory"]["arguments"] == got["shard_bytes"], name
  for name in ("faxbridge vmap", "faxbridge stream"):
    for kind in ("outputs", "temporaries", "total"):
      assert impls[name]["memory"][kind] <= impls["drjax"]["memory"][kind], (name, kind)


# -- the 100,000-client round's measurement ------------------------------------------------------------
@pytest.mark.slow  # compiles the streamed round (~5 s)
def test_huge_mode_times_and_measures_the_round_beside_the_data():
  got = fedavg_round.huge_mode(64, "faxbridge auto", repeats=2, budget_s=30)
  assert got["data_mb"] == pytest.approx(64 * (32 * 256 * 4 + 32 * 4) / 2**20)
  assert len(got["times_s"]) == 2 and all(t > 0 for t in got["times_s"])
  assert got["peak_mb"] >= got["baseline_mb"] > got["data_mb"]
  assert got["auto_picked"] == "('stream', 8)"
  assert 0 < got["xla_temp_mb"] < 64  # a block of 8 clients' values, not 64


# -- the peers' plumbing (numpy only: runs without .venv-bench) -------------------------------------------
def test_peer_check_names_what_differs_and_what_was_never_trained(tmp_path):
  rng = np.random.default_rng(0)
  initial = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("w1", (4, 3)), ("b1", (3,)), ("w2", (3, 2)), ("b2", (2,)))}
  reference = {n: v + 0.01 for n, v in initial.items()}
  np.savez(tmp_path / "reference.npz", **reference)
  assert peer_io.check(tmp_path, {n: v + 1e-7 for n, v in reference.items()})["ok"]
  got = {**reference, "w1": initial["w1"], "b2": reference["b2"] + 1e-3}
  checked = peer_io.check(tmp_path, got)
  assert not checked["ok"]
  assert checked["max_abs_diff"]["w1"] == pytest.approx(0.01, rel=1e-3)
  why = peer_io.mismatch_reason(checked, got, initial)
  assert why.startswith("differs from the reference round in w1 (max abs diff 1.0e-02), b2 (")
  assert why.endswith("w1 left as they were: not trained")
  assert "shape" in peer_io.check(tmp_path, {**reference, "w2": reference["w2"].T})["why"]


def test_peak_memory_counts_the_processes_a_peer_starts():
  """Ray's processes are the driver's descendants: their memory must count. A child holding 300 MB.

  This process's own memory moves meanwhile (an xdist worker frees what earlier tests held), so
  the tree is compared with this process's own resident set read at the same moment, and the
  peak's rise above the baseline is given 110 MB of room for what this process gave back."""
  code = "import sys, time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
         "print('ready', flush=True); time.sleep(30)"
  with peer_io.PeakMemory(every=0.02) as mem:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
      assert child.stdout.readline().strip() == "ready"
      assert peer_io.tree_rss_mb() - _own_rss_mb() >= 290
    finally:
      child.kill()
      child.wait()
  assert mem.report()["delta_mb"] >= 190


def _own_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow  # the reference round compiles the client update (~2 s)
def test_peers_mode_writes_the_inputs_and_the_reference(tmp_path):
  fedavg_round.peers_mode(3, tmp_path)
  params, x, y = peer_io.load(tmp_path, mmap=True)
  data = model.client_data(3)
  np.testing.assert_array_equal(x, data["x"])
  np.testing.assert_array_equal(y, data["y"])
  assert set(params) == set(model.PARAM_NAMES)
  # The reference it wrote is the reference round's, which peer_io's check accepts as is.
  expected = model.reference_round(model.init_params(), data)
  assert peer_io.check(tmp_path, expected)["ok"]
  assert not peer_io.check(tmp_path, model.init_params())["ok"]  # an untrained model is caught


# -- the report's new sections -----------------------------------------------------------------------
def _huge_row(median_s, data_mb, baseline_mb, peak_mb, xla_temp_mb=32.75):
  return {"median_s": median_s, "min_s": median_s, "max_s": median_s, "runs": 1, "first_call_s": 1.0,
          "data_mb": data_mb, "baseline_mb": baseline_mb, "peak_mb": peak_mb,
          "delta_mb": peak_mb - baseline_mb, "process_maxrss_mb": 2 * data_mb, "auto_picked": "x",
          "xla_temp_mb": xla_temp_mb}


def test_report_verdicts_of_the_huge_round_and_peer_rows():
  huge = {"10000": _huge_row(3.3, 314.0, 490.0, 620.0),
          "100000": _huge_row(27.0, 3137.0, 3300.0, 3440.0, xla_temp_mb=33.0)}
  text = "\n".join(report.targets({}, huge))
  assert "| auto at 100,000 clients (one process) <= 0.3 ms per client | 0.27 ms | met |" in text
  # 140 MB of the round's own at 100,000 clients against 130 at 10,000: 1.08x.
  assert "(peak - baseline) at 100,000 <= 1.1x at 10,000 | 1.08x | met |" in text
  assert "temporaries at 100,000 <= 1.0x at 10,000 | 1.01x | missed by 1% |" in text
  table = "\n".join(report.huge_table(huge))
  assert "| 100,000 | faxbridge auto | 27.000 |" in table
  assert "| 0.270 | 3137 | 3300 | 3440 | 140 | 303 | 33.0 |" in table
  old = {k: {n: v for n, v in row.items() if n != "xla_temp_mb"} for k, row in huge.items()}
  assert "| 303 | - |" in "\n".join(report.huge_table(old))  # results from before the column
  rows = {"8": {"jit+vmap": {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "runs": 1, "peak_mb": 1.0,
                             "delta_mb": 1.0},
                "pfl (Keras 3)": {"mismatch": "differs | in w1"},
                "pfl (tf-keras)": {"median_s": 2.0, "min_s": 2.0, "max_s": 2.0, "runs": 3, "peak_mb": 9.0,
                                   "delta_mb": 1.0, "max_abs_diff_vs_reference": 2e-8}}}
  table = "\n".join(report.fedavg_tables(rows))
  assert "| pfl (Keras 3) | - | - | - | - | - | - | - | - | mismatch: differs / in w1 |" in table
  assert "| pfl (tf-keras) | 2.0000 |" in table and "checked: max abs diff 2.0e-08 to the reference" in table


def test_report_big_model_table():
  mem = {"arguments": 2**20, "outputs": 2**20, "temporaries": 4 * 2**20, "aliased": 0, "xla_peak": 0,
         "total": 6 * 2**20}
  row = {"median_s": 4.6, "min_s": 4.3, "runs": 2, "compile_s": 5.0, "memory": mem,
         "out_specs": ["P()", "P(None, 'model')"], "max_abs_diff_vs": ["faxbridge vmap", 0.0]}
  big = {"model": {"layers": 8, "d": 1024, "heads": 16, "f": 4096, "t": 2, "vocab": 32, "batch": 2,
                   "parameters": 100_745_216}, "mesh": {"clients": 2, "model": 4}, "clients": 8,
         "platform": "cpu", "process_peak_mb": 9216.0,
         "impls": {"faxbridge vmap": {**row, "strategy": "vmap"}}}
  text = "\n".join(report.big_model_table(big))
  assert "100.7M parameters (8 layers, d=1024, 16 heads, f=4096)" in text
  assert "clients 2 x model 4 mesh" in text
  assert "| faxbridge vmap | vmap | 4.600 | 4.300 | 2 | 5.0 | 1.0 | 1.0 | 4.0 | 6.0 | " \
         "P(), P(None, 'model') |" in text


# -- the accelerator check, at its small sizes on the CPU ----------------------------------------------
@pytest.mark.slow  # 4 fresh processes, 10 compiles: ~1-2 min on 2 cores
def test_device_check_runs_on_the_cpu_and_writes_its_report(tmp_path):
  out = tmp_path / "results-gpu.md"
  done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--small", "--repeats", "1",
                         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                        env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  results = json.loads(out.with_suffix(".json").read_text())
  assert results["environment"]["platform"] == "cpu" and results["small"]
  for size in ("8", "32", "64"):
    got = results["anchor"][size]
    assert set(got["times_s"]) == {"faxbridge auto", "jit+vmap", "scan of vmap blocks"}, got
    assert not got["errors"]
  assert set(results["transformer"]["impls"]) == {"faxbridge vmap", "faxbridge stream", "drjax"}
  text = out.read_text()
  assert "| 64 | scan of vmap blocks |" in text and "| 1.00x |" in text
  assert "| faxbridge stream | ('stream', 1) |" in text


# -- the peers, in .venv-bench (`make test-bench`; `make test` deselects these) ---------------------------
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
# Skipped, and saying why, only where the environment is not built; CI never counts them (make test
# deselects the `bench` marker, so a skip cannot pass for a run).
bench_env = pytest.mark.skipif(not BENCH_PY.exists(), reason=f"{BENCH_PY} is not built: `make test-bench` "
                               "builds it from requirements/bench.lock and runs these")


@pytest.fixture(scope="module")
def peer_inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp("peers")
  fedavg_round.peers_mode(3, folder)
  return folder


def _peer(script: str, folder: Path, *args: str) -> dict:
  done = subprocess.run([str(BENCH_PY), str(ROOT / "benchmarks" / script), "--inputs", str(folder),
                         "--repeats", "3", *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.bench
@pytest.mark.slow
@bench_env
@pytest.mark.parametrize("keras", ["2", "3"])
def test_pfl_round_is_checked_before_it_is_timed(peer_inputs, keras):
  got = _peer("pfl_round.py", peer_inputs, "--keras", keras)
  if keras == "2":  # tf-keras names each layer's variables apart: pfl trains all four
    assert got["check"]["ok"] and max(got["check"]["max_abs_diff"].values()) < 1e-6
    assert len(got["times_s"]) == 3 and "mismatch" not in got
    assert len(got["tracked_variables"]) == 4
  else:  # Keras 3 names both kernels "kernel": pfl tracks 2 of 4 variables, and the round is wrong
    assert not got["check"]["ok"] and "times_s" not in got
    assert got["tracked_variables"] == ["bias", "kernel"]
    assert "differs from the reference round in w1" in got["mismatch"]
    assert "pfl tracks 2 of the model's 4 trainable variables" in got["mismatch"]
  assert got["memory"]["peak_mb"] >= got["memory"]["baseline_mb"] > 0


@pytest.mark.bench
@pytest.mark.slow
@bench_env
def test_flower_simulation_round_equals_the_reference(peer_inputs):
  got = _peer("flower_round.py", peer_inputs)
  assert got["check"]["ok"] and max(got["check"]["max_abs_diff"].values()) < 1e-6, got
  assert len(got["times_s"]) == 3 and all(t > 0 for t in got["times_s"])
  assert got["versions"]["flwr"].startswith("1.42")
  # Ray's processes count: the tree's peak is well above the driver's own.
  assert got["memory"]["peak_mb"] > got["memory"]["process_peak_mb"]


@pytest.mark.bench
@pytest.mark.slow
@bench_env
def test_run_quick_gives_the_peers_rows(tmp_path):
  """``run.py`` wires the peers in: at 2 clients, pfl under Keras 3 is a mismatch (no time), pfl under
  tf-keras and Flower's simulation are timed and checked, and their versions are in the report."""
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--sizes", "2",
                  "--skip", "tff", "huge", "big_model", "export", "--out", str(tmp_path)], check=True,
                 cwd=ROOT, timeout=1800)
  results = json.loads((tmp_path / "results.json").read_text())
  rows = results["fedavg"]["2"]
  assert "differs from the reference round" in rows["pfl (Keras 3)"]["mismatch"]
  for name in ("pfl (tf-keras)", "Flower simulation (Ray)"):
    assert rows[name]["median_s"] > 0 and rows[name]["max_abs_diff_vs_reference"] < 1e-6, name
  versions = results["versions"]
  assert versions[".venv-bench pfl"] == "0.6.0" and versions[".venv-bench flwr"] == "1.42.0"
  text = (tmp_path / "results.md").read_text()
  assert "| pfl (Keras 3) | - |" in text and ".venv-bench pfl 0.6.0" in text


# -- run.py --update ------------------------------------------------------------------------------------
@pytest.mark.parametrize("skipped", [["tff"], ["peers"], ["tff", "peers"]])
def test_update_refuses_to_rerun_the_fedavg_section_without_its_tff_or_peer_rows(skipped, capsys):
  import run

  with pytest.raises(SystemExit) as stop:
    run.main(["--update", "--skip", *skipped, "huge", "big_model", "export", "ragged", "overhead"])
  assert stop.value.code == 2  # a usage error, before anything ran or was written
  assert "replaces the FedAvg section whole" in capsys.readouterr().err


@pytest.mark.slow  # compiles the two overhead rounds at 2 and 4 clients (~10 s)
def test_update_reruns_the_sections_it_does_not_skip_and_keeps_the_others_with_their_dates(tmp_path):
  earlier = json.loads((ROOT / "benchmarks" / "results.json").read_text())
  (tmp_path / "results.json").write_text(json.dumps(earlier))
  subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--update", "--out", str(tmp_path),
                  "--skip", "fedavg", "tff", "peers", "huge", "big_model", "export", "ragged"],
                 check=True, cwd=ROOT, capture_output=True, timeout=600)
  now = json.loads((tmp_path / "results.json").read_text())
  assert set(now["overhead"]) == {"2", "4"} and now["sections"]["overhead"] != earlier["sections"]["overhead"]
  for key in ("fedavg", "tff_profile", "huge", "big_model", "ragged", "export_cost"):
    assert now[key] == earlier[key] and now["sections"][key] == earlier["sections"][key], key

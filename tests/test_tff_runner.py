"""Tests of the TFF runtime package (converters/runtimes/tff/: the core-side client and the runner
in .venv-tff) against real TF 2.14 and TFF 0.87 runs.

Every answer is checked against numpy written independently of TF and TFF. Runner starts cost
seconds each, so the slow tests share batched calls through module-scoped fixtures.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tff_testing as tt

import faxbridge as fb
from faxbridge._src.errors import VerificationError
from faxbridge.converters.runtimes import tff as rt
from faxbridge.converters.runtimes.tff import launch

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# The environment


def test_missing_env_names_the_command(monkeypatch, tmp_path):
  monkeypatch.delenv(rt.ENV_VAR, raising=False)
  monkeypatch.setattr(launch, "REPO_ROOT", tmp_path)
  with pytest.raises(VerificationError, match=re.escape("make .venv-tff/.ready")):
    rt.tff_python()
  # Nothing starts: the batch entry points fail the same way before writing anything.
  with pytest.raises(VerificationError, match=re.escape("make .venv-tff/.ready")):
    rt.run_graph(b"", {}, ["y"])
  # A half-built environment (no .ready marker from the Makefile) is refused too.
  python = tmp_path / ".venv-tff" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("")
  with pytest.raises(VerificationError, match=r"incomplete.*make \.venv-tff/\.ready"):
    rt.tff_python()
  monkeypatch.setenv(rt.ENV_VAR, str(tmp_path / "nowhere" / "python"))
  with pytest.raises(VerificationError, match=rf"{rt.ENV_VAR}.*make \.venv-tff/\.ready"):
    rt.tff_python()


def test_plain_graph_refuses_ops_outside_the_plain_set():
  spec = tf.TensorSpec([3], tf.float32)
  assert tt.plain_graph(lambda x: tf.tanh(x) * x, spec).ops == {"Placeholder", "Tanh", "Mul",
                                                                "Identity"}
  with pytest.raises(AssertionError, match="Erf"):
    tt.plain_graph(tf.math.erf, spec)


# ----------------------------------------------------------------------------------------------
# The runner imports nothing from faxbridge (whose __init__ needs numpy 2 and modern JAX)

RUNNER_MODULES = sorted(p.stem for p in rt.RUNNER.glob("*.py"))
# All that .venv-tff offers the runner besides the standard library and its own package.
RUNNER_MAY_IMPORT = {"numpy", "tensorflow", "tensorflow_federated"}
# Top-level names under which faxbridge's code would show up in .venv-tff: the packages, and the
# core-side modules beside tff_runner/ (its parent folder is on the runner's sys.path).
CORE_NAMES = {"faxbridge", "converters"} | {
    p.stem for p in rt.RUNNER.parent.glob("*.py") if p.stem != "__init__"}


def test_runner_sources_import_only_stdlib_numpy_tf_tff_and_themselves():
  """Every import in tff_runner/ is relative, or of the standard library, numpy, TF or TFF; only
  __main__ names ``tff_runner`` (it runs before the package is imported)."""
  assert {"__main__", "cli", "computations", "values"} <= set(RUNNER_MODULES)
  seen = set()
  for path in sorted(rt.RUNNER.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        seen.add(top)
        allowed = (top in sys.stdlib_module_names or top in RUNNER_MAY_IMPORT
                   or (path.name == "__main__.py" and top == "tff_runner"))
        assert allowed, f"{path.name}:{node.lineno} imports {name}"
  assert seen >= RUNNER_MAY_IMPORT  # the walk saw the imports it is meant to check


@pytest.mark.slow
def test_runner_modules_load_in_tff_env_without_faxbridge(tmp_path):
  """In .venv-tff, with the runner's parent folder on sys.path as __main__ puts it, every module
  of the package imports, and no module of the repository outside tff_runner/ is loaded."""
  script = "\n".join([
      "import importlib, json, sys",
      f"sys.path.append({str(rt.RUNNER.parent)!r})",
      f"for name in {RUNNER_MODULES!r}:",
      "  if name != '__main__':",
      "    importlib.import_module('tff_runner' + ('' if name == '__init__' else '.' + name))",
      "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()}))"])
  python = rt.tff_python()
  proc = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  modules = json.loads(proc.stdout.splitlines()[-1])
  runner, venv = rt.RUNNER.resolve(), python.parent.parent.resolve()

  def where(name):
    file = modules[name]
    return Path(file).resolve() if file else None

  ours = {n for n in modules if where(n) and where(n).is_relative_to(runner)}
  assert ours == {"tff_runner"} | {f"tff_runner.{m}" for m in RUNNER_MODULES
                                   if m not in ("__init__", "__main__")}
  repo = launch.REPO_ROOT.resolve()
  foreign = {n: modules[n] for n in modules
             if n.split(".")[0] in CORE_NAMES
             or (where(n) and where(n).is_relative_to(repo) and not where(n).is_relative_to(venv)
                 and n not in ours)}
  assert not foreign
  assert "tensorflow_federated" in modules


# ----------------------------------------------------------------------------------------------
# Plain GraphDefs in TF 2.14


def _u32(x):
  return np.asarray(x, np.uint32)


def _threefry_like(a, b):
  """uint32 wrapping arithmetic, xor, shifts, or and a bitcast to float32 in [0, 1)."""
  mixed = (a * b + tf.constant(0x9E3779B9, tf.uint32)) ^ tf.bitwise.right_shift(a, 7)
  mixed = mixed ^ tf.bitwise.left_shift(b, 13)
  bits = tf.bitwise.bitwise_or(tf.bitwise.right_shift(mixed, 9), tf.constant(0x3F800000, tf.uint32))
  return mixed, tf.bitcast(bits, tf.float32) - 1.0


def _threefry_like_np(a, b):
  with np.errstate(over="ignore"):
    mixed = (a * b + _u32(0x9E3779B9)) ^ (a >> _u32(7))
    mixed = mixed ^ (b << _u32(13))
  bits = (mixed >> _u32(9)) | _u32(0x3F800000)
  return mixed, bits.view(np.float32) - np.float32(1.0)


@pytest.fixture(scope="module")
def graph_batch():
  """One runner call: a dense layer twice (shared graph), reductions, uint32 bits, a bad graph."""
  rng = np.random.default_rng(0)
  f32 = tf.float32
  dense = tt.plain_graph(lambda x, w: tf.tanh(tf.matmul(x, w)),
                         tf.TensorSpec([2, 3], f32), tf.TensorSpec([3, 4], f32))
  reduce = tt.plain_graph(lambda x: (tf.reduce_sum(x, axis=0), tf.reduce_mean(tf.square(x)),
                                     tf.transpose(x)), tf.TensorSpec([5, 2], f32))
  bits = tt.plain_graph(_threefry_like, tf.TensorSpec([6], tf.uint32),
                        tf.TensorSpec([6], tf.uint32))
  broken = tf.compat.v1.GraphDef.FromString(dense.graph_def)
  broken.node[-1].op = "FaxbridgeNoSuchOp"  # an op TF 2.14 has never heard of
  x1, x2 = rng.normal(size=(2, 2, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  r = rng.normal(size=(5, 2)).astype(np.float32)
  a, b = (rng.integers(0, 2**32, size=6, dtype=np.uint64).astype(np.uint32) for _ in range(2))
  jobs = [
      rt.GraphJob(dense.graph_def, {"x": x1, "w:0": w}, dense.outputs),
      rt.GraphJob(reduce.graph_def, {"x:0": r}, reduce.outputs),
      rt.GraphJob(broken.SerializeToString(), {"x": x1, "w": w}, dense.outputs),
      rt.GraphJob(bits.graph_def, dict(zip(bits.inputs, (a, b))), bits.outputs),
      rt.GraphJob(dense.graph_def, {"x": x2, "w": w}, dense.outputs),
  ]
  expected = [[np.tanh(x1 @ w)], [r.sum(0), np.mean(r**2), r.T], None,
              list(_threefry_like_np(a, b)), [np.tanh(x2 @ w)]]
  return jobs, expected, rt.run_graphs(jobs, strict=False)


@pytest.mark.slow
def test_graphs_run_in_tf214_equal_numpy(graph_batch):
  jobs, expected, results = graph_batch
  for job, want, got in zip(jobs, expected, results):
    if want is None:
      continue
    assert list(got) == list(job.outputs)
    for name, value in zip(job.outputs, want):
      assert got[name].shape == np.shape(value)
      if got[name].dtype == np.uint32:
        np.testing.assert_array_equal(got[name], value)
      else:
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_graph_error_surfaces_tf_message_and_stderr(graph_batch):
  _, _, results = graph_batch
  error = results[2]
  assert isinstance(error, VerificationError)
  assert "FaxbridgeNoSuchOp" in str(error) and "runner stderr" in str(error)
  # strict mode (run_graph) raises the same error instead of returning it.
  with pytest.raises(VerificationError, match="FaxbridgeNoSuchOp"):
    rt.run_graph(graph_batch[0][2].graph_def, graph_batch[0][2].inputs, ["Identity:0"])


# ----------------------------------------------------------------------------------------------
# Federated computations on TFF 0.87

NUM_CLIENTS, ROUNDS = 5, 5
INIT = np.array([0.1, -0.2, 0.3], np.float32)


SERVER_X = np.float32(3.0)


@fb.computation(clients=3, in_placements=(fb.SERVER,))
def _broadcast_sum(x):
  """No CLIENTS-placed input: the 3 clients exist only in the decorator (and the manifest)."""
  return fb.sum(fb.broadcast(x)), fb.mean(fb.broadcast(x))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  plain, secure = tt.build_round(secure=False), tt.build_round(secure=True)
  clients = tt.build_client_outputs()
  # The manifest says 2 clients, the inputs carry 5: the inputs win.
  plain_2 = {**tt.round_signature(plain, False), "clients": 2}
  bcast, bcast_secure = tt.build_broadcast_only(False), tt.build_broadcast_only(True)
  return {
      "plain": tt.write_computation(root / "plain", plain, tt.round_signature(plain, False)),
      "secure": tt.write_computation(root / "secure", secure, tt.round_signature(secure, True)),
      "iterative": tt.write_iterative(root / "iterative", INIT),
      "clients": tt.write_computation(root / "clients", clients,
                                      tt.client_outputs_signature(clients)),
      "plain_says_2": tt.write_computation(root / "plain_says_2", plain, plain_2),
      "broadcast_3": tt.write_computation(root / "broadcast_3", bcast,
                                          tt.broadcast_only_signature(bcast, 3)),
      "broadcast_secure_4": tt.write_computation(root / "broadcast_secure_4", bcast_secure,
                                                 tt.broadcast_only_signature(bcast_secure, 4)),
      "broadcast_no_count": tt.write_computation(root / "broadcast_no_count", bcast,
                                                 tt.broadcast_only_signature(bcast, None)),
      "counting": tt.write_counting_process(root / "counting", INIT, init_clients=2,
                                            next_clients=3),
      # faxbridge's own export of a program with no CLIENTS-placed input (3 clients declared);
      # should the exporter fail, only the test of this export fails (with its error).
      "faxbridge": _export_or_error(_broadcast_sum, SERVER_X, out_dir=root / "faxbridge"),
  }


def _export_or_error(comp, *args, out_dir: Path) -> Path | Exception:
  try:
    return fb.export(comp, *args, target="tff", out_dir=out_dir)
  except Exception as e:  # raised by the test that reads this export
    return e


@pytest.fixture(scope="module")
def runner_events() -> list:
  """The events of ``computation_batch``'s runner call, in the order they arrived."""
  return []


@pytest.fixture(scope="module")
def computation_batch(exports, runner_events):
  """One runner call for every federated test; returns the inputs and the runs by name."""
  inputs = tt.round_inputs(NUM_CLIENTS, seed=1)
  per_round = {f"round{r}/{k}": v for r in range(1, ROUNDS + 1)
               for k, v in tt.round_inputs(NUM_CLIENTS + r, seed=10 + r).items() if k != "params"}
  bad = {**inputs, "data/weight": inputs["data/weight"].astype(np.float64)}
  params = {"params": inputs["params"]}
  jobs = {name: job for name, job in {
          "plain": rt.ComputationJob(exports["plain"], inputs, forms=True),
          "secure": rt.ComputationJob(exports["secure"], inputs, forms=True),
          "iterative": rt.ComputationJob(exports["iterative"], per_round, rounds=ROUNDS, forms=True),
          "bad": rt.ComputationJob(exports["plain"], bad),
          "clients": rt.ComputationJob(exports["clients"], inputs),
          "plain_says_2": rt.ComputationJob(exports["plain_says_2"], inputs),
          "broadcast_3": rt.ComputationJob(exports["broadcast_3"], params),
          "broadcast_secure_4": rt.ComputationJob(exports["broadcast_secure_4"], params),
          "broadcast_no_count": rt.ComputationJob(exports["broadcast_no_count"], params),
          "counting": rt.ComputationJob(exports["counting"], {"scale": np.float32(0.5)}, rounds=2),
          "faxbridge": rt.ComputationJob(exports["faxbridge"], {"x": SERVER_X})}.items()
          if not isinstance(job.export_dir, Exception)}
  with fb.events.listen(runner_events.append):
    results = rt.run_computations(list(jobs.values()), strict=False)
  return inputs, per_round, dict(zip(jobs, results))


def _data(inputs, prefix="data/"):
  return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def _assert_outputs(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].shape == np.shape(want[name]), name
    np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.slow
def test_round_on_native_context_equals_numpy(computation_batch):
  inputs, _, runs = computation_batch
  plain = runs["plain"]
  assert plain.kind == "computation" and plain.context == "native"
  assert plain.secure_intrinsics == ()
  want = tt.round_reference(inputs["params"], _data(inputs))
  del want["metrics/count"]
  _assert_outputs(plain.outputs, want)
  assert plain.outputs["params"].dtype == np.float32


@pytest.mark.slow
def test_secure_sum_runs_on_test_context(computation_batch):
  inputs, _, runs = computation_batch
  secure = runs["secure"]
  assert secure.context == "test"
  assert secure.secure_intrinsics == ("federated_secure_sum_bitwidth",)
  _assert_outputs(secure.outputs, tt.round_reference(inputs["params"], _data(inputs)))
  assert secure.outputs["metrics/count"] == inputs["data/count"].sum()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "secure", "iterative"])
def test_map_reduce_and_distribute_aggregate_forms_build_and_agree(computation_batch, which):
  run = computation_batch[2][which]
  assert set(run.forms) == {"mapreduce", "distribute_aggregate"}
  for name, form in run.forms.items():
    assert form.built and form.error is None, (name, form.error)
    assert form.ran and form.run_error is None, (name, form.run_error)
    _assert_outputs(form.outputs, run.outputs)


@pytest.mark.slow
def test_iterative_process_state_after_each_round_equals_numpy(computation_batch):
  _, per_round, runs = computation_batch
  iterative = runs["iterative"]
  assert iterative.kind == "iterative_process"
  np.testing.assert_array_equal(iterative.round(0)["params"], INIT)
  params = INIT.astype(np.float64)
  for r in range(1, ROUNDS + 1):
    want = tt.round_reference(params, _data(per_round, f"round{r}/data/"))
    del want["metrics/count"]
    _assert_outputs(iterative.round(r), want)
    params = want["params"]
  # Per-round data really differed (clients 6..10): the rounds are not one repeated round.
  assert iterative.round(1)["metrics/loss"] != iterative.round(2)["metrics/loss"]


@pytest.mark.slow
def test_the_runner_reports_each_round_while_it_runs(computation_batch, runner_events):
  """The runner's progress lines (``--progress``) arrive here as events, job by job, as TFF
  starts each computation: the iterative job's initialize and rounds, then its forms' rebuilds'."""
  names = list(computation_batch[2])
  assert [e.name for e in runner_events[:2]] == ["tff.start", "tff.imported"]
  by_who: dict[str, list[str]] = {}
  for event in runner_events:
    if event.name == "round":
      by_who.setdefault(event.fields["who"], []).append(event.message)
  job = f"tff job {names.index('iterative')}"
  steps = ["initialize", *(f"round {r} of {ROUNDS}" for r in range(1, ROUNDS + 1))]
  assert by_who[job] == [f"{job}: {s}" for s in steps]
  for form in ("MapReduceForm", "DistributeAggregateForm"):
    who = f"{job} (next rebuilt from {form})"
    assert by_who[who] == [f"{who}: {s}" for s in steps]
  plain = f"tff job {names.index('plain')}"
  assert by_who[plain] == [f"{plain}: computation"]
  times = [e.time for e in runner_events]
  assert times == sorted(times) and times[-1] > times[0]


@pytest.mark.slow
def test_wrong_input_dtype_is_named_and_other_jobs_still_run(computation_batch):
  _, _, runs = computation_batch
  error = runs["bad"]
  assert isinstance(error, VerificationError)
  assert re.search(r"'data/weight' has dtype float64, the type says float32", str(error))
  failing = {"bad", "broadcast_no_count"}
  assert all(isinstance(run, rt.TffRun) for name, run in runs.items() if name not in failing)


@pytest.mark.slow
def test_client_placed_results_come_back_stacked_on_a_client_axis(computation_batch):
  inputs, _, runs = computation_batch
  run = runs["clients"]
  want = tt.client_outputs_reference(inputs["params"], _data(inputs))
  _assert_outputs(run.outputs, want)
  assert run.outputs["clients/delta"].shape == (NUM_CLIENTS, 3)
  np.testing.assert_array_equal(run.outputs["clients/count"], inputs["data/count"])


# Number of clients (docs/tff_runner_protocol.md): TFF infers it from CLIENTS-placed inputs only,
# and would otherwise run on zero clients.


@pytest.mark.slow
@pytest.mark.parametrize(("name", "clients", "context"),
                         [("broadcast_3", 3, "native"), ("broadcast_secure_4", 4, "test")])
def test_manifest_client_count_used_when_no_input_carries_one(computation_batch, name, clients,
                                                              context):
  inputs, _, runs = computation_batch
  run = runs[name]
  assert run.context == context
  _assert_outputs(run.outputs, tt.broadcast_only_reference(inputs["params"], clients))
  assert run.outputs["count"] == clients  # exactly, and not the zero clients TFF defaults to


@pytest.mark.slow
def test_faxbridge_export_with_server_inputs_runs_on_its_declared_clients(exports, computation_batch):
  if isinstance(exports["faxbridge"], Exception):
    raise exports["faxbridge"]
  manifest = json.loads((exports["faxbridge"] / "manifest.json").read_text())
  assert manifest["computation"]["clients"] == 3
  assert not any(e["placement"] == "CLIENTS" for e in manifest["computation"]["inputs"])
  _assert_outputs(computation_batch[2]["faxbridge"].outputs,
                  {"out_0": 3 * SERVER_X, "out_1": SERVER_X})


@pytest.mark.slow
def test_clients_input_wins_over_the_manifest_count(computation_batch):
  inputs, _, runs = computation_batch
  want = tt.round_reference(inputs["params"], _data(inputs))
  del want["metrics/count"]
  _assert_outputs(runs["plain_says_2"].outputs, want)  # loss_sum over all 5 clients, not 2


@pytest.mark.slow
def test_no_clients_input_and_no_manifest_count_fails_clearly(computation_batch):
  error = computation_batch[2]["broadcast_no_count"]
  assert isinstance(error, VerificationError)
  assert re.search(r'no CLIENTS-placed input gives the number of clients and its manifest block '
                   r'has no "clients" field', str(error))


@pytest.mark.slow
def test_iterative_process_blocks_each_give_their_client_count(computation_batch):
  run = computation_batch[2]["counting"]
  # initialize sums INIT over its 2 clients; each next scales the sum over 3 clients by 0.5.
  state = 2 * INIT.astype(np.float64)
  _assert_outputs(run.round(0), {"state": state})
  for r in (1, 2):
    state = 0.5 * 3 * state
    _assert_outputs(run.round(r), {"state": state, "count": np.int32(3)})


@pytest.mark.slow
def test_runner_ends_worker_binary_so_pipes_close(exports, tmp_path):
  """Runs the runner by path with pipes, as the core side does (but with pipes): a surviving
  worker_binary would keep them open. ``-X importtime`` lists every module it imported."""
  inputs = tt.round_inputs(3, seed=2)
  with open(tmp_path / "in.npz", "wb") as f:
    np.savez(f, **inputs)
  command = [str(rt.tff_python()), "-X", "importtime", str(rt.RUNNER), "computation", "--dir",
             str(exports["plain"]), "--inputs", "in.npz", "--outputs", "out.npz", "--status",
             "status.json"]
  proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True)
  try:
    _, stderr = proc.communicate(timeout=180)  # returns only when every pipe writer is gone
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr.decode()[-3000:]
  status = json.loads((tmp_path / "status.json").read_text())
  ended = [c for c in status["ended_children"] if "worker_binary" in c["cmdline"]]
  assert ended, status["ended_children"]  # a worker was started, and the runner ended it
  ps = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True, check=True)
  leftovers = [line for line in ps.stdout.splitlines()
               if "worker_binary" in line and int(line.split()[1]) == proc.pid]
  assert not leftovers
  with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
    want = tt.round_reference(inputs["params"], _data(inputs))
    np.testing.assert_allclose(out["params"], want["params"], rtol=RTOL, atol=ATOL)
  imported = [line.rsplit("|", 1)[1].strip() for line in stderr.decode().splitlines()
              if line.startswith("import time:") and "|" in line]
  assert {"tff_runner.cli", "tff_runner.computations", "tensorflow_federated"} <= set(imported)
  assert not [name for name in imported if name.split(".")[0] in CORE_NAMES]

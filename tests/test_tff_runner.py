"""Tests of converters/runtimes/tff.py and tff_runner.py against real TF 2.14 and TFF 0.87 runs.

Every answer is checked against numpy written independently of TF and TFF. Runner starts cost
seconds each, so the slow tests share batched calls through module-scoped fixtures.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tff_testing as tt

from faxbridge.converters.runtimes import tff as rt
from faxbridge.errors import VerificationError

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# The environment


def test_missing_env_names_the_command(monkeypatch, tmp_path):
  monkeypatch.delenv(rt.ENV_VAR, raising=False)
  monkeypatch.setattr(rt, "REPO_ROOT", tmp_path)
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


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  plain, secure = tt.build_round(secure=False), tt.build_round(secure=True)
  clients = tt.build_client_outputs()
  return {
      "plain": tt.write_computation(root / "plain", plain, tt.round_signature(plain, False)),
      "secure": tt.write_computation(root / "secure", secure, tt.round_signature(secure, True)),
      "iterative": tt.write_iterative(root / "iterative", INIT),
      "clients": tt.write_computation(root / "clients", clients,
                                      tt.client_outputs_signature(clients)),
  }


@pytest.fixture(scope="module")
def computation_batch(exports):
  """One runner call for every federated test: plain, secure, 5 rounds, a bad input, clients."""
  inputs = tt.round_inputs(NUM_CLIENTS, seed=1)
  per_round = {f"round{r}/{k}": v for r in range(1, ROUNDS + 1)
               for k, v in tt.round_inputs(NUM_CLIENTS + r, seed=10 + r).items() if k != "params"}
  bad = {**inputs, "data/weight": inputs["data/weight"].astype(np.float64)}
  jobs = [rt.ComputationJob(exports["plain"], inputs, forms=True),
          rt.ComputationJob(exports["secure"], inputs, forms=True),
          rt.ComputationJob(exports["iterative"], per_round, rounds=ROUNDS, forms=True),
          rt.ComputationJob(exports["plain"], bad),
          rt.ComputationJob(exports["clients"], inputs)]
  return inputs, per_round, rt.run_computations(jobs, strict=False)


def _data(inputs, prefix="data/"):
  return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


def _assert_outputs(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].shape == np.shape(want[name]), name
    np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.slow
def test_round_on_native_context_equals_numpy(computation_batch):
  inputs, _, (plain, *_) = computation_batch
  assert plain.kind == "computation" and plain.context == "native"
  assert plain.secure_intrinsics == ()
  want = tt.round_reference(inputs["params"], _data(inputs))
  del want["metrics/count"]
  _assert_outputs(plain.outputs, want)
  assert plain.outputs["params"].dtype == np.float32


@pytest.mark.slow
def test_secure_sum_runs_on_test_context(computation_batch):
  inputs, _, (_, secure, *_) = computation_batch
  assert secure.context == "test"
  assert secure.secure_intrinsics == ("federated_secure_sum_bitwidth",)
  _assert_outputs(secure.outputs, tt.round_reference(inputs["params"], _data(inputs)))
  assert secure.outputs["metrics/count"] == inputs["data/count"].sum()


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=["plain", "secure", "iterative"])
def test_map_reduce_and_distribute_aggregate_forms_build_and_agree(computation_batch, which):
  run = computation_batch[2][which]
  assert set(run.forms) == {"mapreduce", "distribute_aggregate"}
  for name, form in run.forms.items():
    assert form.built and form.error is None, (name, form.error)
    assert form.ran and form.run_error is None, (name, form.run_error)
    _assert_outputs(form.outputs, run.outputs)


@pytest.mark.slow
def test_iterative_process_state_after_each_round_equals_numpy(computation_batch):
  _, per_round, (_, _, iterative, *_) = computation_batch
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
def test_wrong_input_dtype_is_named_and_other_jobs_still_run(computation_batch):
  _, _, results = computation_batch
  error = results[3]
  assert isinstance(error, VerificationError)
  assert re.search(r"'data/weight' has dtype float64, the type says float32", str(error))
  assert all(isinstance(r, rt.TffRun) for r in results[:3] + results[4:])


@pytest.mark.slow
def test_client_placed_results_come_back_stacked_on_a_client_axis(computation_batch):
  inputs, _, results = computation_batch
  run = results[4]
  want = tt.client_outputs_reference(inputs["params"], _data(inputs))
  _assert_outputs(run.outputs, want)
  assert run.outputs["clients/delta"].shape == (NUM_CLIENTS, 3)
  np.testing.assert_array_equal(run.outputs["clients/count"], inputs["data/count"])


@pytest.mark.slow
def test_runner_ends_worker_binary_so_pipes_close(exports, tmp_path):
  """Runs the runner directly with pipes: a surviving worker_binary would keep them open."""
  inputs = tt.round_inputs(3, seed=2)
  with open(tmp_path / "in.npz", "wb") as f:
    np.savez(f, **inputs)
  command = [str(rt.tff_python()), str(rt.RUNNER), "computation", "--dir", str(exports["plain"]),
             "--inputs", "in.npz", "--outputs", "out.npz", "--status", "status.json"]
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

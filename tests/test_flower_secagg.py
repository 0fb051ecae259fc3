"""Tests of ``fb.secure_sum`` through Flower's SecAgg+ (converters/flower/secagg.py).

* the arithmetic: a node's integers, quantized, masked and summed modulo 2**32 by Flower's own
  functions, then unmasked and decoded as the ServerApp does, equal numpy's sum in the value's dtype
  for every bitwidth and node count inside the bound, and break at the bound;
* the ServerApp and the nodes in one process (:class:`InProcessGrid`: each message serialized as on
  the wire and handed to the export's own ClientApp, with that node's own Flower context): the real
  ``SecAggPlusWorkflow`` and ``secaggplus_mod`` sum exactly, equal to native bit for bit (wrap-around,
  negative values and the range's edges included), no reply carries a secure-summed value in the
  clear, and out-of-range values and passes beyond the bound are refused;
* slow: the analytics example on a local deployment of 4 SuperNodes, its histogram exact and
  summed by SecAgg+ (Flower's own log says so), on both client runtimes.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import faxbridge as fb
from examples import analytics
from faxbridge.converters.flower import deployment, node, protocol, secagg, server
from faxbridge.extend import FederatedForm, TensorSpec, VerificationError


# -- the arithmetic ---------------------------------------------------------------------------------
def _through_flowers_arithmetic(values: np.ndarray, bitwidth: int, rng: np.random.Generator
                                ) -> np.ndarray:
  """What SecAgg+ returns for ``values`` [n, size] with the parameters faxbridge gives it: each
  node's steps of ``secaggplus_mod`` (weight, quantize, prepend the weight factor, add a mask, mod
  2**32) and the workflow's unmask step (sum mod 2**32, remove the masks, extract the factor,
  dequantize, shift, divide by the factor), with Flower's own functions. The masks are one uniform
  draw per node here (Flower's are pairwise and private, and cancel the same way)."""
  from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
  )
  from flwr.common.secure_aggregation.quantization import dequantize, quantize

  p = secagg.workflow_parameters(bitwidth, len(values))
  c, q, m = p["clipping_range"], p["quantization_range"], p["modulus_range"]
  total, masks = None, []
  for x in values:
    q_ratio = round(1 / p["max_weight"] * q)  # num_examples 1
    params = parameters_multiply([x], q_ratio / q)
    vec = factor_combine(q_ratio, quantize(params, c, q))
    mask = [rng.integers(0, m - 1, a.shape, dtype=np.int64) for a in vec]
    masks.append(mask)
    vec = parameters_mod(parameters_addition(vec, mask), m)
    total = vec if total is None else parameters_addition(total, vec)
  total = parameters_mod(total, m)
  for mask in masks:
    total = parameters_subtraction(total, mask)
  factor, summed = factor_extract(parameters_mod(total, m))
  (mean,) = dequantize(summed, c, q)
  with np.errstate(divide="ignore", invalid="ignore"):  # the factor sum wraps to 0 past the bound
    return (mean - (len(values) - 1) * c) * (q / factor)


@settings(max_examples=40)
@given(st.data())
def test_flowers_arithmetic_sums_exactly_inside_the_bound(data):
  bitwidth = data.draw(st.integers(1, 29), label="bitwidth")
  n = data.draw(st.integers(2, min(secagg.bound(bitwidth) - 1, 300)), label="nodes")
  dtype = data.draw(st.sampled_from(["int32", "int64", "int8", "uint8", "uint32"]), label="dtype")
  info = np.iinfo(dtype)
  lo, hi = max(-(2**bitwidth), int(info.min)), min(2**bitwidth, int(info.max))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32), label="seed"))
  x = rng.integers(lo, hi, size=(n, 7), endpoint=True).astype(dtype)
  x[0, :2] = [lo, hi]  # the range's edges
  mean = _through_flowers_arithmetic(x.astype(np.int64), bitwidth, rng)
  spec = TensorSpec("v", (7,), dtype)
  got = secagg.decode(mean, n, [spec])["v"]
  want = np.sum(x, axis=0, dtype=dtype)  # the native rule: a sum in the clients' dtype, wrapping
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bitwidth", [21, 25, 29])
def test_the_bound_is_tight(bitwidth):
  """n = 2**(31 - b) - 1 nodes of the largest values sum exactly; at n = 2**(31 - b) the weight
  factors wrap to 0 modulo 2**32 and the result is lost: the bound faxbridge refuses from."""
  n = secagg.bound(bitwidth)
  rng = np.random.default_rng(bitwidth)
  x = np.full((n - 1, 1), 2**bitwidth, np.int64)
  got = secagg.decode(_through_flowers_arithmetic(x, bitwidth, rng), n - 1, [TensorSpec("v", (1,), "int64")])
  assert got["v"][0] == (n - 1) * 2**bitwidth
  x = np.full((n, 1), 2**bitwidth, np.int64)
  assert not np.isfinite(_through_flowers_arithmetic(x, bitwidth, rng)).all()
  secagg.check_exact("sum", bitwidth, n - 1)
  with pytest.raises(VerificationError):
    secagg.check_exact("sum", bitwidth, n)


def test_a_pass_beyond_the_bound_is_refused_with_one_clear_error():
  with pytest.raises(VerificationError) as e:
    secagg.check_exact("round2: secure_sum[bitwidth=20] of counts (-> histogram)", 20, 2048)
  message = str(e.value)
  for part in ("round2: secure_sum[bitwidth=20] of counts (-> histogram)", "bitwidth 20",
               "2048 nodes", "n < 2**(31 - b) = 2048"):
    assert part in message, message
  with pytest.raises(VerificationError, match="at least 2 sampled nodes, this invocation samples 1"):
    secagg.check_exact("secure_sum[bitwidth=4] of x (-> total)", 4, 1)
  secagg.check_exact("x", 20, 2047)


def test_encode_refuses_what_secaggplus_would_clip_and_keeps_the_rest():
  values = {"a": np.array([-256, 0, 256], np.int32), "b": np.array([[3, 255]], np.uint8),
            "c": np.int64(-7)}
  vec = secagg.encode(values, {"a": 8, "b": 8, "c": 3}, "node n0")
  np.testing.assert_array_equal(vec, [-256, 0, 256, 3, 255, -7])
  assert vec.dtype == np.int64
  with pytest.raises(VerificationError, match=r"node n0: secure_sum\[bitwidth=7\] value 'a'\[0\] is "
                                              r"-256, outside \[-2\*\*7, 2\*\*7\] \(2 such entries\)"):
    secagg.encode(values, {"a": 7}, "node n0")
  with pytest.raises(VerificationError, match=r"value 'c' is -9, outside \[-2\*\*3, 2\*\*3\]"):
    secagg.encode({"c": np.int64(-9)}, {"c": 3}, "node n0")
  with pytest.raises(VerificationError, match=r"value 'b'\[0, 1\] is 255"):
    secagg.encode(values, {"b": 7}, "node n0")
  big = {"u": np.array([2**63 + 5], np.uint64)}  # compared as uint64, not wrapped to a negative
  with pytest.raises(VerificationError, match=r"is 9223372036854775813, outside"):
    secagg.encode(big, {"u": 20}, "node n0")


# -- the ServerApp and the nodes in one process -----------------------------------------------------
class InProcessGrid:
  """Flower's Grid calls the ServerApp makes (``get_node_ids``, ``push_messages``,
  ``pull_messages``), each message delivered to the export's own ClientApp (``node.client_app``)
  with that node's own Context, whose state persists between messages as a SuperNode keeps it.
  Messages and replies are serialized and parsed as on the wire (Flower's ``serde``), so no object
  is shared between the server and a node. Only the transport is left out: no SuperLink, no
  SuperNode, no processes. ``replies`` keeps every reply's content, for what the server saw."""

  def __init__(self, app_dir: Path, node_configs: list[dict]):
    from flwr.app import Context, RecordDict

    self.client = node.client_app(app_dir)
    self.contexts = {101 + k: Context(1, 101 + k, cfg, RecordDict(), {})
                     for k, cfg in enumerate(node_configs)}
    self.waiting: dict[str, object] = {}
    self.replies: list = []  # (message type, the reply's content)

  def get_node_ids(self) -> list[int]:
    return list(self.contexts)

  def push_messages(self, messages) -> list[str]:
    from flwr.common import serde

    ids = []
    for sent in messages:
      msg = serde.message_from_proto(serde.message_to_proto(sent))
      msg.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex  # as a SuperLink sets it
      reply = self.client(message=msg, context=self.contexts[msg.metadata.dst_node_id])
      reply = serde.message_from_proto(serde.message_to_proto(reply))
      self.waiting[message_id] = reply
      self.replies.append((msg.metadata.message_type, reply.content if reply.has_content() else None))
      ids.append(message_id)
    return ids

  def pull_messages(self, ids) -> list:
    return [self.waiting.pop(i) for i in list(ids) if i in self.waiting]


@pytest.fixture
def task_identity():
  """The process-wide identity Flower's ServerApp process sets before it builds messages."""
  from flwr.common.constant import SUPERLINK_NODE_ID
  from flwr.supercore.task_identity import TaskIdentity

  saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
  TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
  yield
  TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved


def _export(program, inputs: tuple, out: Path) -> Path:
  return fb.export(program, *inputs, target="flower", out_dir=out, client_runtime="iree")


def _serve(app: Path, inputs: tuple, placements: tuple, tmp_path: Path):
  """The flower export ``app`` (IREE client runtime) run by the ServerApp over one in-process node
  per client of ``inputs``: (outputs by the plan's output names, the record, the grid, the form)."""
  plan = json.loads((app / "plan.json").read_text())["computations"]["computation"]
  form = FederatedForm.from_json(plan, "computation")
  clients = [i for i, p in enumerate(placements) if p is fb.CLIENTS]
  names = [b.name for b in form.inputs]
  n = len(inputs[clients[0]])
  configs = []
  for k in range(n):
    data = {names[i]: np.asarray(inputs[i])[k] for i in clients}
    np.savez(tmp_path / f"node{k}.npz", **data)
    configs.append({"data": str(tmp_path / f"node{k}.npz"), "label": f"n{k}",
                    "store": str(tmp_path / f"store{k}")})
  run_config = {"export": str(app), "out": str(tmp_path / "out"), "rounds": 1, "min-nodes": n,
                "wait-nodes-seconds": 5.0, "round-timeout": 60.0}
  server_inputs = {names[i]: np.asarray(v) for i, v in enumerate(inputs) if i not in clients}
  if server_inputs:
    np.savez(tmp_path / "server.npz", **server_inputs)
    run_config["server-inputs"] = str(tmp_path / "server.npz")
  grid = InProcessGrid(app, configs)
  server.run(grid, run_config)
  with np.load(tmp_path / "out" / "computation.npz") as f:
    outputs = {k: f[k] for k in f.files}
  record = json.loads((tmp_path / "out" / "record.json").read_text())
  return outputs, record, grid, form


def _native(program, inputs, form) -> dict[str, np.ndarray]:
  leaves = jax.tree.leaves(program(*inputs))
  return {b.name: np.asarray(v) for b, v in zip(form.outputs, leaves)}


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS, fb.CLIENTS))
def mixed(scale, x, small, y):
  """Secure sums of a node's raw input, of what its client piece computes and of an int8 that
  wraps, beside aggregations in the clear (one of them of a value also secure-summed), in one
  stage."""
  scaled = fb.map(lambda s, xi: xi * s, fb.broadcast(scale), x)
  return {"raw": fb.secure_sum(x, bitwidth=12), "scaled": fb.secure_sum(scaled, bitwidth=14),
          "small": fb.secure_sum(small, bitwidth=7), "sum": fb.sum(y), "max": fb.max(y),
          "raw_max": fb.max(x)}


def _mixed_inputs(n=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(-(2**12), 2**12, size=(n, 6), endpoint=True).astype(np.int32)
  x[0, :2] = [-(2**12), 2**12]  # the edges of [-2**b, 2**b]
  small = rng.integers(0, 2**7, size=(n, 3)).astype(np.int8)
  small[:, 0] = 127  # 4 * 127 wraps in int8, natively and here
  return (np.int32(3), x, small, rng.normal(size=(n, 2)).astype(np.float32))


PLACEMENTS = (fb.SERVER, fb.CLIENTS, fb.CLIENTS, fb.CLIENTS)


@pytest.fixture(scope="module")
def mixed_app(tmp_path_factory) -> Path:
  return _export(mixed, _mixed_inputs(), tmp_path_factory.mktemp("secagg") / "mixed")


def test_secure_sums_run_through_secaggplus_and_equal_native_bit_for_bit(mixed_app, tmp_path,
                                                                         task_identity):
  inputs = _mixed_inputs()
  got, record, grid, form = _serve(mixed_app, inputs, PLACEMENTS, tmp_path)
  want = _native(mixed, inputs, form)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    if np.issubdtype(value.dtype, np.integer):
      np.testing.assert_array_equal(got[name], value, err_msg=name)
    else:
      np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
  assert np.asarray(mixed(*inputs)["small"])[0] == np.array(4 * 127).astype(np.int8)  # it wrapped
  # One SecAgg+ pass for the stage's three secure sums, over the 4 nodes, of the largest bitwidth.
  (secure_pass,) = record["invocations"][0]["secagg"]
  assert secure_pass["nodes"] == 4 and secure_pass["bitwidth"] == 14
  assert sorted(secure_pass["aggregations"]) == sorted(["secure_sum[bitwidth=12]",
                                                        "secure_sum[bitwidth=14]",
                                                        "secure_sum[bitwidth=7]"])
  assert sorted(secure_pass["stage_seconds"]) == sorted(["setup", "share_keys",
                                                         "collect_masked_vectors", "unmask"])
  # The server never received a value the program only secure-sums in the clear: the uploads of
  # the work messages are the clear aggregations' values only (x among them: fb.max reads it), and
  # every SecAgg+ reply is masked.
  hidden = secagg.hidden(form)
  secure_values = set(secagg.secure_values(form.stages[0].aggregations))
  assert len(secure_values) == 3 and hidden == secure_values - {"x"}
  uploaded = set()
  for _, content in grid.replies:
    if content is not None and protocol.UPLOADS in content.array_records:
      uploaded |= set(content.array_records[protocol.UPLOADS])
  clear = {a.value for a in form.stages[0].aggregations if not secagg.is_secure(a)}
  assert uploaded == clear
  secure_replies = [c for kind, c in grid.replies if kind == "train"]
  assert len(secure_replies) == 4 * 4  # 4 stages x 4 nodes
  # What each node uploads in the pass is masked: its weight factor, 2**15 in the clear, is not.
  from flwr.common import bytes_to_ndarray

  masked = [c.config_records["secaggplus_configs"]["masked_params"] for c in secure_replies
            if "masked_params" in c.config_records["secaggplus_configs"]]
  assert len(masked) == 4
  assert all(int(bytes_to_ndarray(blobs[0])[0]) != 2**15 for blobs in masked)


@fb.computation(in_placements=(fb.CLIENTS,))
def two_passes(x):
  """A secure sum, broadcast back, and a second secure sum of what each node computes from it in
  a later stage (one SecAgg+ pass per stage)."""
  total = fb.secure_sum(x, bitwidth=10)
  return total, fb.secure_sum(fb.map(lambda t, xi: 4 * xi - t, fb.broadcast(total), x), bitwidth=16)


def test_a_secure_sum_per_stage_and_values_kept_on_the_nodes(tmp_path, task_identity):
  x = np.random.default_rng(3).integers(0, 2**10, size=(5, 4)).astype(np.int32)
  got, record, _, form = _serve(_export(two_passes, (x,), tmp_path / "app"), (x,), (fb.CLIENTS,),
                                tmp_path)
  want = _native(two_passes, (x,), form)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value)
  assert [p["stage"] for p in record["invocations"][0]["secagg"]] == [0, 1]


@fb.computation(in_placements=(fb.CLIENTS,))
def wide(x):
  return fb.secure_sum(x, bitwidth=29)


def test_the_widest_exact_pass_and_the_bound_refused_before_anything_is_sent(tmp_path, task_identity):
  """b = 29: 3 nodes of values +-2**29 sum exactly; 4 nodes are refused before any SecAgg+
  message leaves the ServerApp."""
  x = np.array([[2**29, -(2**29), 5], [2**29, -(2**29), -5], [2**29, 7, 0]], np.int32)
  app = _export(wide, (x,), tmp_path / "app")
  (tmp_path / "three").mkdir()
  (tmp_path / "four").mkdir()
  got, _, _, _ = _serve(app, (x,), (fb.CLIENTS,), tmp_path / "three")
  np.testing.assert_array_equal(next(iter(got.values())), x.sum(0))
  x4 = np.concatenate([x, x[:1]])
  with pytest.raises(VerificationError) as e:
    _serve(app, (x4,), (fb.CLIENTS,), tmp_path / "four")
  message = str(e.value)
  assert "computation: secure_sum[bitwidth=29] of x" in message and "4 nodes" in message
  assert "n < 2**(31 - b) = 4" in message


def test_a_node_refuses_a_value_secaggplus_would_clip(mixed_app, tmp_path, task_identity):
  """Node n2's x holds 2**12 + 1, outside [-2**12, 2**12]: SecAgg+ would clip it silently, so
  the node refuses in the pass and the run fails naming it, the value and the range."""
  inputs = list(_mixed_inputs())
  x = inputs[1].copy()
  x[2, 4] = 2**12 + 1
  inputs[1] = x
  with pytest.raises(VerificationError) as e:
    _serve(mixed_app, tuple(inputs), PLACEMENTS, tmp_path)
  message = str(e.value)
  assert "SecAgg+ stage 'collect_masked_vectors'" in message and "node n2" in message, message
  assert "secure_sum[bitwidth=12] value 'x'[4] is 4097, outside [-2**12, 2**12]" in message, message


def test_a_node_refuses_to_upload_a_secure_only_value_in_the_clear(mixed_app, tmp_path):
  inputs = _mixed_inputs()
  np.savez(tmp_path / "d.npz", x=inputs[1][0], small=inputs[2][0], y=inputs[3][0])
  run = node.NodeRun(mixed_app, {"data": str(tmp_path / "d.npz"), "label": "n0"})
  task = {"computation": "computation", "piece": "", "invocation": "computation",
          "returns": json.dumps(["small"]), "keep": "[]"}
  with pytest.raises(VerificationError, match=r"node n0: asked to upload \['small'\] in the clear, "
                                              "which its plan.json only aggregates with secure_sum"):
    run.work(task, {}, {})
  task["returns"] = json.dumps(["x", "y"])  # x is also aggregated in the clear (fb.max): sent
  uploads, _, _ = run.work(task, {}, {})
  np.testing.assert_array_equal(uploads["x"], inputs[1][0])
  np.testing.assert_array_equal(uploads["y"], inputs[3][0])


# -- a real deployment -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("client_runtime", ["litert", "iree"])
def test_analytics_on_four_supernodes_its_histogram_by_secaggplus_exact(client_runtime, tmp_path,
                                                                        monkeypatch):
  """The analytics example on 4 SuperNodes: every output equals native (the histogram bit for bit),
  the histogram went through one SecAgg+ pass (Flower's own workflow logs it in the ServerApp's
  output), no node uploaded its counts in the clear, and no process of the deployment is left."""
  # The deployment's folder (and so its processes' marker) under this test's own folder: other
  # deployments running beside this test are not counted as its leftovers.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  levels, ink = analytics.example_inputs(4)
  out = fb.export(analytics.computation, levels, ink, target="flower", out_dir=tmp_path / "app",
                  client_runtime=client_runtime)
  manifest = json.loads((out / "manifest.json").read_text())
  plan = json.loads((out / "plan.json").read_text())["computations"]["computation"]
  form = FederatedForm.from_json(plan, "computation")
  # The leaves in the form's input order: the levels, then the fb.Ragged's examples and counts.
  inputs = {b.name: np.asarray(v)
            for b, v in zip(form.inputs, jax.tree.leaves((levels, ink)), strict=True)}
  kept = tmp_path / "kept"
  kept.mkdir()
  result = deployment.deploy(out, manifest, inputs, 1, keep=kept)
  native = jax.tree.leaves(analytics.computation(levels, ink))  # in form.outputs' order
  histogram = next(a.result.name for a in form.stages[0].aggregations if secagg.is_secure(a))
  for b, value in zip(form.outputs, native, strict=True):
    got = result.outputs[b.name]
    if b.name == histogram:  # the secure sum: bit for bit
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, np.asarray(value))
    else:
      np.testing.assert_allclose(got, np.asarray(value), rtol=1e-6, atol=1e-6, err_msg=b.name)
  assert "1 SecAgg+ pass(es) of secure_sum[bitwidth=16] over 4 nodes" in result.info["secure aggregation"]
  record = json.loads((kept / "record.json").read_text())
  (inv,) = record["invocations"]
  (secure_pass,) = inv["secagg"]
  assert secure_pass["nodes"] == 4 and secure_pass["bitwidth"] == analytics.BITWIDTH
  counts = next(a.value for a in form.stages[0].aggregations if secagg.is_secure(a))
  assert all(counts not in step["uploads"] for step in inv["node_timings"])
  (run_log,) = (kept / "logs").glob("flwr-run-*.log")  # this run's (a deployment names each run's)
  log = run_log.read_text(errors="replace")
  assert "Secure aggregation commencing" in log and "Secure aggregation completed" in log, log[-3000:]
  assert "aggregate_fit: received 4 results and 0 failures" in log
  print(f"invocation {inv['seconds']:.2f} s", json.dumps(secure_pass, indent=1),
        json.dumps(inv["node_timings"], indent=1))
  assert not deployment.leftovers(tmp_path, below=True)

"""Clients with their own data sizes on the TF-family targets (issue 19): the TF rules of
``faxbridge_batches`` and ``faxbridge_fold`` (converters/tf/rules_ragged.py) on a leading dimension
TF does not know.

Independent answers: numpy written without faxbridge, looping over each client's own examples only
(no padding anywhere). Floats within 1e-6 + 1e-5 * |ref|, integers and bools exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from tf_programs import assert_close

import faxbridge as fb
import faxbridge.converters.tf as fbtf
from faxbridge.extend import batches_p

SIZES = [1, 3, 17, 250, 0]  # the sizes and an empty client
D = 3  # features per example
RNG = np.random.default_rng(1919)


def _run_graph(graph: tf.Graph, feeds: dict[str, np.ndarray], fetches: list[str]) -> list:
  with tf.compat.v1.Session(graph=graph) as sess:
    return sess.run([f"{n}:0" for n in fetches], {f"{n}:0": v for n, v in feeds.items()})


# -- the rules, one quick test each ----------------------------------------------------------------
def numpy_batches(x: np.ndarray, count: int, b: int):
  """A client's rows in batches of ``b``: padded with zero rows to a multiple of ``b``, the rows
  at or past ``count`` zero, the mask of the real ones, and the number of batches holding one."""
  m = len(x)
  n = min(max(count, 0), m)
  num = -(-m // b)
  padded = np.zeros((num * b, *x.shape[1:]), x.dtype)
  padded[:n] = x[:n]
  mask = np.arange(num * b) < n
  return padded.reshape(num, b, *x.shape[1:]), mask.reshape(num, b), -(-n // b)


def test_batches_rule_takes_any_number_of_rows():
  """One graph, traced at 8 rows, run on 0 to 250 rows: not all of them a multiple of the batch,
  the count below, at and above the rows (clipped)."""
  b = 4
  closed = jax.make_jaxpr(lambda x, y, c: batches_p.bind(x, y, c, batch_size=b))(
      np.zeros((8, D), np.float32), np.zeros(8, np.int32), np.int32(0))
  graph = fbtf.lower_jaxpr(closed, ["x", "y", "c"], ["bx", "by", "mask", "num"], ragged=["x", "y"])
  assert graph.get_tensor_by_name("x:0").shape.as_list() == [None, D]
  assert graph.get_tensor_by_name("bx:0").shape.as_list() == [None, b, D]
  for m, count in [(0, 0), (1, 1), (3, 3), (5, 2), (17, 17), (250, 250), (6, 9), (4, -1)]:
    x = RNG.normal(size=(m, D)).astype(np.float32)
    y = RNG.integers(-9, 9, size=m).astype(np.int32)
    got = _run_graph(graph, {"x": x, "y": y, "c": np.int32(count)}, ["bx", "by", "mask", "num"])
    want_x, mask, num = numpy_batches(x, count, b)
    want_y, _, _ = numpy_batches(y, count, b)
    for g, w in zip(got, [want_x, want_y, mask, np.int32(num)]):
      assert np.shape(g) == np.shape(w) and np.asarray(g).dtype == np.asarray(w).dtype, (m, count)
      np.testing.assert_array_equal(g, w, err_msg=f"{m} rows, count {count}")


def test_fold_rule_runs_the_count_of_steps_over_any_number_of_rows():
  """The step (with a value of the enclosing function, ``w``) runs on rows 0 .. count-1 of a
  leading dimension TF does not know; an empty client's result is the init."""

  def program(w, x, count):
    return fb.fold(lambda h, e: 0.5 * h + jnp.tanh(w * e), jnp.ones(D), fb.Ragged(x, count))

  w = RNG.normal(size=D).astype(np.float32)
  closed = jax.make_jaxpr(program)(w, np.zeros((8, D), np.float32), np.int32(0))
  graph = fbtf.lower_jaxpr(closed, ["w", "x", "c"], ["h"], ragged=["x"])
  for m, count in [(0, 0), (1, 1), (3, 3), (17, 17), (250, 250), (5, 2), (4, 7)]:
    x = RNG.normal(size=(m, D)).astype(np.float32)
    h = np.ones(D, np.float64)
    for e in x[: min(count, m)].astype(np.float64):
      h = 0.5 * h + np.tanh(w * e)
    (got,) = _run_graph(graph, {"w": w, "x": x, "c": np.int32(count)}, ["h"])
    assert_close(got, h.astype(np.float32), what=f"{m} rows, count {count}")


# -- the programs and their numpy references -------------------------------------------------------
# Exports are traced with the sizes (padded to 256 rows); NEW_SIZES are other clients, one
# above the traced length, one not a multiple of the batch, one empty: the same files run them.
NEW_SIZES = [400, 2, 9, 0, 33]
B, LR = 8, 0.1
W0 = RNG.normal(size=D).astype(np.float32)
ROUNDS = 3


def _loss(w, x, y, mask):  # mean squared error over the batch's real examples
  err = jnp.where(mask, (x @ w - y) ** 2, 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(mask), 1)


def _client_update(w, data):
  def step(w, batch, mask):
    return w - LR * jax.grad(_loss)(w, batch["x"], batch["y"], mask)

  return fb.fold(step, w, data) - w


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedavg_round(w, data):
  """One epoch of SGD over each client's own batches; the server averages the updates weighted by
  the clients' real counts. Returns the new model and the number of examples (state, metrics)."""
  deltas = fb.map(_client_update, fb.broadcast(w), data)
  return w + fb.weighted_mean(deltas, data.count), fb.sum(data.count)


@fb.computation()
def _initialize():
  return jnp.asarray(W0)


fedavg = fb.IterativeProcess(_initialize, fedavg_round)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def running_round(w, data):
  """An unbatched fold: ``h <- h/2 + tanh(w x_j)`` over the client's examples one at a time; each
  client's ``sum(h)``, averaged by count and plainly, and returned per client."""
  ys = fb.map(lambda w, d: jnp.sum(fb.fold(lambda h, x: 0.5 * h + jnp.tanh(w * x), jnp.zeros(D), d)),
              fb.broadcast(w), data)
  return fb.weighted_mean(ys, data.count), fb.mean(ys), ys


def _clients(sizes, seed):
  r = np.random.default_rng(seed)
  return [{"x": r.normal(size=(m, D)).astype(np.float32), "y": r.normal(size=m).astype(np.float32)}
          for m in sizes]


def numpy_client_update(w, x, y):
  """One epoch of SGD over the client's own batches of B (the last one partial): its delta."""
  w0 = w = w.astype(np.float64)
  x, y = x.astype(np.float64), y.astype(np.float64)
  for s in range(0, len(x), B):
    xb, yb = x[s:s + B], y[s:s + B]
    w = w - LR * 2 * xb.T @ (xb @ w - yb) / len(xb)
  return w - w0


def numpy_fedavg(w, clients):
  counts = np.array([len(c["y"]) for c in clients], np.float64)
  deltas = [numpy_client_update(w, c["x"], c["y"]) for c in clients]
  return (w + sum(m * d for m, d in zip(counts, deltas)) / counts.sum(),
          np.int32(counts.sum()))


def numpy_process(clients, rounds=ROUNDS):
  """initialize's W0, then ``rounds`` rounds on the same clients: outputs keyed as verify keys them."""
  out, w = {"initialize/out": W0}, W0.astype(np.float64)
  for r in range(1, rounds + 1):
    w, total = numpy_fedavg(w, clients)
    out[f"round{r}/out_0"], out[f"round{r}/out_1"] = w, total
  return out


def numpy_running(w, examples):
  ys = []
  for x in examples:
    h = np.zeros(D)
    for e in x.astype(np.float64):
      h = 0.5 * h + np.tanh(w * e)
    ys.append(h.sum())
  ys, counts = np.array(ys), np.array([len(x) for x in examples], np.float64)
  return float(counts @ ys / counts.sum()), float(ys.mean()), ys


CLIENTS = _clients(SIZES, seed=7)
DATA = fb.ragged(CLIENTS, batch_size=B)
EXAMPLES = [c["x"] for c in CLIENTS]
SINGLE = fb.ragged(EXAMPLES)


def _poisoned(data: fb.Ragged, value: float) -> fb.Ragged:
  """``data`` with every padded row (past each client's count) set to ``value``."""

  def poison(x):
    x = np.array(x)
    for i, m in enumerate(data.count):
      x[i, m:] = value
    return x

  return fb.Ragged(jax.tree.map(poison, data.examples), data.count, data.batch_size)


def _named(export_dir, *args) -> dict[str, np.ndarray]:
  """The leaves of ``args`` by the export's input names (next's inputs after the state)."""
  from faxbridge._src.export import read_manifest

  manifest = read_manifest(export_dir)
  block = manifest["next" if manifest["kind"] == "iterative_process" else "computation"]
  leaves = jax.tree.leaves(args)
  assert len(leaves) == len(block["inputs"])
  return {b["name"]: np.asarray(v) for b, v in zip(block["inputs"], leaves)}


def _check(got: dict, want: dict, what: str) -> None:
  assert sorted(got) == sorted(want), what
  for name, w in want.items():
    w = np.asarray(w)
    assert_close(got[name], w.astype(np.asarray(got[name]).dtype), what=f"{what} {name}")


WANT_ROUND = dict(zip(["out_0", "out_1"], numpy_fedavg(W0, CLIENTS)))
WANT_RUNNING = dict(zip(["out_0", "out_1", "out_2"], numpy_running(W0, EXAMPLES)))
WANT_PROCESS = numpy_process(CLIENTS)


def test_native_equals_numpy_whatever_the_padding_holds():
  """The reference the exports are compared with (fb.verify) is itself the numpy loops, with the
  padding NaN or not."""
  for poison in (None, np.nan):
    data = DATA if poison is None else _poisoned(DATA, poison)
    single = SINGLE if poison is None else _poisoned(SINGLE, poison)
    _check(dict(zip(WANT_ROUND, fedavg_round(W0, data))), WANT_ROUND, f"native, padding {poison}")
    _check(dict(zip(WANT_RUNNING, running_round(W0, single))), WANT_RUNNING,
           f"native, padding {poison}")


NEW_CLIENTS = _clients(NEW_SIZES, seed=8)
NEW_DATA = fb.ragged(NEW_CLIENTS, batch_size=B)  # padded to 400 rows: not the exports' 256
WANT_NEW_ROUND = dict(zip(["out_0", "out_1"], numpy_fedavg(W0, NEW_CLIENTS)))

# name -> (program, the arguments it is exported and verified with, numpy's outputs, rounds)
PROGRAMS = {
    "fedavg_round": (fedavg_round, (W0, DATA), WANT_ROUND, 0),
    "running_round": (running_round, (W0, SINGLE), WANT_RUNNING, 0),
    "fedavg_process": (fedavg, (DATA,), WANT_PROCESS, ROUNDS),
}


def _poison_args(args: tuple) -> tuple:
  return tuple(_poisoned(a, np.nan) if isinstance(a, fb.Ragged) else a for a in args)


def _exports(root, target: str) -> dict:
  return {name: fb.export(program, *args, target=target, out_dir=root / name)
          for name, (program, args, _, _) in PROGRAMS.items()}


# -- tflite: one .tflite file per piece serves every size (LiteRT resizes the examples' input) -----
@pytest.fixture(scope="module")
def tflite_exports(tmp_path_factory) -> dict:
  return _exports(tmp_path_factory.mktemp("tflite"), "tflite")


def _litert(export_dir, named: dict, rounds: int) -> dict:
  from faxbridge._src.export import read_manifest
  from faxbridge.converters.runtimes import litert

  return litert.verify_run(export_dir, read_manifest(export_dir), named, rounds).outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", PROGRAMS)
def test_litert_equals_numpy_and_native_with_nan_in_the_padding(tflite_exports, name):
  _, args, want, rounds = PROGRAMS[name]
  out = tflite_exports[name]
  _check(_litert(out, _named(out, *args), rounds), want, f"{name} on litert")
  # Natively the padding is NaN; LiteRT gets each client's own rows only: still equal.
  report = fb.verify(out, *_poison_args(args), runtime="litert", rounds=max(rounds, 1))
  assert report.ok, str(report)


@pytest.mark.slow
def test_one_tflite_file_serves_clients_of_every_size(tflite_exports):
  """The client piece's one model: its examples' inputs have a dynamic leading dimension, the fold
  is a builtin WHILE, and the same bytes run clients of 0 to 400 rows (traced at 256); the round on
  other clients (padded to 400) equals numpy too."""
  from faxbridge.converters.plan import load_plan, piece_file
  from faxbridge.converters.runtimes import litert
  from faxbridge.converters.tflite.export import model_ops

  out = tflite_exports["fedavg_round"]
  piece = load_plan(out)["computations"]["computation"]["stages"][0]["client_work"]
  model = piece_file(out, piece, "tflite").read_bytes()
  ops = model_ops(model)
  assert "WHILE" in ops and not [op for op in ops if op.startswith(("FLEX", "CUSTOM"))], ops
  call = litert.load_piece(model, piece, "client_work")
  details = call.interpreter.get_signature_runner(piece["name"]).get_input_details()
  assert {n: list(d["shape_signature"]) for n, d in details.items()} == {
      "data_examples_x": [-1, D], "data_examples_y": [-1], "data_count": [], "w": [D]}
  for m, c in zip(NEW_SIZES + SIZES, NEW_CLIENTS + CLIENTS):
    args = {"data_examples_x": c["x"], "data_examples_y": c["y"], "data_count": np.int32(m),
            "w": W0}
    delta = call([args[s["name"]] for s in piece["inputs"]])[0]  # upload0: the client's delta
    assert_close(delta, numpy_client_update(W0, c["x"], c["y"]).astype(np.float32),
                 what=f"a client of {m} rows")
  _check(_litert(out, _named(out, W0, NEW_DATA), 0), WANT_NEW_ROUND, "other sizes on litert")
  with pytest.raises(fb.VerificationError, match=r"input w is float32\[4\], the model takes \[3\]"):
    call([np.zeros((2, D), np.float32), np.zeros(2, np.float32), np.int32(2),
          np.zeros(4, np.float32)])


def test_tflite_jax2tf_lowering_refuses_ragged_inputs(tmp_path):
  with pytest.raises(fb.ExportError, match=r"data_examples_x', 'data_examples_y'\] hold each "
                     r"client's own number of examples .*only lowering='tf'"):
    fb.export(fedavg_round, W0, DATA, target="tflite", lowering="jax2tf", out_dir=tmp_path / "x")
  assert not (tmp_path / "x").exists()


# -- tff: ragged leaves are tensors with an unknown leading dimension ------------------------------
@pytest.fixture(scope="module")
def tff_exports(tmp_path_factory) -> dict:
  return _exports(tmp_path_factory.mktemp("tff"), "tff")


@pytest.fixture(scope="module")
def tff_runs(tff_exports) -> dict:
  """Every TFF run of this module but fb.verify's in one runner process (TFF's import costs
  seconds): the programs, the round on other clients, and a count past the padded rows."""
  from faxbridge.converters.runtimes.tff import ComputationJob, run_computations

  jobs = {name: ComputationJob(tff_exports[name], _named(tff_exports[name], *args),
                               rounds or None, forms=bool(rounds))
          for name, (_, args, _, rounds) in PROGRAMS.items()}
  out = tff_exports["fedavg_round"]
  jobs["new_sizes"] = ComputationJob(out, _named(out, W0, NEW_DATA))
  bad = _named(out, W0, DATA)
  bad["data_count"] = np.array([1, 3, 17, 257, 0], np.int32)
  jobs["bad_count"] = ComputationJob(out, bad)
  return dict(zip(jobs, run_computations(list(jobs.values()), strict=False)))


@pytest.mark.slow
@pytest.mark.parametrize("name", PROGRAMS)
def test_tff_equals_numpy(tff_runs, name):
  _, _, want, _ = PROGRAMS[name]
  _check(tff_runs[name].outputs, want, f"{name} on tff")


@pytest.mark.slow
def test_one_tff_export_serves_clients_of_every_size(tff_exports, tff_runs):
  """The export traced at 256 rows runs clients of 400, 2, 9, 0 and 33 rows: its clients' data are
  tensors whose leading dimension is unknown (``float32[?,3]``); a count past the rows given is
  refused by name."""
  from faxbridge._src.export import read_manifest

  signature = read_manifest(tff_exports["fedavg_round"])["computation"]["type_signature"]
  assert "examples=<x=float32[?,3],y=float32[?]>,count=int32" in signature, signature
  _check(tff_runs["new_sizes"].outputs, WANT_NEW_ROUND, "other sizes on tff")
  error = tff_runs["bad_count"]
  assert isinstance(error, fb.VerificationError)
  assert "'data_count' holds counts [257] outside [0, 256]" in str(error)


@pytest.mark.slow
def test_mapreduce_and_distribute_aggregate_forms_build_for_ragged_fedavg(tff_runs):
  run = tff_runs["fedavg_process"]
  assert set(run.forms) == {"mapreduce", "distribute_aggregate"}
  for name, form in run.forms.items():
    assert form.built and form.error is None, (name, form.error)
    assert form.ran and form.run_error is None, (name, form.run_error)
    _check(form.outputs, WANT_PROCESS, f"next rebuilt from {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", PROGRAMS)
def test_tff_verifies_against_native_with_nan_in_the_padding(tff_exports, name):
  _, args, _, rounds = PROGRAMS[name]
  report = fb.verify(tff_exports[name], *_poison_args(args), runtime="tff", rounds=max(rounds, 1))
  assert report.ok, str(report)
  if rounds:  # next rebuilt from MapReduceForm and DistributeAggregateForm: further rows, equal too
    assert len(report.extra_checks) == 2, str(report)


def test_tff_local_xla_refuses_ragged_inputs(tmp_path):
  with pytest.raises(fb.ExportError, match=r"fedavg_round: its input data_examples_x holds each "
                     r"client's own number of examples \(fb.ragged, counted by data_count\).*"
                     r"local='xla' builds XLA local computations"):
    fb.export(fedavg_round, W0, DATA, target="tff", local="xla", out_dir=tmp_path / "x")
  assert not (tmp_path / "x").exists()

"""Clients with their own data sizes on the stablehlo target (converters/stablehlo/export.py, the
plan's own_rows): one export runs clients of every size, each on its own examples only, on IREE
and jax.export, with no export per size.

Independent answers: numpy loops over each client's own examples (float64), written without
faxbridge. Each program is checked natively, with ``fb.verify`` on both runtimes (against the
export's native program, also with NaN in the padding), and by running the artifacts directly: a
runtime alone (its outputs against numpy, on the clients of the export and on others, larger than
the length it was traced with) and the client piece called on one client's rows. Floats within
1e-6 + 1e-5 * |ref|, integers exactly.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from federated_programs import build, example_inputs, generate, mismatches, reference

import faxbridge as fb
from faxbridge._src.verify import run_on_runtime
from faxbridge.converters.plan import load_plan, piece_file, pieces
from faxbridge.converters.runtimes import iree as iree_rt
from faxbridge.converters.runtimes import jax_export as jax_rt
from faxbridge.extend import own_length

SIZES = [1, 3, 17, 250, 0]  # the sizes and an empty client: the export's example
OTHER_SIZES = [40, 0, 9, 256, 2]  # another federation, the same padded length (fb.verify's shapes)
LARGER_SIZES = [300, 1, 1000, 0, 8, 64, 5]  # 7 clients, two above the length the export traced
RUNTIMES = ["iree", "jax"]
# The jax runtime starts a fresh Python per run (about 2 s): one test of it stays in the quick suite.
QUICK_ON_IREE = ["iree", pytest.param("jax", marks=pytest.mark.slow)]
B = 8  # batch size
D = 3  # features per example
LR = 0.1
RNG = np.random.default_rng(1919)
W = RNG.uniform(-0.5, 0.5, size=D).astype(np.float32)


def _clients(sizes: list[int], seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [{"x": rng.uniform(-1, 1, size=(m, D)).astype(np.float32),
           "y": rng.uniform(-1, 1, size=m).astype(np.float32)} for m in sizes]


CLIENTS = _clients(SIZES, 0)


def _close(got, want) -> None:
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-5,
                             atol=1e-6)


def _poisoned(data: fb.Ragged, value: float) -> fb.Ragged:
  """``data`` with every padded example set to ``value``."""

  def poison(x):
    x = np.asarray(x)
    lead = (1,) * (x.ndim - 2)
    real = np.arange(x.shape[1]).reshape(1, -1, *lead) < np.asarray(data.count).reshape(-1, 1, *lead)
    return np.where(real, x, np.asarray(value, x.dtype))

  return fb.Ragged(jax.tree.map(poison, data.examples), data.count, data.batch_size)


def _named(data: fb.Ragged, name: str = "data", **server) -> dict[str, np.ndarray]:
  """The inputs by manifest name (``w``, ``data_examples_x`` or ``data_examples``, ...,
  ``data_count``), for a runtime alone; ``name``: the computation's argument."""
  examples = data.examples if isinstance(data.examples, dict) else {"": data.examples}
  return {**server, **{f"{name}_examples{'_' * bool(k)}{k}": np.asarray(v)
                       for k, v in examples.items()}, f"{name}_count": np.asarray(data.count)}


# -- (a) FedAvg over each client's own batches, and its numpy reference -----------------------------
def sse(w, x, y, mask):
  """The squared error of the batch's real examples."""
  return jnp.sum(jnp.where(mask, (x @ w - y) ** 2, 0.0))


def client_update(w, data):
  def step(w, batch, mask):  # SGD on the batch's mean squared error
    return w - LR * jax.grad(sse)(w, batch["x"], batch["y"], mask) / jnp.maximum(jnp.sum(mask), 1)

  trained = fb.fold(step, w, data)
  # A second fold over the same examples: the squared error of the trained model.
  after = fb.fold(lambda c, batch, mask: c + sse(trained, batch["x"], batch["y"], mask),
                  0.0, data)  # a Python float: the carry is weakly typed
  return trained - w, after


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedavg_round(w, data):
  deltas, errors = fb.map(client_update, fb.broadcast(w), data)
  return w + fb.weighted_mean(deltas, data.count), fb.sum(errors), fb.sum(data.count)


def numpy_update(w, x, y):
  """One epoch of SGD over the client's own batches of B (the last one shorter)."""
  for s in range(0, len(x), B):
    xb, yb = x[s:s + B], y[s:s + B]
    w = w - LR * 2 * xb.T @ (xb @ w - yb) / len(xb)
  return w


def numpy_client(w, client) -> tuple[np.ndarray, float]:
  x, y = client["x"].astype(np.float64), client["y"].astype(np.float64)
  trained = numpy_update(w, x, y)
  return trained - w, float(((x @ trained - y) ** 2).sum())


def numpy_round(w, clients) -> tuple[np.ndarray, float, int]:
  w = np.asarray(w, np.float64)
  counts = [len(c["y"]) for c in clients]
  results = [numpy_client(w, c) for c in clients]
  new_w = w + sum(m * d for m, (d, _) in zip(counts, results)) / sum(counts)
  return new_w, sum(e for _, e in results), sum(counts)


def _check_round(outputs: dict, want: tuple, prefix: str = "") -> None:
  _close(outputs[f"{prefix}out_0"], want[0])
  _close(outputs[f"{prefix}out_1"], want[1])
  assert outputs[f"{prefix}out_2"].dtype == np.int32 and int(outputs[f"{prefix}out_2"]) == want[2]


@pytest.fixture(scope="module")
def fedavg_export(tmp_path_factory) -> pathlib.Path:
  data = fb.ragged(CLIENTS, batch_size=B)
  return fb.export(fedavg_round, W, data, target="stablehlo",
                   out_dir=tmp_path_factory.mktemp("ragged") / "fedavg")


def test_one_round_over_each_clients_batches_equals_numpy_natively():
  data = fb.ragged(CLIENTS, batch_size=B)
  want = numpy_round(W, CLIENTS)
  for poison in (0.0, np.nan):
    new_w, error, total = fedavg_round(W, _poisoned(data, poison))
    _close(new_w, want[0])
    _close(error, want[1])
    assert int(total) == want[2]


def test_the_export_keeps_axis_0_of_the_examples_free(fedavg_export):
  """plan.json keeps the traced (padded) shape of a ragged leaf and says in its ragged block that
  axis 0 is each client's own; the client piece's StableHLO takes any number of rows."""
  plan = json.loads((fedavg_export / "plan.json").read_text())
  comp = plan["computations"]["computation"]
  binding = next(b for b in comp["inputs"] if b["name"] == "data_examples_x")
  assert binding["shape"] == [256, D]
  assert binding["ragged"] == {"count": "data_count", "max_length": 256, "batch_size": B}
  (stage,) = comp["stages"]
  work = stage["client_work"]
  assert [s["name"] for s in work["inputs"]][:3] == ["data_examples_x", "data_examples_y",
                                                      "data_count"]
  assert work["inputs"][0]["shape"] == [256, D]
  text = (fedavg_export / work["files"]["stablehlo_text"]).read_text()
  main = text[text.index("@main("):text.index("{", text.index("@main("))]
  assert f"tensor<?x{D}xf32>" in main and "tensor<?xf32>" in main, main
  # The .jax artifact checks the length it is given (a multiple of B, at least one batch).
  exported = jax.export.deserialize(bytearray((fedavg_export / work["files"]["jax"]).read_bytes()))
  assert str(exported.in_avals[0].shape) == f"({B}*data_count_k, {D})"
  args = [np.zeros((7, D), np.float32), np.zeros(7, np.float32), np.int32(7), W]
  with pytest.raises(Exception, match="Division had remainder"):
    exported.call(*args)
  args = [np.zeros((0, D), np.float32), np.zeros(0, np.float32), np.int32(0), W]
  with pytest.raises(Exception, match="Expected value >= 1 for dimension variable 'data_count_k'"):
    exported.call(*args)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fedavg_round_verifies_and_equals_numpy(fedavg_export, runtime):
  """fb.verify against native with NaN in the padding (the runtime gets each client's own rows,
  native the padded arrays); the runtime's own outputs equal numpy."""
  data = _poisoned(fb.ragged(CLIENTS, batch_size=B), np.nan)
  report = fb.verify(fedavg_export, W, data, runtime=runtime)
  assert report.ok, str(report)
  got = run_on_runtime(fedavg_export, runtime, _named(data, w=W)).outputs
  _check_round(got, numpy_round(W, CLIENTS))


@pytest.mark.parametrize("runtime", QUICK_ON_IREE)
def test_the_same_export_runs_other_clients(fedavg_export, runtime):
  """(d) No export per size: other clients with other sizes, through fb.verify (the padded length
  of the export's native program) and the runtime alone (7 clients, two of them above that
  length), equal to numpy."""
  others = _clients(OTHER_SIZES, 1)
  data = _poisoned(fb.ragged(others, batch_size=B, max_length=256), np.nan)
  report = fb.verify(fedavg_export, W, data, runtime=runtime)
  assert report.ok, str(report)
  got = run_on_runtime(fedavg_export, runtime, _named(data, w=W)).outputs
  _check_round(got, numpy_round(W, others))
  larger = _clients(LARGER_SIZES, 2)
  run = {"iree": iree_rt.verify_run, "jax": jax_rt.verify_run}[runtime]
  manifest = json.loads((fedavg_export / "manifest.json").read_text())
  got = run(fedavg_export, manifest, _named(fb.ragged(larger, batch_size=B), w=W), 0).outputs
  _check_round(got, numpy_round(W, larger))


def test_the_client_piece_runs_each_clients_own_rows(fedavg_export):
  """The client piece's artifacts called directly (IREE's compiled .mlir, the .jax), one client
  at a time on its own rows padded to whole batches: its delta and squared error equal numpy's."""
  plan = load_plan(fedavg_export)
  (stage,) = plan["computations"]["computation"]["stages"]
  work = stage["client_work"]
  iree_piece = iree_rt.load_piece(piece_file(fedavg_export, work, "stablehlo_text").read_bytes(),
                                  work, "client_work")
  jax_piece = jax.export.deserialize(bytearray(piece_file(fedavg_export, work, "jax").read_bytes()))
  assert [s["name"] for s in work["inputs"]] == ["data_examples_x", "data_examples_y",
                                                 "data_count", "w"]
  for client in CLIENTS + _clients([1000], 3):
    m = len(client["y"])
    rows = own_length(m, B)
    x = np.full((rows, D), np.nan, np.float32)  # past the count: read by nothing
    y = np.full(rows, np.nan, np.float32)
    x[:m], y[:m] = client["x"], client["y"]
    delta, error = numpy_client(W.astype(np.float64), client)
    args = [x, y, np.int32(m), W]
    # The uploads by what the user aggregates (plan.json's names): the deltas, the errors.
    upload = {a["names"]["value"]: a["value"] for a in stage["aggregations"]}
    names = [s["name"] for s in work["outputs"]]
    for got in (iree_piece(args), [np.asarray(v) for v in jax_piece.call(*args)]):
      by_name = dict(zip(names, got))
      _close(by_name[upload["deltas"]], delta)
      _close(by_name[upload["errors"]], error)


# -- (b) a fold over single examples ----------------------------------------------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def running_state(w, data):
  """Each client's ``h <- h / 2 + tanh(w x_j)`` over its own examples; ``sum(h)`` per client."""
  ys = fb.map(lambda w, d: jnp.sum(fb.fold(lambda h, x: 0.5 * h + jnp.tanh(w * x),
                                           jnp.zeros(D, jnp.float32), d)),
              fb.broadcast(w), data)
  return ys, fb.weighted_mean(ys, data.count), fb.max(ys)


def numpy_running(w, examples: list[np.ndarray]):
  w = w.astype(np.float64)
  ys = []
  for x in examples:
    h = np.zeros(D)
    for e in x.astype(np.float64):
      h = 0.5 * h + np.tanh(w * e)
    ys.append(h.sum())
  counts = np.array([len(x) for x in examples], np.float64)
  return np.array(ys), float(counts @ ys / counts.sum()), max(ys)


EXAMPLES = [c["x"] for c in CLIENTS]


@pytest.fixture(scope="module")
def fold_export(tmp_path_factory) -> pathlib.Path:
  return fb.export(running_state, W, fb.ragged(EXAMPLES), target="stablehlo",
                   out_dir=tmp_path_factory.mktemp("ragged") / "fold")


def test_a_fold_over_single_examples_natively():
  data = _poisoned(fb.ragged(EXAMPLES), np.nan)
  want = numpy_running(W, EXAMPLES)
  for got in (running_state(W, data), fb.split(running_state, W, data).run(W, data)):
    for g, w in zip(got, want):
      _close(g, w)


@pytest.mark.parametrize("runtime", QUICK_ON_IREE)
def test_a_fold_over_single_examples(fold_export, runtime):
  """(b) Without a batch size a client's length is any k >= 1 (an empty client gets one row)."""
  text = (fold_export / "pieces/computation/stage0_client_work.mlir").read_text()
  assert f"tensor<?x{D}xf32>" in text[text.index("@main("):]
  report = fb.verify(fold_export, W, _poisoned(fb.ragged(EXAMPLES), np.nan), runtime=runtime)
  assert report.ok, str(report)
  others = [c["x"] for c in _clients([6, 0, 249, 1, 2], 4)]
  for xs in (EXAMPLES, others):
    got = run_on_runtime(fold_export, runtime, _named(fb.ragged(xs, max_length=250), w=W))
    for i, w in enumerate(numpy_running(W, xs)):
      _close(got.outputs[f"out_{i}"], w)


# -- two ragged inputs, and folds that are not over an fb.ragged input -----------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def train_and_test(w, train, test):
  """SGD over a client's training batches of 4, then the squared error over its test examples one
  at a time: two inputs, each client with its own two lengths."""

  def client(w, train, test):
    def step(w, batch, mask):
      return w - LR * jax.grad(sse)(w, batch["x"], batch["y"], mask) / jnp.maximum(jnp.sum(mask), 1)

    trained = fb.fold(step, w, train)
    return fb.fold(lambda c, e: c + (e["x"] @ trained - e["y"]) ** 2, 0.0, test)

  errors = fb.map(client, fb.broadcast(w), train, test)
  return fb.weighted_mean(errors, test.count)


def numpy_train_and_test(w, train, test):
  errors = []
  for tr, te in zip(train, test):
    x, y = tr["x"].astype(np.float64), tr["y"].astype(np.float64)
    trained = np.asarray(w, np.float64)
    for s in range(0, len(x), 4):
      xb, yb = x[s:s + 4], y[s:s + 4]
      trained = trained - LR * 2 * xb.T @ (xb @ trained - yb) / len(xb)
    errors.append(float(((te["x"].astype(np.float64) @ trained - te["y"]) ** 2).sum()))
  counts = np.array([len(te["y"]) for te in test], np.float64)
  return counts @ errors / counts.sum()


def test_two_ragged_inputs_have_their_own_lengths(tmp_path):
  """One symbol per count: the client piece takes 4*k train rows and j test rows, j and k apart."""
  train, test = _clients([5, 0, 30, 2], 8), _clients([7, 3, 0, 12], 9)
  args = (W, fb.ragged(train, batch_size=4), fb.ragged(test))
  _close(train_and_test(*args), numpy_train_and_test(W, train, test))
  out = fb.export(train_and_test, *args, target="stablehlo", out_dir=tmp_path / "e")
  exported = jax.export.deserialize(bytearray(
      (out / "pieces/computation/stage0_client_work.jax").read_bytes()))
  shapes = sorted(str(a.shape) for a in exported.in_avals if a.ndim and a.shape[0] != D)
  assert shapes == ["(4*train_count_k, 3)", "(4*train_count_k,)", "(test_count_k, 3)",
                    "(test_count_k,)"], shapes
  report = fb.verify(out, *args, runtime="iree")
  assert report.ok, str(report)
  train, test = _clients([1, 40, 9, 0, 3], 10), _clients([0, 2, 11, 5, 1], 11)
  named = {**_named(fb.ragged(train, batch_size=4), "train", w=W), **_named(fb.ragged(test), "test")}
  got = iree_rt.verify_run(out, {}, named, 0).outputs
  _close(got["out"], numpy_train_and_test(W, train, test))


def test_a_fold_over_data_the_user_padded_exports_its_fixed_shapes(tmp_path):
  """No fb.ragged input: every client's array has the traced length, and the export runs it
  (each client's fold stops at its count)."""

  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def padded(x, count):
    return fb.sum(fb.map(lambda x, c: fb.fold(lambda h, e: h + e, 0.0, fb.Ragged(x, c)), x, count))

  x, count = np.ones((2, 4), np.float32), np.array([1, 3], np.int32)
  out = fb.export(padded, x, count, target="stablehlo", out_dir=tmp_path / "e")
  plan = json.loads((out / "plan.json").read_text())
  assert not any("ragged" in b for b in plan["computations"]["computation"]["inputs"])
  report = fb.verify(out, x, count, runtime="iree")
  assert report.ok, str(report)
  assert float(run_on_runtime(out, "iree", {"x": x, "count": count}).outputs["out"]) == 4.0


def test_a_fold_over_batches_of_another_size_is_refused(tmp_path):
  @fb.computation(in_placements=(fb.CLIENTS,))
  def rebatched(data):
    return fb.sum(fb.map(lambda d: fb.fold(lambda c, xb, m: c + jnp.sum(xb),
                                           0.0, fb.Ragged(d.examples, d.count, batch_size=4)), data))

  data = fb.ragged([np.ones((m, D), np.float32) for m in (5, 2)], max_length=8)  # k rows, no batches
  assert float(rebatched(data)) == 21.0
  with pytest.raises(fb.ExportError, match=r"fb.fold at .*test_ragged_stablehlo.py:\d+ .*runs over "
                     r"batches of 4 examples of an fb.ragged input exported with data_count_k rows "
                     r"per client .*batch_size=4"):
    fb.export(rebatched, data, target="stablehlo", out_dir=tmp_path / "e")


@pytest.mark.parametrize("runtime", QUICK_ON_IREE)
def test_a_fold_that_overwrites_a_carry_it_never_reads(runtime, tmp_path):
  """A step that keeps the last example (or batch sum) without reading the carry it replaces, as
  DiLoCo keeps its last loss: IREE 3.13's compiler crashes on a while loop carrying such a value,
  so the exporter keeps it as ``where(j < n, new, old)``. Batched and not, against numpy."""

  def last(d):
    return fb.fold(lambda c, x: (c[0] + x, 2.0 * x), (jnp.float32(0), jnp.float32(-1)), d)

  def last_batch(d):
    step = lambda c, x, m: (c[0] + jnp.sum(x), jnp.sum(jnp.where(m, x, 0.0)))
    return fb.fold(step, (jnp.float32(0), jnp.float32(-1)), d)

  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def keeps_the_last(a, b):
    return fb.map(last, a), fb.map(last_batch, b)

  sizes = [1, 3, 17, 0]
  rows = [RNG.normal(size=m).astype(np.float32) for m in sizes]
  a, b = fb.ragged(rows), fb.ragged(rows, batch_size=4)
  want_a = [(x.sum(), 2.0 * x[-1] if len(x) else -1.0) for x in rows]
  want_b = [(x.sum(), x[(len(x) - 1) // 4 * 4:].sum() if len(x) else -1.0) for x in rows]
  (sa, la), (sb, lb) = keeps_the_last(a, b)
  _close(np.stack([sa, la], 1), np.array(want_a))
  _close(np.stack([sb, lb], 1), np.array(want_b))
  out = fb.export(keeps_the_last, a, b, target="stablehlo", out_dir=tmp_path / "e")
  report = fb.verify(out, _poisoned(a, np.nan), _poisoned(b, np.nan), runtime=runtime)
  assert report.ok, str(report)


# -- generated programs with a ragged input --------------------------------------------------------
GENERATED = [pytest.param(seed, runtime, id=f"seed{seed}-{runtime}",
                          marks=() if (seed, runtime) in {(0, "iree"), (7, "iree")} else pytest.mark.slow)
             for seed in range(12) for runtime in RUNTIMES if runtime == "iree" or seed in (0, 3, 5, 7)]


@pytest.mark.parametrize("seed,runtime", GENERATED)
def test_generated_ragged_programs(seed, runtime, tmp_path):
  """tests/federated_programs.py's random programs whose first map folds a ragged input (batched or
  not, folds of a count or from a value; the padding poisoned): fb.verify, and the runtime's
  outputs against the generator's numpy reference."""
  recipe = generate(seed, ragged=True)
  comp, args = build(recipe), example_inputs(recipe)
  out = fb.export(comp, *args, target="stablehlo", out_dir=tmp_path / "e")
  report = fb.verify(out, *args, runtime=runtime)
  assert report.ok, f"seed {seed}:\n{report}" + recipe.describe()
  block = json.loads((out / "manifest.json").read_text())["computation"]
  named = {b["name"]: np.asarray(v) for b, v in zip(block["inputs"], jax.tree.leaves(args))}
  got = run_on_runtime(out, runtime, named).outputs
  want = reference(recipe, *args)
  problems = mismatches(want, jax.tree.unflatten(jax.tree.structure(want),
                                                 [got[b["name"]] for b in block["outputs"]]))
  assert not problems, f"seed {seed}:\n" + "\n".join(problems) + recipe.describe()


# -- (c) an iterative process -----------------------------------------------------------------------
@fb.computation()
def initialize():
  return jnp.asarray(W)


PROCESS = fb.IterativeProcess(initialize, fedavg_round)
ROUNDS = 3


@pytest.fixture(scope="module")
def process_export(tmp_path_factory) -> pathlib.Path:
  return fb.export(PROCESS, fb.ragged(CLIENTS, batch_size=B), target="stablehlo",
                   out_dir=tmp_path_factory.mktemp("ragged") / "process")


@pytest.mark.parametrize("runtime", QUICK_ON_IREE)
def test_an_iterative_process_over_three_rounds(process_export, runtime):
  """(c) Three rounds, the state fed back, on the export's clients (fb.verify, NaN padding) and on
  others (the runtime alone, against numpy)."""
  data = _poisoned(fb.ragged(CLIENTS, batch_size=B), np.nan)
  report = fb.verify(process_export, data, runtime=runtime, rounds=ROUNDS)
  assert report.ok, str(report)
  for clients in (CLIENTS, _clients(OTHER_SIZES, 5)):
    named = _named(fb.ragged(clients, batch_size=B, max_length=256))
    got = run_on_runtime(process_export, runtime, named, rounds=ROUNDS).outputs
    _close(got["initialize/out"], W)
    w = W.astype(np.float64)
    for r in range(1, ROUNDS + 1):
      want = numpy_round(w, clients)
      _check_round(got, want, f"round{r}/")
      w = want[0]


# -- one IREE module per piece, whatever the sizes ------------------------------------------------
@pytest.mark.slow
def test_iree_compiles_each_piece_once_for_every_size(fedavg_export, tmp_path, monkeypatch):
  """A fresh IREE cache after two federations of different sizes holds one module per piece: the
  compiled module takes every size (dynamic dimensions), none is compiled for a size."""
  monkeypatch.setenv("FAXBRIDGE_IREE_CACHE", str(tmp_path / "cache"))
  manifest = json.loads((fedavg_export / "manifest.json").read_text())
  for clients in (CLIENTS, _clients(LARGER_SIZES, 6)):
    named = _named(fb.ragged(clients, batch_size=B), w=W)
    got = iree_rt.verify_run(fedavg_export, manifest, named, 0).outputs
    _check_round(got, numpy_round(W, clients))
  assert len(list((tmp_path / "cache").glob("*.vmfb"))) == len(pieces(load_plan(fedavg_export)))


@pytest.mark.slow
def test_iree_compiles_the_portable_artifact_of_a_ragged_piece(fedavg_export):
  """A consumer with only the portable artifact (VHLO) gets the same shape-polymorphic program."""
  plan = load_plan(fedavg_export)
  (stage,) = plan["computations"]["computation"]["stages"]
  work = stage["client_work"]
  import iree.compiler as ic
  import iree.runtime as ireert

  modules = []
  for fmt in ("stablehlo_text", "stablehlo_portable"):
    vmfb = ic.compile_str(piece_file(fedavg_export, work, fmt).read_bytes(),
                          target_backends=["llvm-cpu"], input_type="stablehlo",
                          extra_args=list(iree_rt.COMPILE_FLAGS))
    modules.append(ireert.load_vm_flatbuffer(vmfb, backend="llvm-cpu"))
  for client in _clients([5, 130], 7):
    m = len(client["y"])
    x = np.zeros((own_length(m, B), D), np.float32)
    y = np.zeros(own_length(m, B), np.float32)
    x[:m], y[:m] = client["x"], client["y"]
    text, portable = ([np.asarray(o.to_host()) for o in module.main(x, y, np.int32(m), W)]
                      for module in modules)
    for a, b in zip(text, portable):
      np.testing.assert_array_equal(a, b)

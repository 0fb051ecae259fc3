"""The seven classes of failure found by running generated programs (issue 8), each as a minimal
program checked against numpy: natively, through ``split(...).run``, and (slow) exported to every
target and run on its runtime."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_batch import run_on_jax

import faxbridge as fb
from faxbridge._src.verify import run_on_runtime

X = np.arange(3.0, dtype=np.float32)
S = np.float32(0.2)


# -- 1. fb.max / fb.min were keyed by the names of lax.max_p / lax.min_p -----------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def server_maximum(s, x):
  return fb.sum(fb.map(lambda a, b: a * b, fb.broadcast(jnp.maximum(s, 0.5)), x))


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def server_relu_clip_softmax(s, x):
  t = jax.nn.relu(s - 0.1) + jnp.clip(s, 0.0, 1.0) + jnp.minimum(s, 0.0)
  w = jax.nn.softmax(jnp.stack([s, t])) + jax.nn.logsumexp(jnp.stack([s, t]))
  return fb.max(fb.map(lambda a, b: a * b[0], x, fb.broadcast(w))) + t


def _relu_clip_softmax(s, x):
  t = max(s - 0.1, 0.0) + min(max(s, 0.0), 1.0) + min(s, 0.0)
  z = np.array([s, t], np.float64)
  w = np.exp(z) / np.exp(z).sum() + np.log(np.exp(z).sum())
  return np.float32(max(x * w[0]) + t)


def test_server_side_jnp_maximum_and_friends_are_server_work():
  np.testing.assert_allclose(server_maximum(S, X), (X * 0.5).sum(), rtol=1e-6)
  np.testing.assert_allclose(fb.split(server_maximum, S, X).run(S, X), (X * 0.5).sum(), rtol=1e-6)
  want = _relu_clip_softmax(float(S), X.astype(np.float64))
  np.testing.assert_allclose(server_relu_clip_softmax(S, X), want, rtol=1e-5)
  np.testing.assert_allclose(fb.split(server_relu_clip_softmax, S, X).run(S, X), want, rtol=1e-5)


def test_jnp_maximum_of_clients_values_outside_map_is_refused():
  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def clients_max(x, y):
    return jnp.maximum(x, y)

  with pytest.raises(fb.PlacementError, match="'max' was applied to a CLIENTS-placed value"):
    clients_max.trace(X, X)


# -- 2. a stage whose client work reads only broadcasts -------------------------------------------
@fb.computation(in_placements=(fb.CLIENTS,))
def only_broadcasts(x):
  return fb.sum(fb.map(lambda a: a * 2.0, fb.broadcast(fb.sum(x))))


def test_client_work_reading_only_broadcasts():
  want = 2.0 * X.sum() * len(X)
  np.testing.assert_allclose(only_broadcasts(X), want)
  np.testing.assert_allclose(fb.split(only_broadcasts, X).run(X), want)


# -- 3. a map output both aggregated and kept for the next stage (federated variance) -------------
@fb.computation(in_placements=(fb.CLIENTS,))
def variance(x):
  y = fb.map(lambda a: 2.0 * a + 1.0, x)
  mean = fb.mean(y)
  return mean, fb.mean(fb.map(lambda a, m: (a - m) ** 2, y, fb.broadcast(mean)))


def test_map_output_aggregated_and_reused():
  y = 2.0 * X + 1.0
  want = (y.mean(), y.var())
  for got in (variance(X), fb.split(variance, X).run(X)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  (stage0, _) = fb.split(variance, X).stages
  outs = [s.name for s in stage0.client_work.outputs]
  assert len(outs) == len(set(outs)), outs  # each value leaves a piece once


# -- 4. no CLIENTS input: the number of clients comes from clients= ------------------------------
@fb.computation(in_placements=(fb.SERVER,), clients=3)
def no_clients_input(s):
  return fb.sum(fb.broadcast(s)), fb.mean(fb.map(lambda a: a * 1.0, fb.broadcast(s)))


def test_client_count_without_clients_input_is_recorded():
  s = np.float32(3.0)
  for got in (no_clients_input(s), fb.split(no_clients_input, s).run(s)):
    np.testing.assert_allclose(got, (9.0, 3.0))
  assert fb.split(no_clients_input, s).clients == 3


# -- 5. leaf names that collide after sanitizing -------------------------------------------------
@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def colliding_names(p, x):
  return {"dense": {"w": p["dense"]["w"] + 1.0}, "dense_w": fb.sum(x) + p["dense_w"], "x": x}


P = {"dense": {"w": np.float32(1.0)}, "dense_w": np.float32(10.0)}


def test_colliding_leaf_names_stay_apart():
  form = fb.split(colliding_names, P, X)
  names = [b.name for b in (*form.inputs, *form.outputs)]
  assert len(names) == len(set(names)), names
  want = {"dense": {"w": 2.0}, "dense_w": 13.0, "x": X}
  for got in (colliding_names(P, X), form.run(P, X)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w), got, want)


# -- 6. an int8 sum stays int8 (and wraps) on every path ------------------------------------------
@fb.computation(in_placements=(fb.CLIENTS,))
def int8_sum(x):
  return fb.sum(x)


X8 = np.array([50, 100, 20], np.int8)


def test_int8_sum_keeps_its_dtype():
  want = np.array([50, 100, 20], np.int8).sum(dtype=np.int8)  # 170 wraps to -86
  for got in (int8_sum(X8), fb.split(int8_sum, X8).run(X8)):
    assert np.asarray(got).dtype == np.int8
    assert np.asarray(got) == want


# -- 7. TFLite: vector @ matrix (the gradient of x @ w) and bool-to-int arithmetic ----------------
W = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def vector_matrix_grad(w, x):
  def loss(wi, xi):
    return jnp.sum(jnp.tanh(xi @ wi))

  grads = fb.map(jax.grad(loss), fb.broadcast(w), x)
  flags = fb.map(lambda xi: ((xi > 0).astype(jnp.int32) % 2).sum(), x)
  return fb.mean(grads), fb.sum(flags)


XM = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)


def _vector_matrix_want():
  g = [np.outer(xi, 1 - np.tanh(xi @ W) ** 2) for xi in XM.astype(np.float64)]
  return np.mean(g, axis=0), np.int32((XM > 0).sum())


def test_vector_matrix_gradient_and_bool_arithmetic_natively():
  want = _vector_matrix_want()
  for got in (vector_matrix_grad(W, XM), fb.split(vector_matrix_grad, W, XM).run(W, XM)):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1] == want[1]


# -- every program above on every runtime ---------------------------------------------------------
CASES = {
    "server_maximum": (server_maximum, (S, X), lambda: (X * 0.5).sum()),
    "server_relu_clip_softmax": (server_relu_clip_softmax, (S, X),
                                 lambda: _relu_clip_softmax(float(S), X.astype(np.float64))),
    "only_broadcasts": (only_broadcasts, (X,), lambda: 2.0 * X.sum() * len(X)),
    "variance": (variance, (X,), lambda: ((2 * X + 1).mean(), (2 * X + 1).var())),
    "no_clients_input": (no_clients_input, (np.float32(3.0),), lambda: (9.0, 3.0)),
    "colliding_names": (colliding_names, (P, X),
                        lambda: {"dense": {"w": 2.0}, "dense_w": 13.0, "x": X}),
    "int8_sum": (int8_sum, (X8,), lambda: X8.sum(dtype=np.int8)),
    "vector_matrix_grad": (vector_matrix_grad, (W, XM), _vector_matrix_want),
}
# Runtimes run case by case; TFF and jax run every case in one process each (each start of one
# costs seconds): their runner and jax_batch.py.
RUNTIMES = [("stablehlo", "iree"), ("tflite", "litert")]
BATCHED = [("tff", "tff"), ("stablehlo", "jax")]


def _named(export_dir, args) -> dict:
  manifest = json.loads((export_dir / "manifest.json").read_text())
  block = manifest["computation"]
  return block, {s["name"]: np.asarray(v) for s, v in zip(block["inputs"], jax.tree.leaves(args))}


def _check(case: str, block: dict, got: dict) -> None:
  """The runtime's outputs, by manifest name, against the case's numpy answer."""
  want_leaves = jax.tree.leaves(CASES[case][2]())
  assert len(block["outputs"]) == len(want_leaves) == len(got)
  for spec, w in zip(block["outputs"], want_leaves):
    g = got[spec["name"]]
    assert g.dtype == np.dtype(spec["dtype"]), (spec["name"], g.dtype)
    if np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w, err_msg=spec["name"])
    else:
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=spec["name"])


@pytest.mark.slow
@pytest.mark.parametrize("target,runtime", RUNTIMES, ids=[r for _, r in RUNTIMES])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reproduction_on_runtime(case, target, runtime, tmp_path):
  comp, args, _ = CASES[case]
  out = fb.export(comp, *args, target=target, out_dir=tmp_path / case)
  block, named = _named(out, args)
  _check(case, block, run_on_runtime(out, runtime, named).outputs)


def _run_all(runtime: str, jobs: list) -> list:
  """``jobs``: (export directory, inputs by name); one process runs them all."""
  if runtime == "jax":
    return run_on_jax([(out, named, 0) for out, named in jobs])
  from faxbridge.converters.runtimes.tff import ComputationJob, run_computations

  return [run if isinstance(run, Exception) else run.outputs
          for run in run_computations([ComputationJob(out, named) for out, named in jobs],
                                      strict=False)]


@pytest.fixture(scope="module")
def batched(tmp_path_factory) -> dict:
  """Every case exported for TFF and for jax, and run in one process per runtime: per (case,
  runtime), (manifest block, outputs) or the error of its export or its run alone."""
  results = {}
  for target, runtime in BATCHED:
    root, jobs = tmp_path_factory.mktemp(runtime), {}
    for case, (comp, args, _) in sorted(CASES.items()):
      try:
        out = fb.export(comp, *args, target=target, out_dir=root / case)
      except Exception as e:  # reported by that case's test
        results[case, runtime] = e
        continue
      block, named = _named(out, args)
      jobs[case] = (block, (out, named))
    runs = _run_all(runtime, [job for _, job in jobs.values()])
    for (case, (block, _)), run in zip(jobs.items(), runs):
      results[case, runtime] = run if isinstance(run, Exception) else (block, run)
  return results


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [r for _, r in BATCHED])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reproduction_in_one_process(case, runtime, batched):
  if isinstance(batched[case, runtime], Exception):
    raise batched[case, runtime]
  _check(case, *batched[case, runtime])


def test_a_computation_of_a_gradient_computes_the_gradient():
  # functools.update_wrapper used to copy the inner computation's `fn` over the outer one's, so
  # fb.computation(jax.grad(comp)) silently computed comp's value.
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def loss(w, x):
    return fb.mean(fb.map(lambda wi, xi: jnp.sum((wi - xi) ** 2), fb.broadcast(w), x))

  grad = fb.computation(jax.grad(loss), in_placements=(fb.SERVER, fb.CLIENTS))
  w, xs = np.float32(1.5), np.arange(3.0, dtype=np.float32)
  np.testing.assert_allclose(grad(w, xs), 2.0 * (w - xs).mean(), rtol=1e-6)


def test_debug_print_in_client_work_is_an_export_error():
  @fb.computation(in_placements=(fb.CLIENTS,))
  def noisy(x):
    def client(xi):
      jax.debug.print("x={}", xi)
      return xi * 2.0

    return fb.sum(fb.map(client, x))

  with pytest.raises(fb.ExportError, match="calls back into Python"):
    fb.split(noisy, X)

"""fb.split: stages, pieces, aggregation kinds, traffic, and programs that cannot be split."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faxbridge as fb
from examples import EXAMPLES

HERE = __file__


def _example(name):
  module = importlib.import_module(f"examples.{name}")
  return module.computation, module.example_inputs()


# The small examples split in the quick suite (FedAvg's weighted mean, analytics' integer and
# extremum aggregations, two stages); the larger models (optimizer state, attention, populations,
# DP noise) take seconds each to trace twice and run in the slow suite.
QUICK_SPLIT = {"fedavg", "fedsgd", "analytics", "two_stage"}


@pytest.mark.parametrize("name", [
    n if n in QUICK_SPLIT else pytest.param(n, marks=pytest.mark.slow) for n in EXAMPLES])
def test_pieces_in_order_equal_the_computation(name):
  comp, args = _example(name)
  form = fb.split(comp, *args)
  expected, got = comp(*args), form.run(*args)
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)


def _one_client(form, piece, args, i):
  """``piece``'s inputs for client ``i``: its row of each CLIENTS input, the SERVER ones as they are
  (a client work piece's broadcasts are server inputs by name here)."""
  leaves = {b.name: (np.asarray(v), b.placement)
            for b, v in zip(form.inputs, jax.tree.leaves(args), strict=True)}
  return [v[i] if place is fb.CLIENTS else v for v, place in (leaves[s.name] for s in piece.inputs)]


def test_each_piece_is_a_jaxpr_and_a_callable():
  comp, args = _example("fedavg")
  form = fb.split(comp, *args)
  assert [p.name for p in form.pieces()] == [
      "stage0_server_prepare", "stage0_client_work", "server_result"]
  work = form.stages[0].client_work
  # Client work is per client: one client's data, no clients axis.
  data_x = next(s for s in work.inputs if s.name == "data_examples_x")
  assert data_x.shape == args[1].examples["x"].shape[1:]
  assert isinstance(work.jaxpr, jax.extend.core.ClosedJaxpr)
  # The callable takes one client's flat values and gives one value per output spec.
  outs = work(*_one_client(form, work, args, 0))
  assert [np.shape(o) for o in outs] == [s.shape for s in work.outputs]
  primitives = {e.primitive.name for e in work.jaxpr.jaxpr.eqns}
  assert not primitives & {"faxbridge_broadcast", "faxbridge_map", "faxbridge_mean",
                          "faxbridge_weighted_mean"}
  assert "faxbridge_fold" in primitives  # the client's own loop over its batches


def test_aggregation_kinds_weights_and_params():
  comp, args = _example("analytics")
  (stage,) = fb.split(comp, *args).stages
  kinds = sorted(a.kind for a in stage.aggregations)
  assert kinds == ["max", "min", "secure_sum", "weighted_mean"]  # the mean weighted by the counts
  (secure,) = [a for a in stage.aggregations if a.kind == "secure_sum"]
  assert secure.params == {"bitwidth": 16} and secure.result.dtype == "int32"

  comp, args = _example("fedavg")
  form = fb.split(comp, *args)
  (stage,) = form.stages
  weighted = [a for a in stage.aggregations if a.kind == "weighted_mean"]
  assert len(weighted) == 5  # one per model leaf and the loss, all weighted by the client's count
  assert {a.user_weight for a in weighted} == {"data.count"}
  assert {a.weight for a in weighted} <= set(stage.uploads)
  # Every weight upload is the client's own count (client work run for the largest client).
  count = np.asarray(args[1].count)
  largest = int(np.argmax(count))
  work = stage.client_work
  outs = dict(zip([s.name for s in work.outputs], work(*_one_client(form, work, args, largest))))
  assert {float(outs[a.weight]) for a in weighted} == {float(count.max())}


def test_a_broadcast_that_depends_on_an_aggregate_opens_a_stage():
  comp, args = _example("two_stage")
  form = fb.split(comp, *args)
  assert len(form.stages) == 2
  first, second = form.stages
  # Stage 1 broadcasts the mean aggregated in stage 0.
  assert first.aggregations[0].result.name in second.broadcasts


def test_bytes_per_client_come_from_shapes_and_dtypes():
  comp, args = _example("fedsgd")
  form = fb.split(comp, *args)
  params = args[0]
  model_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
  # Download: the model. Upload: a gradient per leaf and the loss (f32), weighted means whose
  # weight, the client's int32 count, fb.weighted_mean casts to the leaves' dtype as client work:
  # once per call (the gradients', the loss's), not once per leaf.
  weighted = 2
  assert form.bytes_per_client() == [
      {"download": model_bytes, "upload": model_bytes + 4 + weighted * 4}]
  comp, args = _example("two_stage")
  assert fb.split(comp, *args).bytes_per_client() == [
      {"download": 4, "upload": 12}, {"download": 12, "upload": 12}]


def test_client_values_kept_across_stages_and_client_outputs():
  @fb.computation(in_placements=(fb.CLIENTS,))
  def centred(x):
    scaled = fb.map(lambda v: v * 2.0, x)
    mean = fb.mean(scaled)
    centred = fb.map(lambda v, m: v - m, scaled, fb.broadcast(mean))
    return fb.sum(centred), centred

  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  form = fb.split(centred, x)
  assert len(form.stages) == 2
  assert [b.placement for b in form.outputs] == [fb.SERVER, fb.CLIENTS]
  total, per_client = form.run(x)
  np.testing.assert_allclose(per_client, 2 * x - (2 * x).mean(0), rtol=1e-6)
  np.testing.assert_allclose(total, np.zeros(3), atol=1e-5)


def test_server_only_computation_has_no_stage():
  @fb.computation(in_placements=(fb.SERVER,))
  def double(x):
    return 2 * x

  form = fb.split(double, np.ones(3, np.float32))
  assert form.stages == ()
  np.testing.assert_array_equal(form.run(np.ones(3, np.float32)), 2 * np.ones(3))


def test_federated_ops_inside_control_flow_cannot_be_split(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def rounds_in_a_loop(params, data):
    def one_round(_, p):
      return fb.mean(fb.map(lambda q, d: q + d.mean(), fb.broadcast(p), data))
    return jax.lax.fori_loop(0, 3, one_round, params)  # loop-marker

  args = (np.float32(0), np.ones((4, 2), np.float32))
  with pytest.raises((fb.PlacementError, fb.ExportError),
                     match=r"number of server/client\s+round trips must be static") as info:
    fb.split(rounds_in_a_loop, *args)
  assert_points_at(info.value, HERE, "loop-marker")


def test_python_callback_in_client_work_is_refused(assert_points_at):
  def host_fn(v):
    return np.asarray(v) * 2

  def client(v):
    return jax.pure_callback(host_fn, jax.ShapeDtypeStruct(v.shape, v.dtype), v,  # cb-marker
                             vmap_method="sequential")

  @fb.computation(in_placements=(fb.CLIENTS,))
  def with_callback(x):
    return fb.sum(fb.map(client, x))

  x = np.ones((3, 2), np.float32)
  np.testing.assert_allclose(with_callback(x), [6.0, 6.0])  # natively it runs
  with pytest.raises(fb.ExportError, match="calls back into Python") as info:
    fb.split(with_callback, x)
  assert_points_at(info.value, HERE, "cb-marker")


def test_data_dependent_python_control_flow_names_the_line(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def branchy(s, x):
    m = fb.mean(x)
    if jnp.sum(m) > 0:  # branch-marker
      return m
    return s

  with pytest.raises(fb.TraceError, match="Python control flow") as info:
    fb.split(branchy, np.float32(1), np.ones((3, 2), np.float32))
  assert_points_at(info.value, HERE, "branch-marker")


def test_split_of_jitted_helpers_inlines_them():
  @jax.jit
  def aggregate_twice(x):
    return fb.mean(x), fb.sum(x)

  @fb.computation(in_placements=(fb.CLIENTS,))
  def comp(x):
    mean, total = aggregate_twice(fb.map(jnp.square, x))
    return mean + total

  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  form = fb.split(comp, x)
  assert sorted(a.kind for a in form.stages[0].aggregations) == ["mean", "sum"]
  np.testing.assert_allclose(form.run(x), comp(x), rtol=1e-6)


def test_a_typed_prng_key_crossing_a_piece_boundary_is_refused_with_the_fix(tmp_path):
  # Natively a typed key is fine; a split or export carries plain arrays, so the user is told to
  # pass jax.random.key_data(key) instead (a bare TypeError from numpy used to surface here).
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def noisy_sum(key, x):
    return fb.sum(x) + jax.random.normal(key, (2,))

  key, x = jax.random.key(0), np.ones((3, 2), np.float32)
  assert noisy_sum(key, x).shape == (2,)
  for attempt in (lambda: fb.split(noisy_sum, key, x),
                  lambda: fb.export(noisy_sum, key, x, target="stablehlo", out_dir=tmp_path / "e")):
    with pytest.raises(fb.ExportError, match=r"key is a typed PRNG key \(key<fry>\).*key_data"):
      attempt()
  assert not (tmp_path / "e").exists()
  raw = fb.split(noisy_sum, jax.random.key_data(key), x)  # the documented fix splits
  assert raw.inputs[0].spec.dtype == "uint32"

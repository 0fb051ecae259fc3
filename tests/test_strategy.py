"""Execution strategies of native runs (faxbridge/_src/execution.py): a stream over clients with the
aggregations as accumulators equals vmap over all clients, and numpy, under every JAX transformation.

Independent answers: numpy folds over clients (the generated programs' reference, and the
aggregation checks below) and the same math in plain JAX. Floats within 1e-6 + 1e-5 * |ref|
(streaming changes the summation order), integers exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from federated_programs import generate, mismatches, program

import faxbridge as fb
from faxbridge._src import aggregations as A
from faxbridge._src import execution

STRATEGIES = ["vmap", "stream", ("stream", 3)]
RNG = np.random.default_rng(7)
N = 7  # clients: blocks of 3 leave a remainder of 1
S = np.float32(0.7)
X = RNG.normal(size=(N, 3)).astype(np.float32)
W = RNG.uniform(1, 2, size=(N,)).astype(np.float32)


def every_op(s, x, w):
  """A two-output map: one output only aggregated (every kind), one also returned stacked."""
  y, z = fb.map(lambda a, b: (jnp.tanh(a * b) * b.sum(), jnp.sin(b) * a), fb.broadcast(s), x)
  counts = fb.map(lambda b: (b > 0).astype(jnp.int32).sum(), x)
  server = fb.mean(y) ** 2 * fb.weighted_mean(y, w) + fb.max(y) * fb.min(y) + fb.sum(y)
  return {"server": server, "z": z, "zmax": fb.max(z), "count": fb.secure_sum(counts, bitwidth=8)}


def every_op_numpy(s, x, w):
  y = np.tanh(s * x) * x.sum(1, keepdims=True)
  z = np.sin(x) * s
  wmean = (w[:, None] * y).sum(0) / w.sum()
  server = y.mean(0) ** 2 * wmean + y.max(0) * y.min(0) + y.sum(0)
  return {"server": server, "z": z, "zmax": z.max(0), "count": np.int32((x > 0).sum())}


def _comp(fn, strategy, places=(fb.SERVER, fb.CLIENTS, fb.CLIENTS)):
  return fb.computation(fn, in_placements=places, strategy=strategy)


def _close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(g).dtype == np.asarray(w).dtype
    if np.issubdtype(np.asarray(w).dtype, np.inexact):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(g, w)


# -- the generated programs, under every strategy, against numpy -----------------------------------
def _covering(count: int) -> list[int]:
  chosen, seen = [], set()
  features = {s: generate(s).features for s in range(50)}
  while len(chosen) < count:
    best = max((s for s in features if s not in chosen), key=lambda s: (len(features[s] - seen), -s))
    chosen.append(best)
    seen |= features[best]
  return chosen


QUICK = _covering(2)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in QUICK else pytest.mark.slow)
                                  for s in range(50)], ids=lambda s: f"seed{s}")
def test_generated_programs_equal_numpy_under_each_strategy(seed, strategy):
  p = program(seed)
  with fb.execution_strategy(strategy):
    assert p.computation.strategy_for(*p.args) in ("vmap", execution.validate(strategy))
    got = p.computation(*p.args)
  problems = mismatches(p.expected, got)
  assert not problems, f"seed {seed}, {strategy}:\n" + "\n".join(problems)


# -- values and derivatives ------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_values_equal_numpy(strategy):
  _close(_comp(every_op, strategy)(S, X, W), every_op_numpy(S, X, W))


def _loss(comp):
  return lambda s, x, w: jnp.sum(comp(s, x, w)["server"]) + jnp.sum(comp(s, x, w)["z"] ** 2)


def small(s, x, w):
  y = fb.map(lambda a, b: jnp.sin(a * b), fb.broadcast(s), x)
  return jnp.sum(fb.weighted_mean(y, w) * fb.max(y)) + jnp.sum(fb.mean(y))


def small_jax(s, x, w):
  y = jnp.sin(s * x)
  return jnp.sum(jnp.sum(w[:, None] * y, 0) / jnp.sum(w) * y.max(0)) + jnp.sum(y.mean(0))


def test_gradients_of_blocks_of_clients_equal_plain_jax():
  want = jax.grad(small_jax, argnums=(0, 1, 2))(S, X, W)
  got = jax.grad(_comp(small, ("stream", 3)), argnums=(0, 1, 2))(S, X, W)
  _close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gradients_of_one_client_per_step_equal_plain_jax():
  want = jax.grad(small_jax, argnums=(0, 1, 2))(S, X, W)
  for strategy in ("stream", ("stream", 2)):
    got = jax.grad(_comp(small, strategy), argnums=(0, 1, 2))(S, X, W)
    _close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grad_jvp_vjp_equal_the_vmap_strategy():
  vmap, stream = _comp(every_op, "vmap"), _comp(every_op, ("stream", 3))
  grads = [jax.grad(_loss(c), argnums=(0, 1, 2))(S, X, W) for c in (vmap, stream)]
  _close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
  tangents = (np.float32(1.0), np.ones_like(X), np.ones_like(W))
  outs = [jax.jvp(lambda *a, c=c: c(*a)["server"], (S, X, W), tangents) for c in (vmap, stream)]
  _close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
  cts = []
  for c in (vmap, stream):
    out, vjp = jax.vjp(lambda *a, c=c: c(*a)["server"], S, X, W)
    cts.append((out, vjp(jnp.ones_like(out))))
  _close(cts[1], cts[0], rtol=1e-5, atol=1e-5)


def test_vmap_over_simulations_jit_and_eval_shape():
  stream, vmap = _comp(every_op, "stream"), _comp(every_op, "vmap")
  ss = np.array([0.1, 0.7, -0.3], np.float32)
  got = jax.jit(jax.vmap(stream, in_axes=(0, None, None)))(ss, X, W)
  for i, s in enumerate(ss):
    _close(jax.tree.map(lambda a, i=i: a[i], got), every_op_numpy(s, X, W))
  xs = np.stack([X, 2 * X])
  _close(jax.vmap(stream, in_axes=(None, 0, None))(S, xs, W),
         jax.vmap(vmap, in_axes=(None, 0, None))(S, xs, W))
  shapes = jax.eval_shape(stream, S, X, W)
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {
      "server": ((3,), jnp.float32), "z": ((N, 3), jnp.float32), "zmax": ((3,), jnp.float32),
      "count": ((), jnp.int32)}


# -- each aggregation's stream rule, block by block, against numpy ---------------------------------
def _streamed(prim, x, w, block):
  rule = A.AGGREGATIONS[prim].streaming({"bitwidth": 8} if prim is A.secure_sum_p else {})
  aval = jax.core.ShapedArray(x.shape[1:], x.dtype)
  acc = rule.init(aval, None if w is None else jax.core.ShapedArray(w.shape[1:], w.dtype))
  for start in range(0, len(x), block):
    acc = rule.accumulate(acc, x[start:start + block], None if w is None else w[start:start + block])
  return np.asarray(rule.finish(acc, len(x), x.dtype))


@pytest.mark.parametrize("block", [1, 2, 5])
def test_aggregation_rules_stream_exactly_for_integers(block):
  i8 = np.int8([[100, -128], [100, 2], [-3, 127], [90, -1], [1, 1]])
  assert _streamed(A.sum_p, i8, None, block).tolist() == [32, 1]  # 288 wraps
  assert _streamed(A.sum_p, i8, None, block).dtype == np.int8
  assert _streamed(A.secure_sum_p, np.uint8([[200], [100]]), None, block).tolist() == [44]
  assert _streamed(A.max_p, i8, None, block).tolist() == [100, 127]
  assert _streamed(A.min_p, i8, None, block).tolist() == [-3, -128]
  # The primitive's int mean: the wrapped int8 sum, divided as integers (truncating).
  assert _streamed(A.mean_p, i8, None, block).tolist() == [6, 0]  # 32 // 5
  assert _streamed(A.max_p, np.array([[False], [True]]), None, block).tolist() == [True]


@pytest.mark.parametrize("block", [1, 3])
def test_aggregation_rules_stream_floats(block):
  x = RNG.normal(size=(7, 2, 3)).astype(np.float32)
  w = RNG.uniform(0.5, 2, size=(7,)).astype(np.float32)
  np.testing.assert_allclose(_streamed(A.mean_p, x, None, block), x.mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_streamed(A.weighted_mean_p, x, w, block),
                             (w[:, None, None] * x).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
  xb = jnp.asarray(x, jnp.bfloat16)  # low precision accumulates in float32, as jnp.sum does
  got = _streamed(A.mean_p, xb, None, block)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), np.asarray(xb, np.float32).mean(0),
                             rtol=1e-2, atol=1e-2)


# -- memory, structure, and where strategies apply -------------------------------------------------
def _round(p, x):
  """A FedAvg-like round: a per-client update whose intermediates dwarf the model."""
  def client(p, x):
    h = jnp.tanh(x @ p)  # (64, 256) per client
    return p - 0.1 * x.T @ h / x.shape[0]
  return fb.mean(fb.map(client, fb.broadcast(p), x))


def test_streaming_keeps_per_client_intermediates_out_of_memory():
  p = np.ones((32, 256), np.float32) * 0.01
  x = RNG.normal(size=(64, 64, 32)).astype(np.float32)
  temp = {}
  for strategy in ("vmap", "stream"):
    comp = _comp(_round, strategy, (fb.SERVER, fb.CLIENTS))
    temp[strategy] = jax.jit(comp).lower(p, x).compile().memory_analysis().temp_size_in_bytes
    np.testing.assert_allclose(comp(p, x), _comp(_round, "vmap", (fb.SERVER, fb.CLIENTS))(p, x),
                               rtol=1e-5, atol=1e-6)
  per_client = 64 * 256 * 4
  assert temp["vmap"] >= 64 * per_client  # every client's activations at once
  assert temp["stream"] < 8 * per_client, temp  # one client's (and the accumulator)


def test_a_streamed_computation_runs_under_disable_jit():
  """Bound eagerly, the native primitive is compiled all the same: the stream is only a lowering."""
  with jax.disable_jit():
    got = _comp(every_op, ("stream", 3))(S, X, W)
  _close(got, every_op_numpy(S, X, W))


def test_trace_split_and_gradient_jaxprs_keep_the_federated_primitives():
  comp = _comp(every_op, "stream")
  names = {e.primitive.name for e in comp.trace(S, X, W).jaxpr.jaxpr.eqns}
  assert {"faxbridge_map", "faxbridge_mean", "faxbridge_broadcast"} <= names
  # A computation traced inside another keeps binding the primitives, never the stream.
  server_loss = _comp(lambda s, x: jnp.sum(fb.mean(fb.map(lambda a, b: (a * b) ** 2, fb.broadcast(s), x))),
                      "stream", (fb.SERVER, fb.CLIENTS))
  outer = fb.computation(jax.grad(server_loss), in_placements=(fb.SERVER, fb.CLIENTS))
  text = str(outer.trace(S, X).jaxpr)
  assert "faxbridge_map" in text and "faxbridge_native" not in text
  np.testing.assert_allclose(outer(S, X), 2 * S * (X**2).mean(0).sum(), rtol=1e-5)
  # At top level, JAX sees one faxbridge_native whose jaxpr is the federated one.
  text = str(jax.make_jaxpr(jax.grad(server_loss))(S, X))
  assert "faxbridge_native" in text and "faxbridge_map" in text and "faxbridge_sum" in text
  _close(fb.split(comp, S, X, W).run(S, X, W), every_op_numpy(S, X, W))


def test_a_streamed_map_is_a_scan():
  hlo = jax.jit(_comp(every_op, "stream")).lower(S, X, W).as_text()
  assert "stablehlo.while" in hlo
  assert "stablehlo.while" not in jax.jit(_comp(every_op, "vmap")).lower(S, X, W).as_text()


def test_maps_feeding_maps_and_casts_of_weights_stream_in_one_group():
  def chained(s, x):
    y, n = fb.map(lambda a, b: (a * b, jnp.int32(2)), fb.broadcast(s), x)
    z = fb.map(lambda v: jnp.cos(v), y)
    return fb.weighted_mean(z, n), fb.sum(y)  # int weights: a cast map joins the group

  comp = _comp(chained, "stream", (fb.SERVER, fb.CLIENTS))
  jaxpr = comp.trace(S, X).jaxpr.jaxpr
  groups, _ = execution._plan(jaxpr)
  (group,) = groups.values()
  assert len(group.maps) == 3 and len(group.aggregations) == 2 and group.stacked == []
  _close(comp(S, X), (np.cos(S * X).mean(0), (S * X).sum(0)))


def test_a_cast_of_an_input_weight_joins_the_group_of_the_weighted_value():
  """FedAvg weighted by the clients' counts: fb.weighted_mean binds the cast of the count (an
  input) after the value's map; the cast joins the value's group, so the weighted mean is fused
  and the clients' values are never stacked (memory flat in the clients)."""

  def weighted(s, x, n):
    return fb.weighted_mean(fb.map(lambda a, b: jnp.sin(a * b), fb.broadcast(s), x), n)

  comp = _comp(weighted, "stream")
  n = np.arange(1, N + 1, dtype=np.int32)
  groups, _ = execution._plan(comp.trace(S, X, n).jaxpr.jaxpr)
  (group,) = groups.values()
  assert len(group.maps) == 2 and len(group.aggregations) == 1 and group.stacked == []
  _close(comp(S, X, n), ((n[:, None] * np.sin(S * X)).sum(0) / n.sum()).astype(np.float32))


def test_outer_computation_streams_an_inner_one():
  inner = _comp(every_op, "vmap")
  outer = _comp(lambda s, x, w: inner(s, x, w)["server"] * 2, "stream")
  _close(outer(S, X, W), every_op_numpy(S, X, W)["server"] * 2)


# -- choosing a strategy ---------------------------------------------------------------------------
def test_strategy_resolution_order_and_auto():
  comp = _comp(every_op, None)
  assert comp.strategy_for(S, X, W) == ("stream", execution.CPU_BLOCK)  # auto, on CPU
  with fb.execution_strategy("vmap"):
    assert comp.strategy_for(S, X, W) == "vmap"
    with fb.execution_strategy(("stream", 4)):
      assert comp.strategy_for(S, X, W) == ("stream", 4)
    assert _comp(every_op, "stream").strategy_for(S, X, W) == ("stream", 1)  # its own wins
    _close(comp(S, X, W), every_op_numpy(S, X, W))
  assert comp.strategy_for(S, X, W) == ("stream", execution.CPU_BLOCK)
  no_map = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
  assert no_map.strategy_for(X) == "vmap"  # nothing per client to stream


@pytest.mark.parametrize("bad", ["scan", ("stream", 0), ("stream", 1.5), ("stream",), ("vmap", 2),
                                 ("stream", True)])
def test_bad_strategies_are_refused(bad):
  with pytest.raises(ValueError, match="strategy must be"):
    fb.computation(every_op, in_placements=(fb.SERVER,), strategy=bad)
  with pytest.raises(ValueError, match="strategy must be"), fb.execution_strategy(bad):
    pass


class _FakeDevice:
  def __init__(self, platform, free):
    self.platform, self.free = platform, free

  def memory_stats(self):
    return None if self.free is None else {"bytes_limit": self.free + 100, "bytes_in_use": 100}


def test_auto_on_accelerators_vmaps_while_a_quarter_of_free_memory_holds_the_clients(monkeypatch):
  jaxpr = fb.computation(_round, in_placements=(fb.SERVER, fb.CLIENTS)).trace(
      np.ones((32, 256), np.float32), np.ones((64, 64, 32), np.float32)).jaxpr.jaxpr
  per_client = execution.per_client_bytes(jaxpr)
  assert per_client >= 64 * 256 * 4  # at least the client's activations
  for free, clients, devices, want in [
      (4 * per_client * 1000, 1000, 1, "vmap"),
      (4 * per_client * 1000, 1001, 1, ("stream", 1000)),
      (4 * per_client * 1000, 2000, 2, "vmap"),  # 1000 clients per device
      (4 * per_client * 10, 5000, 1, ("stream", 10)),
      (per_client, 5000, 1, ("stream", 1)),
      (None, 5000, 1, "vmap"),  # no memory statistics: as before strategies existed
  ]:
    monkeypatch.setattr(jax, "devices", lambda free=free: [_FakeDevice("gpu", free)])
    assert execution.resolve("auto", jaxpr, clients, devices) == want, (free, clients, devices)
  monkeypatch.setattr(jax, "devices", lambda: [_FakeDevice("cpu", None)])
  assert execution.resolve("auto", jaxpr, 5, 1) == ("stream", execution.CPU_BLOCK)
  assert execution.resolve(("stream", 3), jaxpr, 5, 1) == ("stream", 3)  # explicit: as given


def test_auto_on_cpu_takes_larger_blocks_in_large_rounds_of_small_clients(monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda: [_FakeDevice("cpu", None)])
  small = fb.computation(_round, in_placements=(fb.SERVER, fb.CLIENTS)).trace(
      np.ones((32, 256), np.float32), np.ones((64, 64, 32), np.float32)).jaxpr.jaxpr
  assert execution.per_client_bytes(small) * execution.CPU_LARGE_BLOCK <= execution.CPU_LARGE_BLOCK_BYTES
  large_round = execution.CPU_LARGE_ROUND
  for clients, devices, want in [
      (large_round - 1, 1, execution.CPU_BLOCK),
      (large_round, 1, execution.CPU_LARGE_BLOCK),
      (100_000, 1, execution.CPU_LARGE_BLOCK),
      (large_round, 2, execution.CPU_BLOCK),  # 512 clients on each device
      (2 * large_round, 2, execution.CPU_LARGE_BLOCK),
  ]:
    assert execution.resolve("auto", small, clients, devices) == ("stream", want), (clients, devices)
  # Clients whose values are large (16 of them over 256 MiB) keep blocks of 8 in any round.
  big = fb.computation(_round, in_placements=(fb.SERVER, fb.CLIENTS)).trace(
      np.ones((32, 256), np.float32), np.ones((2, 2**17, 32), np.float32)).jaxpr.jaxpr
  assert execution.per_client_bytes(big) * execution.CPU_LARGE_BLOCK > execution.CPU_LARGE_BLOCK_BYTES
  assert execution.resolve("auto", big, 100_000, 1) == ("stream", execution.CPU_BLOCK)

"""fb.computation: the traced program (jaxpr, placements, pretty text) and native execution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import faxbridge as fb
from examples import _mlp, fedavg, two_stage

N = 4
S = np.float32(0.5)
X = np.arange(N * 3, dtype=np.float32).reshape(N, 3) / 10


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def program(s, x):
  """A small program with every kind of federated operation."""
  y = fb.map(lambda a, b: jnp.sin(a * b), fb.broadcast(s), x)
  counts = fb.map(lambda b: (b > 0.5).astype(jnp.int32).sum(), x)
  return {"mean": fb.mean(y), "count": fb.secure_sum(counts, bitwidth=8), "y": y}


def _all_prims(jaxpr: jcore.Jaxpr) -> list[str]:
  return [e.primitive.name for e in jaxpr.eqns]


# -- the traced program ----------------------------------------------------------------------------
def test_trace_gives_a_closed_jaxpr_with_federated_primitives():
  traced = program.trace(S, X)
  assert isinstance(traced.jaxpr, jcore.ClosedJaxpr)
  prims = _all_prims(traced.jaxpr.jaxpr)
  assert prims.count("faxbridge_map") == 2
  assert {"faxbridge_broadcast", "faxbridge_mean", "faxbridge_secure_sum"} <= set(prims)
  # Per-client work stays inside the maps: no sin at the top level.
  assert "sin" not in prims and "gt" not in prims
  maps = [e for e in traced.jaxpr.jaxpr.eqns if e.primitive.name == "faxbridge_map"]
  sub = maps[0].params["jaxpr"]
  assert isinstance(sub, jcore.ClosedJaxpr)
  assert maps[0].params["clients"] == N
  assert [a.shape for a in sub.in_avals] == [(), (3,)]  # one client's view: no clients axis
  assert [a.shape for a in sub.out_avals] == [(3,)]
  assert "sin" in _all_prims(sub.jaxpr)
  secure = next(e for e in traced.jaxpr.jaxpr.eqns if e.primitive.name == "faxbridge_secure_sum")
  assert secure.params["bitwidth"] == 8


def test_trace_placements_trees_and_clients():
  traced = program.trace(S, X)
  assert traced.in_placements == (fb.SERVER, fb.CLIENTS)
  # Outputs flatten in key order: count, mean, y.
  assert traced.out_placements == (fb.SERVER, fb.SERVER, fb.CLIENTS)
  assert traced.clients == N
  assert traced.out_tree == jax.tree.structure({"count": 0, "mean": 0, "y": 0})
  assert traced.in_tree == jax.tree.structure((0, 0))
  assert [a.shape for a in traced.jaxpr.out_avals] == [(), (3,), (N, 3)]


def test_trace_accepts_shape_specs():
  spec = jax.ShapeDtypeStruct((7, 3), jnp.float32)
  traced = program.trace(jax.ShapeDtypeStruct((), jnp.float32), spec)
  assert traced.clients == 7
  assert [a.shape for a in traced.jaxpr.in_avals] == [(), (7, 3)]


def test_pretty_shows_every_placement():
  text = program.trace(S, X).pretty()
  assert text.startswith(f"federated computation program (clients={N})")
  assert "a:f32[]@SERVER" in text and "b:{f32[3]}@CLIENTS" in text
  assert "fb.broadcast" in text and "fb.map" in text and "per-client:" in text
  assert "fb.secure_sum[bitwidth=8]" in text and "fb.mean" in text
  assert "{i32[]}@CLIENTS" in text  # the per-client counts
  assert str(program.trace(S, X)) == text
  for line in text.splitlines():
    if " = fb." in line:  # every federated result carries its placement
      assert "@SERVER" in line or "@CLIENTS" in line, line


def test_pretty_of_an_example_names_its_stages():
  text = fedavg.computation.trace(*fedavg.example_inputs()).pretty()
  assert "fb.weighted_mean" in text and "fb.broadcast" in text
  assert text.count("@CLIENTS") > 5 and text.count("@SERVER") > 5


# -- native execution ------------------------------------------------------------------------------
def test_native_run_and_clients_outputs_keep_the_leading_axis():
  out = program(S, X)
  y = np.sin(S * X)
  np.testing.assert_allclose(out["y"], y, rtol=1e-6)
  assert out["y"].shape == (N, 3)
  np.testing.assert_allclose(out["mean"], y.mean(0), rtol=1e-6)
  assert out["count"].dtype == jnp.int32 and int(out["count"]) == int((X > 0.5).sum())
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(out))


def test_execution_is_cached_per_input_shapes():
  traces = []

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def counted(s, x):
    traces.append(jnp.shape(x))  # a Python side effect: runs only while tracing
    return fb.sum(fb.map(lambda a, b: a * b, fb.broadcast(s), x))

  np.testing.assert_allclose(counted(S, X), (S * X).sum(0))
  first = len(traces)
  assert first >= 1
  np.testing.assert_allclose(counted(np.float32(2.0), X + 1), (2 * (X + 1)).sum(0))
  assert len(traces) == first  # same shapes: no retrace
  counted(S, np.ones((N + 1, 3), np.float32))  # a new number of clients: traced again
  assert len(traces) > first
  again = len(traces)
  counted(np.float32(3.0), np.zeros((N + 1, 3), np.float32))
  counted(S, X)
  assert len(traces) == again
  counted(S, X.astype(np.float16))  # a new dtype: traced again
  assert len(traces) > again


def test_clients_given_explicitly_for_server_only_inputs():
  @fb.computation(clients=3, in_placements=(fb.SERVER,))
  def spread(s):
    return fb.broadcast(s), fb.sum(fb.broadcast(s))

  spread_out, total = spread(np.arange(2, dtype=np.float32))
  np.testing.assert_array_equal(spread_out, np.tile(np.arange(2), (3, 1)))
  np.testing.assert_array_equal(total, 3 * np.arange(2))
  assert spread.trace(np.arange(2, dtype=np.float32)).clients == 3


def test_computation_keeps_the_wrapped_functions_name_and_doc():
  assert program.__name__ == "program"
  assert "every kind of federated operation" in program.__doc__
  assert isinstance(program, fb.Computation)
  assert program.trace(S, X).name == "program"


@jax.jit
def _sgd_step(params, batch):
  loss, grad = jax.value_and_grad(_mlp.loss)(params, batch)
  return jax.tree.map(lambda w, g: w - fedavg.LOCAL_LR * g, params, grad), loss


def _fedavg_reference(params, data):
  """FedAvg in plain JAX and Python loops: each client SGD over its own rows ``[i, :count[i]]`` in
  slices of ``batch_size`` (the last one shorter), the deltas averaged with weights count / N; the
  loss the mean over all N real examples of each one's loss before its batch's step."""
  count, b = np.asarray(data.count), data.batch_size
  deltas, loss_sum = [], 0.0
  for i, n in enumerate(count):
    own = {k: np.asarray(v)[i, :n] for k, v in data.examples.items()}
    trained = params
    for start in range(0, n, b):
      trained, loss = _sgd_step(trained, {k: v[start:start + b] for k, v in own.items()})
      loss_sum += float(loss) * len(own["y"][start:start + b])
    deltas.append(jax.tree.map(jnp.subtract, trained, params))
  weights = count / count.sum()
  mean_delta = jax.tree.map(lambda *d: sum(w * x for w, x in zip(weights, d)), *deltas)
  return jax.tree.map(jnp.add, params, mean_delta), loss_sum / count.sum()


def test_fedavg_round_equals_plain_jax():
  args = fedavg.example_inputs()
  assert len(set(np.asarray(args[1].count).tolist())) > 1  # clients of different sizes
  got = fedavg.computation(*args)
  want = _fedavg_reference(*args)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6), got, want)
  # The round did something: the model moved.
  assert not np.allclose(got[0]["w1"], args[0]["w1"])


def test_two_stage_equals_plain_jax():
  # A broadcast that depends on an aggregate: the server's mean goes back out to the clients.
  scale, values = two_stage.example_inputs()
  mean = (scale * values.mean(axis=1)).mean(0)
  centred = ((values - mean) ** 2).mean(axis=1).mean(0)
  got_mean, got_centred = two_stage.computation(scale, values)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
  np.testing.assert_allclose(got_centred, centred, rtol=1e-5)


def test_a_call_on_a_mesh_compiles_with_the_options_where_jax_allows_them():
  """On a mesh, a call compiles with fb.compiler_options(); JAX takes options on a top-level jit
  only, so under an outer jit, scan or checkpoint the call is staged in without them, and under
  grad or vmap alone it keeps them. Every composition runs and equals plain JAX."""
  from faxbridge._src import jax_internals

  mesh = jax.make_mesh((1,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
  comp = fb.computation(lambda w, x: fb.mean(fb.map(lambda w, x: jnp.sin(w * x).sum(),
                                                     fb.broadcast(w), x)),
                        in_placements=(fb.SERVER, fb.CLIENTS), mesh=mesh)
  plain = lambda w, x: jnp.mean(jnp.sin(w * x).sum(axis=1))
  w, x = np.float32(0.5), np.arange(12, dtype=np.float32).reshape(4, 3)
  assert comp.lower(w, x).compile().as_text() is not None
  vmapped = lambda f: lambda w, x: jax.vmap(f, (None, 0))(w, jnp.stack([x, x + 1]))
  for transform, staged in [(lambda f: f, False), (jax.grad, False), (vmapped, False),
                            (jax.jit, True), (lambda f: jax.jit(jax.grad(f)), True),
                            (jax.checkpoint, True), (lambda f: jax.grad(jax.checkpoint(f)), True)]:
    seen = []

    def probe(w, x, seen=seen):  # a new function each time: JAX caches traces per function
      seen.append(jax_internals.inside_a_staged_trace())
      return comp(w, x)

    np.testing.assert_allclose(transform(probe)(w, x), transform(plain)(w, x), rtol=1e-5, atol=1e-6)
    assert seen == [staged], (transform, seen)

"""Native sharded execution on 8 CPU devices: CLIENTS values split along the mesh's ``clients``
axis, SERVER values replicated, results equal to the unsharded run.

The sharded runs happen in a fresh Python with 8 devices (``tests/eight_devices.py``); it writes
what it saw to a JSON file checked here.
"""

from __future__ import annotations

import textwrap

import eight_devices
import jax
import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import faxbridge as fb
    from examples import fedavg

    P = jax.sharding.PartitionSpec
    assert len(jax.devices()) == 8, jax.devices()

    def program(s, x):
      y = fb.map(lambda a, b: jnp.sin(a * b), fb.broadcast(s), x)
      return {"y": y, "mean": fb.mean(y), "max": fb.max(y)}

    S = np.float32(0.5)
    X = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 10
    places = (fb.SERVER, fb.CLIENTS)

    def describe(out):
      def one(a):
        named = isinstance(a.sharding, jax.sharding.NamedSharding)
        return {"spec": [str(p) for p in a.sharding.spec] if named else None,
                "mesh": dict(a.sharding.mesh.shape) if named else None,
                "replicated": bool(a.sharding.is_fully_replicated),
                "devices": len(a.sharding.device_set),
                "shard_shapes": sorted({tuple(s.data.shape) for s in a.addressable_shards}),
                "value": np.asarray(a).tolist()}
      return jax.tree.map(one, out)

    report = {"unsharded": describe(fb.computation(program, in_placements=places)(S, X))}
    explicit = jax.make_mesh((8,), ("clients",))  # jax's default axis type: Explicit
    auto = jax.make_mesh((8,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
    two_d = jax.make_mesh((4, 2), ("clients", "model"))
    report["mesh_arg"] = describe(fb.computation(program, in_placements=places, mesh=explicit)(S, X))
    report["mesh_arg_auto"] = describe(fb.computation(program, in_placements=places, mesh=auto)(S, X))
    ambient = fb.computation(program, in_placements=places)
    with jax.set_mesh(explicit):
      report["ambient"] = describe(ambient(S, X))
    with jax.set_mesh(two_d):
      report["ambient_2d"] = describe(ambient(S, X))
      grad = jax.grad(lambda s, x: jnp.sum(ambient(s, x)["mean"]), argnums=(0, 1))(S, X)
      report["grad_sharded"] = [np.asarray(g).tolist() for g in grad]
    grad = jax.grad(lambda s, x: jnp.sum(ambient(s, x)["mean"]), argnums=(0, 1))(S, X)
    report["grad_unsharded"] = [np.asarray(g).tolist() for g in grad]
    try:
      fb.computation(program, in_placements=places, mesh=explicit)(S, X[:12])
    except ValueError as e:
      report["uneven"] = str(e)

    # Execution strategies under the mesh: auto streams each device's clients (a scan inside
    # shard_map) and combines the aggregations with one collective each.
    streamed = fb.computation(program, in_placements=places, mesh=explicit)
    report["strategy_auto"] = str(streamed.strategy_for(S, X))
    per_client = fb.computation(program, in_placements=places, mesh=explicit, strategy="stream")
    hlo = jax.jit(per_client).lower(S, X).compile().as_text()  # 2 clients per device: 2 steps
    report["hlo"] = {"while": "while(" in hlo or " while" in hlo, "all_reduce": "all-reduce" in hlo}
    for name, strategy in (("vmap", "vmap"), ("stream3", ("stream", 3))):
      comp = fb.computation(program, in_placements=places, mesh=explicit, strategy=strategy)
      report["strategy_" + name] = describe(comp(S, X))
      grad = jax.grad(lambda s, x: jnp.sum(comp(s, x)["mean"]) + jnp.sum(comp(s, x)["y"] ** 2),
                      argnums=(0, 1))(S, X)
      report["strategy_grad_" + name] = [np.asarray(g).tolist() for g in grad]

    # Traced by an outer jax.jit under jax.set_mesh of a mesh with Explicit axes (jax's default):
    # the computation runs in auto_axes, its results typed CLIENTS over clients, SERVER replicated.
    for name, strategy in (("vmap", "vmap"), ("stream", ("stream", 2))):
      comp = fb.computation(program, in_placements=places, mesh=two_d, strategy=strategy)
      with jax.set_mesh(two_d):
        report["outer_jit_" + name] = describe(jax.jit(comp)(S, X))

    # A transformer's FedAvg round (weights Megatron-sharded over `model`) compiled under set_mesh
    # and streamed inside shard_map: the equations of its jits recorded the Auto mesh they were
    # traced under, and must run under shard_map's (clients Manual).
    from benchmarks.transformer_model import Transformer, megatron_specs
    tiny = Transformer(layers=1, d=16, heads=2, f=32, t=2, vocab=8, batch=2)
    rng = np.random.default_rng(0)
    params, tokens = tiny.params(rng), tiny.data(rng, 8)
    auto_2d = jax.make_mesh((2, 4), ("clients", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w = jax.device_put(params, jax.tree.map(lambda s: jax.NamedSharding(auto_2d, s), megatron_specs(params)))

    def transformer_round(p, data):
      def local(p, d):
        g = jax.grad(tiny.loss)(p, d)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
      return fb.mean(fb.map(local, fb.broadcast(p), data))

    rounds = {}
    for name, strategy in (("vmap", "vmap"), ("stream", ("stream", 2))):
      comp = fb.computation(transformer_round, in_placements=places, mesh=auto_2d, strategy=strategy)
      with jax.set_mesh(auto_2d):
        rounds[name] = jax.jit(comp).lower(w, tokens).compile()(w, tokens)
    report["transformer_under_set_mesh"] = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(rounds["vmap"]), jax.tree.leaves(rounds["stream"])))

    args = fedavg.example_inputs()
    sharded_fedavg = fb.computation(fedavg.computation.fn, in_placements=fedavg.computation.in_placements,
                                    mesh=explicit)
    report["fedavg"] = describe(sharded_fedavg(*args))
    json.dump(report, open(sys.argv[1], "w"))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return eight_devices.report(tmp_path_factory.mktemp("sharding") / "report.json", "-c", SCRIPT)


def _reference():
  s = np.float32(0.5)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 10
  y = np.sin(s * x)
  return {"y": y, "mean": y.mean(0), "max": y.max(0)}


@pytest.mark.parametrize("run", ["mesh_arg", "mesh_arg_auto", "ambient"])
def test_clients_values_are_split_over_eight_devices(report, run):
  out = report[run]
  assert out["y"]["mesh"] == {"clients": 8}
  assert out["y"]["spec"] == ["clients"] and out["y"]["devices"] == 8
  assert out["y"]["shard_shapes"] == [[2, 3]]  # 16 clients, 2 per device
  for server in ("mean", "max"):
    assert out[server]["replicated"] and out[server]["devices"] == 8
    assert out[server]["shard_shapes"] == [[3]]


def test_a_two_dimensional_mesh_splits_clients_over_its_clients_axis(report):
  out = report["ambient_2d"]
  assert out["y"]["mesh"] == {"clients": 4, "model": 2}
  assert out["y"]["spec"] == ["clients"] and out["y"]["shard_shapes"] == [[4, 3]]
  assert out["mean"]["replicated"]


@pytest.mark.parametrize("run", ["unsharded", "mesh_arg", "mesh_arg_auto", "ambient", "ambient_2d"])
def test_sharded_values_equal_the_unsharded_run_and_numpy(report, run):
  want = _reference()
  for key in ("y", "mean", "max"):
    np.testing.assert_allclose(report[run][key]["value"], want[key], rtol=1e-6)
    np.testing.assert_allclose(report[run][key]["value"], report["unsharded"][key]["value"],
                               rtol=1e-6)
  assert report["unsharded"]["y"]["devices"] == 1


def test_gradients_under_a_mesh_equal_the_unsharded_ones(report):
  for got, want in zip(report["grad_sharded"], report["grad_unsharded"]):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 10
  np.testing.assert_allclose(report["grad_unsharded"][1], 0.5 * np.cos(0.5 * x) / 16, rtol=1e-5)


def test_uneven_split_is_refused(report):
  assert "12 clients cannot be split evenly over the mesh's 'clients' axis of size 8" in (
      report["uneven"])


def test_sharded_fedavg_equals_the_unsharded_run(report):
  from examples import fedavg

  want = jax.tree.leaves(fedavg.computation(*fedavg.example_inputs()))  # here: one device
  got = jax.tree.leaves(report["fedavg"], is_leaf=lambda t: isinstance(t, dict) and "spec" in t)
  assert len(got) == len(want)
  for leaf_got, leaf_want in zip(got, want):
    assert leaf_got["replicated"] and leaf_got["devices"] == 8  # FedAvg's outputs are SERVER
    np.testing.assert_allclose(leaf_got["value"], leaf_want, rtol=1e-5, atol=1e-6)


def test_auto_streams_each_devices_clients_and_combines_once(report):
  assert report["strategy_auto"] == "('stream', 8)"  # CPU devices
  assert report["hlo"] == {"while": True, "all_reduce": True}


@pytest.mark.parametrize("name", ["vmap", "stream3"])
def test_each_strategy_under_the_mesh_equals_numpy(report, name):
  want = _reference()
  out = report["strategy_" + name]
  assert out["y"]["spec"] == ["clients"] and out["y"]["shard_shapes"] == [[2, 3]]
  for key in ("y", "mean", "max"):
    np.testing.assert_allclose(out[key]["value"], want[key], rtol=1e-5, atol=1e-6)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3) / 10
  y = np.sin(0.5 * x)
  # d/dx [sum(mean(y)) + sum(y**2)] = cos(0.5 x) * 0.5 * (1/16 + 2 y)
  np.testing.assert_allclose(report["strategy_grad_" + name][1],
                             0.5 * np.cos(0.5 * x) * (1 / 16 + 2 * y), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(report["strategy_grad_" + name][0], report["strategy_grad_vmap"][0],
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["vmap", "stream"])
def test_an_outer_jit_under_an_explicit_mesh(report, name):
  out, want = report["outer_jit_" + name], _reference()
  assert out["y"]["mesh"] == {"clients": 4, "model": 2} and out["y"]["spec"][0] == "clients"
  assert out["mean"]["replicated"]
  for key in ("y", "mean", "max"):
    np.testing.assert_allclose(out[key]["value"], want[key], rtol=1e-5, atol=1e-6)


def test_a_streamed_transformer_round_compiles_under_set_mesh(report):
  assert report["transformer_under_set_mesh"] < 1e-5  # equal to the vmap round

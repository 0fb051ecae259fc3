"""Model axes (issue 20): on a mesh of (``clients``, ``model``), and (``clients``, ``data``, ``model``),
a round keeps the weights' model sharding, equals plain JAX on one device (values and gradients),
and takes per device at most the unsharded memory over the model axis, and no more than drjax.

The programs run on 8 host devices in a fresh Python (``tests/_model_sharding_worker.py`` through
``tests/eight_devices.py``): an MLP (issue 20's table) and a 4-layer transformer with
Megatron-style weight sharding (about 40 compilations). All slow: even the MLP's fresh 8-device
process takes about 20 s on 2 cores, a third of the quick suite's minute.
"""

from __future__ import annotations

import eight_devices
import pytest

WORKER = "tests/_model_sharding_worker.py"
STRATEGIES = ("vmap", "stream")
MEMORY = ("arguments", "outputs", "temporaries")
SLACK = 1.1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
  return eight_devices.report(tmp_path_factory.mktemp("model_sharding") / "mlp.json", WORKER, "mlp")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
  return eight_devices.report(tmp_path_factory.mktemp("model_sharding") / "transformer.json", WORKER,
                              "transformer", timeout=1200)


def _label(case: dict) -> str:
  return " x ".join(f"{k}={v}" for k, v in case["mesh"].items())


def _check_sharding_and_values(case: dict, atol: float) -> None:
  for name in STRATEGIES:
    run = case[name]
    # The round's new weights and the gradient have the weights' own (model) sharding, as drjax's.
    assert run["specs"] == case["param_specs"], (_label(case), name)
    assert run["grad_specs"] == case["param_specs"], (_label(case), name)
    assert run["specs"] == case["drjax"]["specs"]
    assert run["value_diff"] <= atol and run["grad_diff"] <= atol, (_label(case), name, run)
  assert case["stream"]["strategy"] == "('stream', 8)"  # auto on CPU streams blocks of 8 clients
  assert case["drjax"]["value_diff"] <= atol


def _check_memory(case: dict, unsharded: dict, kinds=MEMORY) -> None:
  """Per device, as the round's own call compiles it (``Computation.lower``): each of ``kinds`` at
  most SLACK x the one-device figure over the model axis, and at most drjax's under the same XLA
  options (``fb.compiler_options()``). Under an outer ``jax.jit`` with XLA's default options: at
  most drjax's there, and within the bound too where no mesh axis splits each client's data (with
  one, XLA's CPU all-reduce merging keeps every client's gradient all-reduce live at once: the
  options exist for that)."""
  model = case["model"]
  for name in STRATEGIES:
    own, outer = case[name]["own_memory"], case[name]["memory"]
    for kind in kinds:
      bound = SLACK * unsharded[name][kind] / model
      assert own[kind] <= bound, (_label(case), name, kind, own[kind], bound)
      assert own[kind] <= case["drjax"]["own_memory"][kind], (_label(case), name, kind)
      assert outer[kind] <= case["drjax"]["memory"][kind], (_label(case), name, kind)
      if "data" not in case["mesh"]:
        assert outer[kind] <= bound, (_label(case), name, kind, "outer jit", outer[kind], bound)
    # The arguments are exactly one shard of each input (the weights over model, the data over
    # clients and data), as the user placed them: nothing was replicated on the way in.
    assert own["arguments"] == outer["arguments"] == case["shard_bytes"], (_label(case), name)


def test_issue_20_table_mlp_on_a_2x4_mesh(mlp):
  case = mlp["cases"][0]
  assert case["mesh"] == {"clients": 2, "model": 4}
  assert case["param_specs"] == ["P(None, 'model')", "P('model',)"]
  _check_sharding_and_values(case, atol=1e-6)
  for name in STRATEGIES:  # called directly, not under jax.jit: the computation places its inputs
    assert case[name]["direct_specs"] == case["param_specs"] and case[name]["direct_diff"] <= 1e-6
  # Outputs and temporaries at most a quarter of the unsharded ones (the MLP's data, a fifth of its
  # arguments, is split over clients only, so arguments are checked shard by shard).
  _check_memory(case, mlp["unsharded"], kinds=("outputs", "temporaries"))


def test_a_data_axis_splits_each_clients_examples(mlp):
  case = mlp["cases"][1]
  assert case["mesh"] == {"clients": 2, "data": 2, "model": 2}
  _check_sharding_and_values(case, atol=1e-6)
  _check_memory(case, mlp["unsharded"], kinds=("outputs", "temporaries"))


def test_a_constraint_inside_client_work_gets_the_clients_axis_in_front(mlp):
  inside = mlp["inside"]
  # The user's P(None, 'model') on one client's hidden layer [32, 512] constrains the 8 clients'
  # [8, 32, 512] as P('clients', None, 'model'), not P(None, None, 'model') (every client everywhere).
  assert '[{"clients"}, {}, {"model"}]' in inside["constraints"]
  assert '[{}, {}, {"model"}]' not in inside["constraints"]
  assert inside["value_diff"] <= 1e-6


def test_an_outer_jit_given_the_compiler_options_compiles_as_the_call_does(mlp):
  # Under a user's jax.jit, the options of fb.compiler_options() give the per-device bytes of the
  # round's own compilation: on CPU, XLA's all-reduce merging off (on the data-axis mesh it would
  # keep every client's gradient all-reduce live at once).
  outer = mlp["outer_jit_with_options"]
  assert outer["options"] == {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
  assert outer["outer"] == outer["own"]
  # Lowered from shapes that carry the shardings (ShapeDtypeStruct(..., sharding=)), as from arrays.
  assert outer["own_from_shapes"] == outer["own"]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("index", range(4), ids=["2x4", "4x2", "1x8", "2x2x2-data"])
def test_megatron_transformer(transformer, index):
  case = transformer["cases"][index]
  assert case["model"] == (4, 2, 8, 2)[index]
  assert sum(s != "P()" for s in case["param_specs"]) == 6 * 4  # six sharded matrices per layer
  _check_sharding_and_values(case, atol=2e-6)
  _check_memory(case, transformer["unsharded"])

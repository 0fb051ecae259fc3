"""Tests of converters/plan.py: plan.json against its published schema, its self-consistency check,
and run_plan's orchestration (one client at a time) against the whole computation compiled by XLA;
and the aggregation rules every interpreter shares, against numpy written another way."""

from __future__ import annotations

import copy
import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.extend import core as jcore

import faxbridge as fb
from examples import EXAMPLES
from faxbridge._src.aggregations import AGGREGATION_KINDS, BUILTIN_KINDS
from faxbridge._src.errors import ExportError, VerificationError
from faxbridge._src.export import split_program
from faxbridge.converters import plan as fplan

SCHEMA = json.loads((pathlib.Path(__file__).parent.parent / "converters" / "plan.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


# One single-stage, one two-stage and one iterative program, run here from their plans with plain jax.
# Every example's plan runs on the jax, IREE and LiteRT runtimes (each through run_plan) against an
# independent reference and the native program in test_examples_reference.py; its plan.json is
# validated below.
QUICK = {"two_stage-computation", "analytics-computation", "fedsgd-process"}


def _programs() -> list:
  params = []
  for case in sorted(QUICK):
    name, kind = case.split("-")
    module = importlib.import_module(f"examples.{name}")
    args = module.example_inputs()
    program, program_args = (module.process, args[1:]) if kind == "process" else \
        (module.computation, args)
    params.append(pytest.param(program, program_args, id=case))
  return params


def _plan_with_pieces(program, args):
  """A plan whose pieces are kept in memory by file name, to run them with plain jax."""
  kept = {}

  def files(comp_name, piece):
    rel = f"pieces/{comp_name}/{piece.name}.jaxpr"
    kept[rel] = piece.jaxpr
    return {"jax": rel}

  return fplan.build_plan(split_program(program, args), files), kept


def _jax_call(kept):
  jitted = {rel: jax.jit(jcore.jaxpr_as_fun(closed)) for rel, closed in kept.items()}

  def call(piece, args):
    return jitted[piece["files"]["jax"]](*args)

  return call


def test_schema_is_valid_json_schema():
  jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_kinds_weights_and_params_are_the_registered_rules():
  """The schema lists exactly faxbridge's aggregation kinds, and requires of each the weight and
  the params its rule declares; other kinds must be package-qualified (defined outside)."""
  builtin = SCHEMA["$defs"]["aggregation"]["properties"]["kind"]["anyOf"][0]
  assert sorted(builtin["enum"]) == sorted(BUILTIN_KINDS)
  aggregation = jsonschema.Draft202012Validator({"$ref": "#/$defs/aggregation", "$defs": SCHEMA["$defs"]})
  result = {"name": "r", "shape": [], "dtype": "int32"}

  def entry(kind, weight=False, **params):
    return {"kind": kind, "value": "v", "result": result, **({"weight": "w"} if weight else {}),
            **({"params": params} if params else {})}

  for kind in BUILTIN_KINDS:
    rule = AGGREGATION_KINDS[kind]
    declared = dict.fromkeys(rule.params, 8)
    aggregation.validate(entry(kind, rule.weighted, **declared))
    assert not aggregation.is_valid(entry(kind, not rule.weighted, **declared)), kind
    assert not aggregation.is_valid(entry(kind, rule.weighted, **declared, extra=1)), kind
    if declared:
      assert not aggregation.is_valid(entry(kind, rule.weighted)), kind
  aggregation.validate(entry("mypkg.clipped_sum", c=0.5))
  aggregation.validate(entry("mypkg.trimmed_mean", True, trim=1, mode="low"))
  assert not aggregation.is_valid(entry("clipped_sum"))  # neither built-in nor qualified


@pytest.mark.parametrize("program,args", _programs())
def test_plan_validates_and_runs_like_the_whole_computation(program, args):
  plan, kept = _plan_with_pieces(program, args)
  VALIDATOR.validate(plan)
  fplan.check_plan(plan)
  assert json.loads(json.dumps(plan)) == plan  # plain JSON, nothing Python-only inside
  if plan["kind"] == "computation":
    named = dict(zip([b["name"] for b in plan["computations"]["computation"]["inputs"]],
                     jax.tree.leaves(args)))
    got = fplan.run_plan(plan, _jax_call(kept), named, rounds=0)
    # The independent answer: the computation as one XLA program (fb.computation's native run).
    want = jax.tree.leaves(program(*args))
    names = [b["name"] for b in plan["computations"]["computation"]["outputs"]]
  else:
    nxt = plan["computations"]["next"]
    named = dict(zip([b["name"] for b in nxt["inputs"] if b["path"][0] != 0],
                     jax.tree.leaves(args)))
    got = fplan.run_plan(plan, _jax_call(kept), named, rounds=2)
    _, history = program.run(2, *args)
    want = jax.tree.leaves(history[-1])
    names = [f"round2/{b['name']}" for b in nxt["outputs"]]
  assert len(want) == len(names)
  for name, w in zip(names, want):
    np.testing.assert_allclose(got[name], np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow  # exports every example (shared with test_examples_reference's round trips)
@pytest.mark.parametrize("name,kind", [(n, k) for n in EXAMPLES for k in ("computation", "process")
                                       if k == "computation" or
                                       hasattr(importlib.import_module(f"examples.{n}"), "process")])
def test_every_examples_exported_plan_validates(example_export, name, kind):
  out, _ = example_export(name, kind, "stablehlo")
  plan = json.loads((out / "plan.json").read_text())
  VALIDATOR.validate(plan)
  fplan.check_plan(plan)
  assert plan["kind"] == ("iterative_process" if kind == "process" else "computation")


def test_plan_records_stages_broadcasts_and_aggregations():
  from examples import analytics, fedavg, two_stage

  args = fedavg.example_inputs()
  plan, kept = _plan_with_pieces(fedavg.computation, args)
  comp = plan["computations"]["computation"]
  (stage,) = comp["stages"]
  # fb.weighted_mean(deltas, data.count) per model leaf and fb.weighted_mean(losses, data.count).
  kinds = [a["kind"] for a in stage["aggregations"]]
  assert kinds == ["weighted_mean"] * (len(args[0]) + 1)
  weights = {a["weight"] for a in stage["aggregations"]}
  values = {a["value"] for a in stage["aggregations"]}
  assert weights <= set(stage["uploads"]) and not weights & values
  assert {a["names"]["weight"] for a in stage["aggregations"]} == {"data.count"}
  assert {s["name"] for s in stage["client_work"]["inputs"]} >= set(stage["broadcasts"])
  # Each weight the client work uploads is the client's count (run for the largest client).
  work = stage["client_work"]
  count = np.asarray(args[1].count)
  largest = int(np.argmax(count))
  leaves = dict(zip([b["name"] for b in comp["inputs"]], jax.tree.leaves(args)))
  outs = _jax_call(kept)(work, [np.asarray(leaves[s["name"]])[largest] if s["name"].startswith(
      "data_") else leaves[s["name"]] for s in work["inputs"]])
  uploaded = dict(zip([s["name"] for s in work["outputs"]], outs))
  assert {float(uploaded[w]) for w in weights} == {float(count.max())}
  # The clients' examples: one client's padded rows, ragged with their count and batch size.
  by_name = {b["name"]: b for b in comp["inputs"]}
  data_x = by_name["data_examples_x"]
  assert data_x["placement"] == "CLIENTS" and data_x["path"] == [1, "examples", "x"]
  padded = list(np.shape(args[1].examples["x"])[1:])  # [576, 64]: one client's
  assert data_x["shape"] == padded
  assert data_x["ragged"] == {"count": "data_count", "max_length": padded[0],
                              "batch_size": fedavg.BATCH_SIZE}
  assert by_name["data_count"] == {"name": "data_count", "shape": [], "dtype": "int32",
                                   "placement": "CLIENTS", "path": [1, "count"]}
  assert plan["clients"] == fedavg.CLIENTS == len(count)

  plan, _ = _plan_with_pieces(analytics.computation, analytics.example_inputs())
  (secure,) = [a for s in plan["computations"]["computation"]["stages"] for a in s["aggregations"]
               if a["kind"] == "secure_sum"]
  assert secure["params"] == {"bitwidth": 16} and secure["result"]["dtype"] == "int32"

  plan, _ = _plan_with_pieces(two_stage.computation, two_stage.example_inputs())
  stages = plan["computations"]["computation"]["stages"]
  assert len(stages) == 2
  # Stage 1 broadcasts what stage 0 aggregated.
  assert set(stages[1]["broadcasts"]) & {s["name"] for s in stages[1]["server_prepare"]["outputs"]}


def test_iterative_plan_links_the_state():
  from examples import fedadam

  plan, _ = _plan_with_pieces(fedadam.process, fedadam.example_inputs()[1:])
  links = plan["state"]
  state_inputs = [b["name"] for b in plan["computations"]["next"]["inputs"] if b["path"][0] == 0]
  assert [link["to"] for link in links["initialize_to_next"]] == state_inputs
  assert [link["to"] for link in links["next_to_next"]] == state_inputs
  # next returns (state, metrics): only the state's leaves feed back.
  metrics = [b["name"] for b in plan["computations"]["next"]["outputs"] if b["path"][0] == 1]
  assert metrics and not set(metrics) & {link["from"] for link in links["next_to_next"]}
  blocks = split_program(fedadam.process, fedadam.example_inputs()[1:]).blocks()
  assert [b["name"] for b in blocks["next"]["inputs"]] == [
      "data_examples_x", "data_examples_y", "data_count"]


def test_mismatched_state_is_an_export_error():
  @fb.computation()
  def init():
    return jnp.zeros(3)

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def step(state, x):
    return jnp.zeros(4) + fb.mean(x)

  process = fb.IterativeProcess(init, step)
  with pytest.raises(ExportError, match="next's returned state"):
    split_program(process, (np.zeros((2,), np.float32),))


def test_check_plan_names_broken_references():
  from examples import two_stage

  plan, _ = _plan_with_pieces(two_stage.computation, two_stage.example_inputs())
  broken = copy.deepcopy(plan)
  stage = broken["computations"]["computation"]["stages"][1]
  stage["broadcasts"] = []  # the client work then reads a value nobody sent
  with pytest.raises(VerificationError, match=r"stage1_client_work: reads 'aggregate0', which nothing"):
    fplan.check_plan(broken)
  broken = copy.deepcopy(plan)
  broken["computations"]["computation"]["server_result"]["inputs"][0]["shape"] = [7]
  with pytest.raises(VerificationError, match="server_result: reads"):
    fplan.check_plan(broken)
  broken = copy.deepcopy(plan)
  broken["computations"]["computation"]["stages"][0]["aggregations"][0]["kind"] = "median"
  with pytest.raises(VerificationError, match="unknown aggregation kind 'median'"):
    fplan.check_plan(broken)
  assert list(VALIDATOR.iter_errors(broken))  # the schema refuses it too


def test_load_plan_refuses_other_versions(tmp_path):
  with pytest.raises(VerificationError, match="is missing"):
    fplan.load_plan(tmp_path)
  from examples import two_stage

  plan, _ = _plan_with_pieces(two_stage.computation, two_stage.example_inputs())
  plan["plan_version"] = 99
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  with pytest.raises(VerificationError, match=r"at \$\.plan_version: 1 was expected"):
    fplan.load_plan(tmp_path)


def _by_loops(kind, values, weights):
  """Each aggregation written as a loop over clients in numpy: the independent answer."""
  acc = values[0].copy()
  for v in values[1:]:
    if kind in ("sum", "secure_sum", "mean"):
      acc = (acc + v).astype(values.dtype)  # wraps in the clients' dtype, as the contract says
    elif kind == "max":
      acc = np.maximum(acc, v)
    elif kind == "min":
      acc = np.minimum(acc, v)
  if kind == "mean":
    return (acc / len(values)).astype(values.dtype)
  if kind == "weighted_mean":
    w = weights.reshape(weights.shape + (1,) * (values.ndim - 1))
    return (sum(wi * vi for wi, vi in zip(w, values)) / weights.sum()).astype(values.dtype)
  return acc


@given(kind=st.sampled_from(sorted(BUILTIN_KINDS)),
       clients=st.integers(1, 6), shape=st.sampled_from([(), (3,), (2, 2)]),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "int32", "int8", "uint8"]))
def test_aggregation_rules_with_numpy_and_jax_match_loops(kind, clients, shape, seed, dtype):
  rng = np.random.default_rng(seed)
  if dtype != "float32" and kind in ("mean", "weighted_mean"):
    dtype = "float32"
  if dtype == "float32":
    values = rng.normal(size=(clients, *shape)).astype(np.float32)
  else:
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=(clients, *shape), endpoint=True).astype(dtype)
  weights = rng.uniform(0.5, 3.0, size=(clients,)).astype(np.float32)
  rule = AGGREGATION_KINDS[kind]
  want = _by_loops(kind, values, weights)
  for xp in (np, jnp):
    got = np.asarray(rule.reduce(xp, xp.asarray(values), xp.asarray(weights), {"bitwidth": 8}))
    assert got.dtype == values.dtype and got.shape == shape, (xp.__name__, got.dtype)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=xp.__name__)
  # The primitive itself (its impl is the rule with jax.numpy) agrees, and so does its lowering.
  jitted = jax.jit(lambda v: rule.primitive.bind(v, **({"bitwidth": 8} if rule.params else {})))
  if not rule.weighted:
    np.testing.assert_allclose(np.asarray(jitted(values)), want, rtol=2e-6, atol=1e-6)

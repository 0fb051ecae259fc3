"""Random valid federated programs (tests/federated_programs.py) against an independent reference.

Each seed is one program: its recipe is drawn, built with the public faxbridge API, and computed
again without faxbridge (numpy, a loop over clients). Every path must equal that reference:
floats within 1e-6 + 1e-5 * |ref| elementwise, integers exactly, dtypes, shapes and the pytree
structure exactly.

* quick suite: native call and ``fb.split(...).run`` for the 16 seeds that cover every generator
  feature first; StableHLO run on jax.export for 3 of them (in one fresh process);
* slow suite: native and split for every other seed, StableHLO on jax.export for every other seed
  (all in one fresh process); TFF, LiteRT, IREE and Flower (local deployments of SuperNodes, the
  client runtimes alternating) on a sample.

``FAXBRIDGE_PROGRAMS=500`` (``make programs-long``) runs 500 seeds instead of 50. A failure names its
seed and prints the program; reproduce with
``.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import federated_programs as f;
print(f.generate(SEED).describe())"`` or ``pytest tests/test_generated_programs.py -k seedSEED``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from federated_programs import (
  Program,
  build,
  example_inputs,
  generate,
  leaf_mismatch,
  mismatches,
  names,
  program,
  reference,
)
from jax_batch import run_on_jax

import faxbridge as fb
from faxbridge._src.verify import run_on_runtime

COUNT = int(os.environ.get("FAXBRIDGE_PROGRAMS", "50"))
SEEDS = list(range(COUNT))
# Of the default 50 seeds, so the quick and sampled sets stay the same under a long run.
BASE = list(range(min(COUNT, 50)))


def _covering(seeds: list[int], count: int) -> list[int]:
  """``count`` seeds chosen greedily for the generator features they add (then the lowest)."""
  features = {s: generate(s).features for s in seeds}
  chosen: list[int] = []
  seen: set[str] = set()
  while len(chosen) < min(count, len(seeds)):
    best = max((s for s in seeds if s not in chosen), key=lambda s: (len(features[s] - seen), -s))
    chosen.append(best)
    seen |= features[best]
  return chosen


QUICK_EXPORT = _covering(BASE, 3)
# Native and split runs of every default seed are the slow suite's; the quick suite keeps the 16
# seeds that cover every generator feature first (the quick suite has a two-minute budget).
QUICK_RUN = set(_covering(BASE, 16))
SAMPLE = _covering(BASE, 8)
TARGET_OF = {"jax": "stablehlo", "iree": "stablehlo", "litert": "tflite", "tff": "tff"}


@functools.cache
def _program(seed: int) -> Program:
  return program(seed)


@contextlib.contextmanager
def _about(p: Program, path: str) -> Iterator[None]:
  """Failures and errors on ``path`` name the seed and show the program."""
  try:
    yield
  except AssertionError as e:
    pytest.fail(f"seed {p.seed}, path {path}:\n{e}\n\n{p.recipe.describe()}", pytrace=False)
  except Exception as e:
    first = str(e).splitlines()[0] if str(e) else ""
    pytest.fail(f"seed {p.seed}, path {path}: {type(e).__name__}: {first}\n\n"
                f"{p.recipe.describe()}\n\n{type(e).__name__}: {e}", pytrace=False)


def _assert_equal_to_reference(p: Program, got) -> None:
  problems = mismatches(p.expected, got)
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in QUICK_RUN else pytest.mark.slow)
                                  for s in SEEDS], ids=lambda s: f"seed{s}")
def test_native(seed):
  p = _program(seed)
  with _about(p, "native"):
    _assert_equal_to_reference(p, p.computation(*p.args))


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in QUICK_RUN else pytest.mark.slow)
                                  for s in SEEDS], ids=lambda s: f"seed{s}")
def test_split(seed):
  p = _program(seed)
  with _about(p, "split"):
    _assert_equal_to_reference(p, fb.split(p.computation, *p.args).run(*p.args))


# -- exports ---------------------------------------------------------------------------------------
def _export(p: Program, target: str, out: Path, **options) -> tuple[Path, dict, dict]:
  """Export (with the target's ``options``); the manifest's inputs and outputs are the args' and
  result's leaves, in order, with unique names. Returns the directory, the manifest block and the
  inputs by name."""
  out = fb.export(p.computation, *p.args, target=target, out_dir=out, **options)
  block = json.loads((out / "manifest.json").read_text())["computation"]
  leaves = jax.tree.leaves(p.args)
  in_names = [s["name"] for s in block["inputs"]]
  assert len(in_names) == len(leaves), f"manifest inputs {in_names} for {len(leaves)} input leaves"
  assert len(set(in_names)) == len(in_names), f"input names collide: {in_names}"
  out_names = [s["name"] for s in block["outputs"]]
  want = jax.tree.leaves(p.expected)
  assert len(out_names) == len(want), f"manifest outputs {out_names} for {len(want)} output leaves"
  assert len(set(out_names)) == len(out_names), f"output names collide: {out_names}"
  places = [p.recipe.vals[s].place for s in names(p.recipe.result)]
  got_places = [str(s["placement"]).upper() for s in block["outputs"]]
  assert got_places == places, f"output placements {got_places}, expected {places}"
  return out, block, dict(zip(in_names, (np.asarray(x) for x in leaves)))


def _check_outputs(p: Program, block: dict, outputs: dict) -> None:
  """Runtime outputs by manifest name, in the order of the result's leaves, against the reference."""
  want = jax.tree_util.tree_flatten_with_path(p.expected)[0]
  problems = []
  for spec, (path, w) in zip(block["outputs"], want):
    if spec["name"] not in outputs:
      problems.append(f"{spec['name']}: missing from the runtime's outputs {sorted(outputs)}")
    elif m := leaf_mismatch(f"{spec['name']} {jax.tree_util.keystr(path)}", w,
                            outputs[spec["name"]]):
      problems.append(m)
  assert not problems, "\n".join(problems)


def _round_trip(p: Program, runtime: str, tmp: Path) -> None:
  with _about(p, f"{TARGET_OF[runtime]} on {runtime}"):
    out, block, inputs = _export(p, TARGET_OF[runtime], tmp / f"seed{p.seed}-{runtime}")
    _check_outputs(p, block, run_on_runtime(out, runtime, inputs).outputs)


@pytest.fixture(scope="module")
def on_jax(tmp_path_factory):
  """``on_jax(seeds)``: those seeds exported to StableHLO and run on runtime jax's child in ONE
  fresh Python (jax_batch.py; each start costs a second), per seed (manifest block, outputs) or the
  exception of its export or its run. The quick seeds are one batch, the others another."""
  made: dict = {}

  def get(seeds: tuple[int, ...]) -> dict:
    if seeds not in made:
      tmp = tmp_path_factory.mktemp("jax")
      results, jobs = {}, {}
      for seed in seeds:
        try:
          out, block, inputs = _export(_program(seed), "stablehlo", tmp / f"seed{seed}")
        except Exception as e:  # reported by that seed's test
          results[seed] = e
          continue
        jobs[seed] = (block, (out, inputs, 0))
      runs = run_on_jax([job for _, job in jobs.values()])
      for (seed, (block, _)), run in zip(jobs.items(), runs):
        results[seed] = run if isinstance(run, Exception) else (block, run)
      made[seeds] = results
    return made[seeds]

  return get


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in QUICK_EXPORT else pytest.mark.slow)
                                  for s in SEEDS], ids=lambda s: f"seed{s}")
def test_stablehlo_on_jax(seed, on_jax):
  p = _program(seed)
  batch = tuple(QUICK_EXPORT) if seed in QUICK_EXPORT else \
      tuple(s for s in SEEDS if s not in QUICK_EXPORT)
  with _about(p, "stablehlo on jax"):
    result = on_jax(batch)[seed]
    if isinstance(result, Exception):
      raise result
    _check_outputs(p, *result)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["litert", "iree"])
@pytest.mark.parametrize("seed", SAMPLE, ids=lambda s: f"seed{s}")
def test_sample_on_runtime(seed, runtime, tmp_path):
  _round_trip(_program(seed), runtime, tmp_path)


@pytest.fixture(scope="module")
def tff_runs(tmp_path_factory) -> dict:
  """The sample exported to TFF and executed in one runner process (each start costs seconds):
  per seed, (manifest block, outputs) or the exception of its export or its run."""
  from faxbridge.converters.runtimes.tff.client import ComputationJob, run_computations

  tmp = tmp_path_factory.mktemp("tff")
  results: dict = {}
  jobs, blocks = [], {}
  for seed in SAMPLE:
    p = _program(seed)
    try:
      out, blocks[seed], inputs = _export(p, "tff", tmp / f"seed{seed}")
    except Exception as e:  # reported by that seed's test
      results[seed] = e
      continue
    jobs.append((seed, ComputationJob(out, inputs)))
  runs = run_computations([job for _, job in jobs], strict=False)
  for (seed, _), run in zip(jobs, runs):
    results[seed] = run if isinstance(run, Exception) else (blocks[seed], run.outputs)
  return results


@pytest.mark.slow
@pytest.mark.parametrize("seed", SAMPLE, ids=lambda s: f"seed{s}")
def test_sample_on_tff(seed, tff_runs):
  p = _program(seed)
  with _about(p, "tff on tff"):
    result = tff_runs[seed]
    if isinstance(result, Exception):
      raise result
    block, outputs = result
    _check_outputs(p, block, outputs)


# The sample on the flower runtime: client runtimes alternate (LiteRT for the first seed, IREE for
# the second, ...), and RUNS_AT_ONCE Flower runs go at a time on the deployment they share (a run
# mostly waits for Flower's 3 s polls: one keeps about half a core busy).
FLOWER_CLIENT_RUNTIMES = ("litert", "iree")
RUNS_AT_ONCE = 4


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory) -> dict:
  """The sample exported to flower and run on the flower runtime, all on ONE local deployment
  (``deployment.reused``: a SuperLink and as many SuperNodes as the largest program has clients,
  each its own process, started once; each run has its own data on the nodes, and those beyond a
  program's clients sit its run out): per seed, (manifest block, outputs) or the exception of its
  export or its run. The exports are made here while the runs of those already made go on."""
  from faxbridge.converters.flower import deployment

  tmp = tmp_path_factory.mktemp("flower")
  results: dict = {}
  clients = max(_program(seed).recipe.clients for seed in SAMPLE)
  with deployment.reused(clients) as shared, \
       concurrent.futures.ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
    futures = {}
    for i, seed in enumerate(SAMPLE):
      runtime = FLOWER_CLIENT_RUNTIMES[i % len(FLOWER_CLIENT_RUNTIMES)]
      try:
        out, block, inputs = _export(_program(seed), "flower", tmp / f"seed{seed}",
                                     client_runtime=runtime)
      except Exception as e:  # reported by that seed's test
        results[seed] = e
        continue
      futures[seed] = (block, pool.submit(run_on_runtime, out, "flower", inputs))
    for seed, (block, future) in futures.items():
      results[seed] = future.exception() or (block, future.result().outputs)
  assert not deployment.leftovers(shared.root), "a process of the shared deployment outlived it"
  return results


@pytest.mark.slow
@pytest.mark.parametrize("seed", SAMPLE, ids=lambda s: f"seed{s}")
def test_sample_on_flower(seed, flower_runs):
  p = _program(seed)
  with _about(p, "flower on flower"):
    result = flower_runs[seed]
    if isinstance(result, Exception):
      raise result
    _check_outputs(p, *result)


# -- programs whose clients hold their own numbers of examples (fb.ragged), on every path -----------
# The ragged family of the generator: unbatched and batched inputs, folds from an input and from a
# value (tests/test_ragged.py checks these seeds cover that). The native padding is poisoned (NaN,
# 1e30); every export runs each client on its own examples only, one artifact for all sizes.
RAGGED_SEEDS = [0, 3, 5, 7]


@functools.cache
def _ragged_program(seed: int) -> Program:
  recipe = generate(seed, ragged=True)
  args = example_inputs(recipe)
  return Program(recipe, build(recipe), args, reference(recipe, *args))


@pytest.mark.parametrize(("seed", "runtime"), [
    pytest.param(seed, runtime, id=f"seed{seed}-{runtime}",  # one quick case, the rest slow
                 marks=() if (seed, runtime) == (RAGGED_SEEDS[0], "jax") else pytest.mark.slow)
    for seed in RAGGED_SEEDS for runtime in ("jax", "iree", "litert", "tff")])
def test_ragged_on_runtime(seed, runtime, tmp_path):
  _round_trip(_ragged_program(seed), runtime, tmp_path)


@pytest.mark.slow
def test_ragged_on_flower(tmp_path):
  """The ragged seeds on one shared local deployment, client runtimes alternating: each node's data
  file holds its own client's examples only."""
  from faxbridge.converters.flower import deployment

  clients = max(_ragged_program(seed).recipe.clients for seed in RAGGED_SEEDS)
  with deployment.reused(clients) as shared:
    for i, seed in enumerate(RAGGED_SEEDS):
      p = _ragged_program(seed)
      with _about(p, "flower on flower"):
        out, block, inputs = _export(p, "flower", tmp_path / f"seed{seed}",
                                     client_runtime=FLOWER_CLIENT_RUNTIMES[i % 2])
        _check_outputs(p, block, run_on_runtime(out, "flower", inputs).outputs)
  assert not deployment.leftovers(shared.root), "a process of the shared deployment outlived it"


# -- the generator itself --------------------------------------------------------------------------
REQUIRED_FEATURES = {
    "two_stages", "map_reads_only_broadcasts", "map_output_aggregated_and_reused",
    "no_clients_input", "clients_output", "colliding_names", "server_pre", "server_post",
    "matvec_CLIENTS", "int_weight", "input_int8", "input_int16", "input_uint8",
    "wrapping_sum_int8", "wrapping_sum_uint8", "wrapping_sum_int16",
    *(f"agg_{k}" for k in ("sum", "mean", "weighted_mean", "secure_sum", "max", "min")),
    *(f"op_{k}" for k in ("relu", "maximum", "minimum", "clip", "leaky", "avg", "mul", "tanh",
                          "matvec", "softmax", "logsumexp", "scan", "cond", "mean_last", "to_float",
                          "iadd", "imax", "imin", "iclip", "cast", "quantize")),
    "agg_sum_small_int", "agg_max_small_int", "agg_min_small_int", "agg_secure_sum_int32",
}


def test_default_seeds_cover_every_feature():
  seen = set().union(*(generate(s).features for s in BASE))
  assert not REQUIRED_FEATURES - seen, f"no program with {sorted(REQUIRED_FEATURES - seen)}"


def _well_formed(recipe) -> None:
  """Every name is defined before it is read, at the placement the statement needs."""
  from federated_programs import CLIENTS, SERVER, Agg, Broadcast, Map, Op

  place = {s: p for t, p in zip(recipe.args, recipe.placements) for s in names(t)}

  def read(tree, where):
    for s in names(tree):
      assert place.get(s) == where, f"{s} read as {where}, defined as {place.get(s)}"

  for st in recipe.body:
    if isinstance(st, Op):
      read(st.args, SERVER)
      place[st.out] = SERVER
    elif isinstance(st, Broadcast):
      read(st.value, SERVER)
      place.update((s, CLIENTS) for s in names(st.out))
    elif isinstance(st, Map):
      read(st.args, CLIENTS)
      local = set(names(st.args))
      for op in st.ops:
        assert set(op.args) <= local, f"{op} reads outside the map's arguments"
        local.add(op.out)
      assert set(names(st.out)) <= local - set(names(st.args))
      place.update((s, CLIENTS) for s in names(st.out))
    elif isinstance(st, Agg):
      read(st.value, CLIENTS)
      if st.weight:
        read(st.weight, CLIENTS)
        assert recipe.vals[st.weight].shape == () and recipe.vals[st.weight].lo > 0
      if st.bitwidth:
        assert all(recipe.vals[s].lo >= 0 and recipe.vals[s].hi * recipe.clients < 2**st.bitwidth
                   for s in names(st.value))
      place.update((s, SERVER) for s in names(st.out))
  assert all(s in place for s in names(recipe.result))


def test_recipes_are_well_formed():
  """Far more seeds than are run: the generator never fails and never reads an undefined value."""
  for seed in range(2000):
    _well_formed(generate(seed))


def test_generation_is_deterministic():
  for seed in (0, 7, 31):
    assert generate(seed).describe() == generate(seed).describe()
    a, b = _program(seed).args, program(seed).args
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_comparison_catches_each_kind_of_difference():
  """The checks above could not pass by accident: an off-tolerance float, a wrong integer, a
  widened dtype, a lost axis and a changed structure are each reported."""
  want = {"f": np.float32([1.0, -2.0]), "i": np.int8([3, 4])}
  assert mismatches(want, dict(want)) == []
  assert mismatches(want, {**want, "f": np.float32([1.0, -2.0 + 1e-4])})
  assert not mismatches(want, {**want, "f": np.float32([1.0, -2.0 + 1e-5])})
  assert mismatches(want, {**want, "i": np.int8([3, 5])})
  assert mismatches(want, {**want, "i": np.int32([3, 4])})
  assert mismatches(want, {**want, "f": np.float32([1.0])})
  assert mismatches(want, (want["f"], want["i"]))


def test_reference_aggregations_on_known_numbers():
  """The reference's aggregation semantics, on numbers worked out by hand."""
  from federated_programs import _ref_aggregate

  i8 = np.int8([[100, -1], [100, 2], [-3, 3]])
  assert _ref_aggregate("sum", i8, None, 3).tolist() == [-59, 4]  # 197 wraps to -59
  assert _ref_aggregate("sum", i8, None, 3).dtype == np.int8
  assert _ref_aggregate("max", i8, None, 3).tolist() == [100, 3]
  assert _ref_aggregate("min", i8, None, 3).tolist() == [-3, -1]
  f = np.float32([[1.0], [2.0], [6.0]])
  assert _ref_aggregate("mean", f, None, 3).tolist() == [3.0]
  w = np.int32([1, 1, 2])
  assert _ref_aggregate("weighted_mean", f, w, 3).tolist() == [3.75]  # (1 + 2 + 12) / 4
  assert _ref_aggregate("secure_sum", np.int32([[5], [6]]), None, 2).tolist() == [11]

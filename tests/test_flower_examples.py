"""Issue 18's acceptance on the flower runtime, slow: every bundled example exported to ``flower``
and verified (``fb.verify(..., runtime="flower")``) on a local deployment of 4 SuperNodes for 3
rounds, equal to the export's native program within the README tolerance: on the LiteRT client
runtime every example, on IREE FedAvg, DP-FedAvg and analytics (whose secure sum is exact).

The runs share ONE deployment (a SuperLink and 4 SuperNodes started once for the module:
``deployment.reused``): each test is a ``flwr run`` of its own, its data a dataset of its own on
every node (node ``k`` holds client ``k``'s slice only), and ``RUNS_AT_ONCE`` runs go at a time:
a Flower round is mostly waiting (a SuperNode asks for messages every 3 s), and runs of several
programs fill each other's waits. The module's fixture runs the selected tests' cases up front;
each test then checks its own.
"""

from __future__ import annotations

import concurrent.futures
import importlib
from pathlib import Path

import numpy as np
import pytest

import faxbridge as fb
from examples import EXAMPLES
from faxbridge._src.export_reader import check_files, read_export_manifest
from faxbridge.converters.flower import deployment, node
from faxbridge.extend import VerificationError

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 4
ROUNDS = 3
RUNS_AT_ONCE = 3  # a run keeps about half a core busy; the exports here take another core
# Each client runtime on these; the others run on LiteRT (the flower target's default).
BOTH_RUNTIMES = ("fedavg", "dp_fedavg", "analytics")
# IREE's first: their exports take a second, so runs start at once while LiteRT's convert with TF.
CASES = [(name, "iree") for name in BOTH_RUNTIMES] + [(name, "litert") for name in EXAMPLES]


def _is_process(name: str) -> bool:
  return hasattr(importlib.import_module(f"examples.{name}"), "process")


def _program(name: str):
  """The example's process (or computation, for those without one) and its arguments for
  ``CLIENTS`` clients: ``next``'s after the state for a process."""
  module = importlib.import_module(f"examples.{name}")
  args = tuple(module.example_inputs(clients=CLIENTS))
  return (module.process, args[1:]) if _is_process(name) else (module.computation, args)


def _selected(session: pytest.Session, test: str) -> list:
  """The ``case`` parameters of this module's ``test`` that the session runs (all of them, or
  those ``-k`` left), so that the fixture runs no more than is asked for."""
  return [item.callspec.params["case"] for item in session.items
          if getattr(item, "originalname", None) == test and item.module.__name__ == __name__]


@pytest.fixture(scope="module")
def flower_reports(request, tmp_path_factory) -> dict:
  """For each selected case, its export and ``fb.verify`` report on the shared deployment, or the
  exception its export or run raised (reported by that case's test). The exports are made here,
  one after another (they convert with TF and trace with JAX), while the runs of those already made
  go on."""
  cases = _selected(request.session, "test_example_on_four_supernodes_equals_native")
  tmp = tmp_path_factory.mktemp("flower-examples")
  results: dict = {}
  with deployment.reused(CLIENTS) as shared, \
       concurrent.futures.ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
    futures = {}
    for name, runtime in cases:
      program, args = _program(name)
      try:
        out = fb.export(program, *args, target="flower", out_dir=tmp / f"{name}-{runtime}",
                        client_runtime=runtime)
      except Exception as e:
        results[name, runtime] = e
        continue
      rounds = ROUNDS if _is_process(name) else 1
      futures[name, runtime] = out, pool.submit(fb.verify, out, *args, runtime="flower",
                                                rounds=rounds)
    for case, (out, future) in futures.items():
      results[case] = future.exception() or (out, future.result())
  assert not deployment.leftovers(shared.root), "a process of the shared deployment outlived it"
  return results


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_example_on_four_supernodes_equals_native(case, flower_reports):
  if isinstance(flower_reports[case], Exception):
    raise flower_reports[case]
  out, result = flower_reports[case]
  assert result.ok, str(result)
  # flwr run read the export and wrote nothing into it: it still matches its manifest.
  check_files(out, read_export_manifest(out))
  name, _ = case
  assert result.rounds == (ROUNDS if _is_process(name) else 0)
  if _is_process(name):  # every round's outputs were compared
    assert {c.name.split("/")[0] for c in result.checks} >= {f"round{r}" for r in range(1, ROUNDS + 1)}
  assert f"{CLIENTS} SuperNodes" in result.info["Flower deployment"]
  if name == "analytics":  # the secure sum's histogram is exact (integers compare equal only)
    histogram = [c for c in result.checks if "histogram" in c.name]
    assert histogram and all(c.max_abs == 0 for c in histogram), histogram


def test_the_cases_cover_every_bundled_example_and_both_runtimes():
  bundled = {p.stem for p in (REPO / "examples").glob("*.py") if not p.stem.startswith("_")}
  assert {name for name, _ in CASES} == set(EXAMPLES) == bundled - {"__init__"}
  for runtime in ("litert", "iree"):
    assert {name for name, rt in CASES if rt == runtime} >= set(BOTH_RUNTIMES)
  assert len(set(CASES)) == len(CASES)


# -- a node's data per run (quick: the node's own code on a real export, no deployment) ------------
@fb.computation(in_placements=(fb.CLIENTS,))
def _total(x):
  return fb.sum(x)


@pytest.fixture(scope="module")
def total_app(tmp_path_factory) -> Path:
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  return fb.export(_total, x, target="flower", out_dir=tmp_path_factory.mktemp("total") / "app",
                   client_runtime="iree")


def test_a_node_reads_the_dataset_the_run_names_from_its_own_data_dir(total_app, tmp_path):
  (tmp_path / "data").mkdir()
  np.savez(tmp_path / "data" / "run1.npz", x=np.float32([1, 2]))
  np.savez(tmp_path / "data" / "run2.npz", x=np.float32([3, 4]))
  config = {"data-dir": str(tmp_path / "data"), "label": "client-0000"}
  for dataset, want in (("run1", [1, 2]), ("run2", [3, 4])):
    run = node.NodeRun(total_app, config, {"dataset": dataset})
    assert run.sits_out() is None
    np.testing.assert_array_equal(run.data("computation")["x"], want)


@pytest.mark.parametrize("dataset", ["../run1", "sub/run1", "/tmp/run1", ".hidden", "run1.npz/.."])
def test_a_node_refuses_a_dataset_that_is_not_a_plain_name(total_app, tmp_path, dataset):
  with pytest.raises(VerificationError, match="not a plain name"):
    node.NodeRun(total_app, {"data-dir": str(tmp_path), "label": "n"}, {"dataset": dataset})


def test_a_node_without_a_data_dir_refuses_a_run_that_names_a_dataset(total_app, tmp_path):
  np.savez(tmp_path / "mine.npz", x=np.float32([1, 2]))
  with pytest.raises(VerificationError, match="names no data-dir"):
    node.NodeRun(total_app, {"data": str(tmp_path / "mine.npz"), "label": "n"}, {"dataset": "run1"})
  # without a dataset in the run config, its data file is what it reads
  run = node.NodeRun(total_app, {"data": str(tmp_path / "mine.npz"), "label": "n"}, {"dataset": ""})
  np.testing.assert_array_equal(run.data("computation")["x"], [1, 2])


def test_a_node_holding_no_data_for_the_run_sits_it_out(total_app, tmp_path):
  run = node.NodeRun(total_app, {"data-dir": str(tmp_path), "label": "client-0003"},
                     {"dataset": "run7"})
  assert run.sits_out() == "its data-dir holds no run7.npz for this run"

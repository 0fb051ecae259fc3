"""interop_fixtures/: re-export is byte-identical, and the runtimes execute every fixture to the
outputs the Python computation gave when it was exported."""

from __future__ import annotations

import filecmp
import importlib
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from run_shared import example_program

from faxbridge._src.export import read_manifest
from faxbridge._src.verify import ATOL, RTOL, check_files
from faxbridge.converters.runtimes.tff import ComputationJob, run_computations

FIXTURES = Path(__file__).resolve().parent.parent / "interop_fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").exists())


def _regenerate_module():
  spec = importlib.util.spec_from_file_location("regenerate", FIXTURES / "regenerate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _meta(name) -> dict:
  return json.loads((FIXTURES / name / "fixture.json").read_text())


def test_every_program_of_the_generator_has_a_fixture():
  assert sorted(_regenerate_module().PROGRAMS) == NAMES
  assert len(NAMES) >= 5


def test_every_bundled_example_has_a_fixture():
  """Each of ``examples.EXAMPLES`` is fixed in at least one fixture (its process where it has one),
  so a new algorithm cannot join the examples without its exported artifacts here."""
  from examples import EXAMPLES

  programs = set(_regenerate_module().PROGRAMS.values())
  fixed = {spec.split(":")[0].removeprefix("examples.") for spec in programs}
  assert set(EXAMPLES) <= fixed, sorted(set(EXAMPLES) - fixed)
  for name in EXAMPLES:
    module = importlib.import_module(f"examples.{name}")
    attr = "process" if hasattr(module, "process") else "computation"
    assert f"examples.{name}:{attr}" in programs, name


@pytest.mark.parametrize("name", NAMES)
def test_fixture_files_match_their_manifests(name):
  for target in _meta(name)["targets"]:
    check_files(FIXTURES / name / target, read_manifest(FIXTURES / name / target))


@pytest.mark.slow  # exports every fixture's program to every target (shared with the round trips)
@pytest.mark.parametrize("name", NAMES)
def test_reexport_is_byte_identical(example_export, name):
  """The exporter today writes every fixture byte for byte. The export compared is the one the
  examples' round trips run (conftest's ``example_export``): the same ``fb.export`` call that
  ``regenerate.export_fixture`` makes, on the same program and arguments (checked here)."""
  regenerate = _regenerate_module()
  spec = regenerate.PROGRAMS[name]
  assert _meta(name)["program"] == spec
  module_name, attr = spec.split(":")
  example = module_name.removeprefix("examples.")
  program, args = regenerate.load(spec)
  shared_program, shared_args = example_program(example, attr)
  assert program is shared_program
  assert jax.tree.structure(args) == jax.tree.structure(shared_args)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(args),
                                                  jax.tree.leaves(shared_args), strict=True))
  for target in _meta(name)["targets"]:
    fresh, _ = example_export(example, attr, target)
    fixture = FIXTURES / name / target
    files = sorted(str(p.relative_to(fixture)) for p in fixture.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(fixture, fresh, files, shallow=False)
    assert (mismatch, errors) == ([], []), f"{name}/{target} differs in {mismatch + errors}"


@pytest.mark.slow
def test_tff_executes_every_fixture_to_the_expected_outputs():
  jobs = []
  for name in NAMES:
    inputs = np.load(FIXTURES / name / "inputs.npz", allow_pickle=False)
    jobs.append(ComputationJob(FIXTURES / name / "tff", {k: inputs[k] for k in inputs.files},
                               rounds=_meta(name)["rounds"]))
  runs = run_computations(jobs)  # one TFF process for all fixtures
  for name, run in zip(NAMES, runs):
    expected = np.load(FIXTURES / name / "expected.npz", allow_pickle=False)
    assert sorted(run.outputs) == sorted(expected.files), name
    for key in expected.files:
      want, got = expected[key], run.outputs[key]
      if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: {key}")
      else:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {key}")

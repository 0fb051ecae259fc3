"""Tests of converters/stablehlo/export.py: the files of each piece, the StableHLO version option,
determinism, and that each artifact computes what the piece's jaxpr computes."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from jax.extend import core as jcore
from jax.extend.mlir.dialects import stablehlo as shlo

import faxbridge as fb
from examples import two_stage
from faxbridge._src.errors import ExportError
from faxbridge._src.export import read_manifest
from faxbridge.converters.stablehlo import export as sx


@pytest.fixture
def two_stage_export(example_export):
  return example_export("two_stage", "computation", "stablehlo")[0]  # shared: read, never written


def test_every_piece_has_its_three_artifacts(two_stage_export):
  manifest = read_manifest(two_stage_export)
  plan = json.loads((two_stage_export / "plan.json").read_text())
  assert manifest["plan"] == "plan.json" and "plan.json" in manifest["files"]
  names = []
  for stage in plan["computations"]["computation"]["stages"]:
    names += [stage["server_prepare"]["name"], stage["client_work"]["name"]]
  names.append("server_result")
  assert names == ["stage0_server_prepare", "stage0_client_work", "stage1_server_prepare",
                   "stage1_client_work", "server_result"]
  for stage in plan["computations"]["computation"]["stages"]:
    for piece in (stage["server_prepare"], stage["client_work"]):
      assert set(piece["files"]) == {"jax", "stablehlo_text", "stablehlo_portable"}
      for rel in piece["files"].values():
        assert rel in manifest["files"], rel  # covered by a sha256
  assert manifest["stablehlo"]["portable_version"] == shlo.get_version_from_compatibility_requirement(
      shlo.StablehloCompatibilityRequirement.WEEK_12)
  assert manifest["computation"]["stages"] == 2


def test_artifacts_compute_the_piece(two_stage_export):
  """The .jax artifact and the StableHLO text's signature agree with the piece's jaxpr."""
  form = fb.split(two_stage.computation, *two_stage.example_inputs())
  plan = json.loads((two_stage_export / "plan.json").read_text())
  piece = form.stages[1].client_work
  entry = plan["computations"]["computation"]["stages"][1]["client_work"]
  rng = np.random.default_rng(0)
  args = [rng.normal(size=s.shape).astype(s.dtype) for s in piece.inputs]
  exported = jax.export.deserialize(bytearray((two_stage_export / entry["files"]["jax"]).read_bytes()))
  got = exported.call(*args)
  want = jcore.jaxpr_as_fun(piece.jaxpr)(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
  text = (two_stage_export / entry["files"]["stablehlo_text"]).read_text()
  assert "func.func public @main(" in text
  # Every input is kept (keep_unused): main takes exactly the plan's inputs.
  header = text[text.index("@main("):text.index("->")]
  assert header.count("%arg") == len(entry["inputs"])
  portable = (two_stage_export / entry["files"]["stablehlo_portable"]).read_bytes()
  assert portable.startswith(b"ML\xefR")  # MLIR bytecode
  assert shlo.deserialize_portable_artifact_str(portable)  # readable by this StableHLO


def test_export_is_deterministic(two_stage_export, tmp_path):
  # One export made by conftest, the other here: neither the caller nor the folder shows.
  args = two_stage.example_inputs()
  a = two_stage_export
  b = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "b")
  files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  root = str(pathlib.Path(fb.__file__).resolve().parent.parent).encode()
  for rel in files_a:
    data = (a / rel).read_bytes()
    assert data == (b / rel).read_bytes(), rel
    # No source locations: nothing names the checkout or the calling test.
    assert root not in data and b"test_stablehlo_export" not in data, rel


def test_version_option():
  week12 = sx.resolve_version(None)
  assert week12 == sx.resolve_version("week_12") == sx.resolve_version("WEEK-12")
  assert sx.resolve_version("none") == shlo.get_current_version()
  assert sx.resolve_version("max") == shlo.get_minimum_version()
  assert sx._as_tuple(sx.resolve_version("week_4")) >= sx._as_tuple(week12)
  assert sx.resolve_version(shlo.get_minimum_version()) == shlo.get_minimum_version()
  for bad in ("9.0.0", "0.0.1", "latest", "1.2"):
    with pytest.raises(ExportError, match="stablehlo-version"):
      sx.resolve_version(bad)


def test_version_option_changes_the_portable_artifact(two_stage_export, tmp_path):
  args = two_stage.example_inputs()
  current = shlo.get_current_version()
  a = two_stage_export  # the default version
  b = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "b",
                stablehlo_version=current)
  assert read_manifest(b)["stablehlo"]["portable_version"] == current
  rel = "pieces/computation/stage0_client_work"
  assert (a / f"{rel}.mlir").read_bytes() == (b / f"{rel}.mlir").read_bytes()
  if sx.resolve_version(None) != current:
    assert (a / f"{rel}.stablehlo.mlirbc").read_bytes() != (b / f"{rel}.stablehlo.mlirbc").read_bytes()


def test_unknown_option_is_refused(tmp_path):
  with pytest.raises(ExportError, match="target 'stablehlo' has no option 'lowering'"):
    fb.export(two_stage.computation, *two_stage.example_inputs(), target="stablehlo",
              out_dir=tmp_path / "x", lowering="tf")
  assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.slow
def test_iterative_process_exports_both_computations(example_export):
  out, _ = example_export("fedavg", "process", "stablehlo")
  manifest = read_manifest(out)
  assert set(manifest) >= {"initialize", "next", "plan"}
  assert (out / "pieces/initialize/server_result.mlir").is_file()
  assert (out / "pieces/next/stage0_client_work.mlir").is_file()
  # The client's local epochs are a while loop in StableHLO.
  assert "stablehlo.while" in (out / "pieces/next/stage0_client_work.mlir").read_text()


@pytest.mark.slow
def test_iree_compiles_the_portable_artifact(two_stage_export):
  """A consumer that only has the portable artifact (VHLO bytecode) gets the same program."""
  import iree.compiler as ic
  import iree.runtime as ireert

  plan = json.loads((two_stage_export / "plan.json").read_text())
  entry = plan["computations"]["computation"]["stages"][1]["client_work"]
  rng = np.random.default_rng(1)
  args = [rng.normal(size=s["shape"]).astype(s["dtype"]) for s in entry["inputs"]]
  results = []
  for key in ("stablehlo_text", "stablehlo_portable"):
    vmfb = ic.compile_str((two_stage_export / entry["files"][key]).read_bytes(),
                          target_backends=["llvm-cpu"], input_type="stablehlo",
                          extra_args=["--iree-llvmcpu-target-cpu=generic"])
    module = ireert.load_vm_flatbuffer(vmfb, backend="llvm-cpu")
    out = module.main(*args)
    results.append([np.asarray(o.to_host()) for o in (out if isinstance(out, tuple) else [out])])
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)

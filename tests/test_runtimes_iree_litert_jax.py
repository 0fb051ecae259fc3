"""The IREE, LiteRT and jax.export (fresh process) runtimes: each orchestrates the rounds from
plan.json and its artifacts; the interop fixtures run on each to the live computation's outputs,
a plan runs another client count than the exported one (against numpy), and the runtimes' errors.
Every bundled example's round trip on each runtime, against an independent reference and the
export's native program, is test_examples_reference.py's."""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil

import numpy as np
import pytest

import faxbridge as fb
from examples import two_stage
from faxbridge._src.errors import VerificationError
from faxbridge._src.export import sha256
from faxbridge._src.verify import compare
from faxbridge.converters.runtimes import iree as iree_rt
from faxbridge.converters.runtimes import jax_runner
from faxbridge.converters.runtimes import litert as litert_rt

TARGET_OF = {"iree": "stablehlo", "jax": "stablehlo", "litert": "tflite"}


def _runtime_module(runtime: str):
  return importlib.import_module("faxbridge.converters.runtimes." +
                                 {"iree": "iree", "litert": "litert", "jax": "jax_export"}[runtime])


FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "interop_fixtures"


def _fixture_cases() -> list:
  names = sorted(p.parent.name for p in FIXTURES.glob("*/fixture.json"))
  return [pytest.param(n, rt, id=f"{n}-{rt}") for n in names for rt in ("iree", "litert", "jax")]


@pytest.mark.slow
@pytest.mark.parametrize("fixture,runtime", _fixture_cases())
def test_interop_fixture_matches_the_live_computation(tmp_path, fixture, runtime):
  """Each interop fixture's program, run on the runtime, equals the outputs the live Python
  computation gave (expected.npz), not just the native artifact. A committed export of the
  fixture for the target is used when there is one."""
  spec = json.loads((FIXTURES / fixture / "fixture.json").read_text())
  target = TARGET_OF[runtime]
  out = FIXTURES / fixture / target
  if not (out / "manifest.json").is_file():
    module_name, attr = spec["program"].split(":")
    module = importlib.import_module(module_name)
    program = getattr(module, attr)
    args = tuple(module.example_inputs())
    args = args[1:] if isinstance(program, fb.IterativeProcess) else args
    out = fb.export(program, *args, target=target, out_dir=tmp_path / target)
  with np.load(FIXTURES / fixture / "inputs.npz") as f:
    inputs = {k: f[k] for k in f.files}
  with np.load(FIXTURES / fixture / "expected.npz") as f:
    expected = {k: f[k] for k in f.files}
  manifest = json.loads((out / "manifest.json").read_text())
  result = _runtime_module(runtime).verify_run(out, manifest, inputs, spec["rounds"] or 0)
  assert set(result.outputs) == set(expected)
  checks = [compare(k, v, result.outputs[k]) for k, v in expected.items()]
  assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def _numpy_two_stage(scale, values):
  """centred_variance written directly in numpy (float64)."""
  v = values.astype(np.float64)
  mean = np.mean(scale * v.mean(axis=1), axis=0)
  return mean, np.mean(np.mean((v - mean) ** 2, axis=1), axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["iree", "litert"])
def test_plan_runs_any_number_of_clients(example_export, runtime):
  """Pieces are per client: the plan runs 3 clients (exported with 8), equal to numpy."""
  out, _ = example_export("two_stage", "computation", TARGET_OF[runtime])
  scale, values = two_stage.example_inputs(clients=3)
  result = _runtime_module(runtime).verify_run(out, {}, {"scale": scale, "values": values}, 0)
  want = _numpy_two_stage(scale, values)
  np.testing.assert_allclose(result.outputs["out_0"], want[0], rtol=1e-5)
  np.testing.assert_allclose(result.outputs["out_1"], want[1], rtol=1e-5)


def test_jax_runtime_in_a_fresh_process(tmp_path):
  args = two_stage.example_inputs()
  out = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "e")
  report = fb.verify(out, *args, runtime="jax")
  assert report.ok, str(report)
  assert report.info["process"].startswith("a fresh Python process")
  assert [c.name for c in report.checks] == ["out_0", "out_1"]


def test_jax_runtime_reports_a_broken_artifact(tmp_path):
  args = two_stage.example_inputs()
  out = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "e")
  manifest = json.loads((out / "manifest.json").read_text())
  rel = "pieces/computation/stage0_client_work.jax"
  (out / rel).write_bytes(b"not a jax.export artifact")
  manifest["files"][rel] = sha256(out / rel)  # re-signed: only running it can tell

  (out / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(VerificationError, match="runtime 'jax' failed"):
    fb.verify(out, *args, runtime="jax")


def test_runtimes_refuse_the_other_targets_exports(tmp_path):
  args = two_stage.example_inputs()
  out = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "e")
  with pytest.raises(VerificationError, match="runtime 'litert' does not read exports of target "
                     "'stablehlo'; the runtimes that read it: iree, jax"):
    fb.verify(out, *args, runtime="litert")
  with pytest.raises(VerificationError, match="export with --target=tflite"):
    litert_rt.verify_run(out, {}, {}, 0)
  shutil.copytree(out, tmp_path / "f")
  plan = json.loads((tmp_path / "f" / "plan.json").read_text())
  for stage in plan["computations"]["computation"]["stages"]:
    stage["client_work"]["files"] = {"tflite": "x.tflite"}
  (tmp_path / "f" / "plan.json").write_text(json.dumps(plan))
  (tmp_path / "f" / "x.tflite").write_bytes(b"")  # the plan names only files inside the export
  with pytest.raises(VerificationError, match="export with --target=stablehlo"):
    iree_rt.verify_run(tmp_path / "f", {}, {}, 0)


def test_plan_is_required(tmp_path):
  args = two_stage.example_inputs()
  out = fb.export(two_stage.computation, *args, target="stablehlo", out_dir=tmp_path / "e")
  (out / "plan.json").unlink()
  with pytest.raises(VerificationError, match=r"plan\.json is missing"):
    litert_rt.verify_run(out, {}, {}, 0)
  with pytest.raises(VerificationError, match=r"plan\.json is missing from"):
    fb.verify(out, *args, runtime="iree")  # the manifest pins it, so verify refuses first


def test_npz_exchange_keeps_names_and_dtypes(tmp_path):
  arrays = {"round1/out_0": np.arange(3, dtype=np.int32), "initialize/w": np.ones((2, 2), np.float32),
            "s": np.float32(2.5)}
  jax_runner.save(tmp_path / "a.npz", arrays)
  back = jax_runner.load(tmp_path / "a.npz")
  assert list(back) == list(arrays)
  for k, v in arrays.items():
    assert back[k].dtype == np.asarray(v).dtype and np.array_equal(back[k], v)


def test_iree_compile_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FAXBRIDGE_IREE_CACHE", str(tmp_path / "cache"))
  text = ("module @m {\n  func.func public @main(%a: tensor<3xf32>) -> tensor<3xf32> {\n"
          "    %0 = stablehlo.add %a, %a : tensor<3xf32>\n    return %0 : tensor<3xf32>\n  }\n}\n")
  first = iree_rt.compile_stablehlo(text)
  assert len(list((tmp_path / "cache").glob("*.vmfb"))) == 1
  assert iree_rt.compile_stablehlo(text) == first
  with pytest.raises(VerificationError, match=r"IREE cannot compile bad\.mlir"):
    iree_rt.compile_stablehlo("module @m { func.func @main( }", "bad.mlir")

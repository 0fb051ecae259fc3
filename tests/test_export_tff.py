"""The TFF target: what an export directory holds, determinism, atomic writes, and round trips."""

from __future__ import annotations

import filecmp
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import federated_language as fl
import jax.numpy as jnp
import numpy as np
import pytest
from federated_language.proto import computation_pb2 as pb

import faxbridge as fb
from faxbridge._src.export import read_manifest

ROOT = Path(__file__).resolve().parent.parent


def _program(name, process=False):
  module = importlib.import_module(f"examples.{name}")
  args = tuple(module.example_inputs())
  if process:
    return module.process, args[1:]
  return module.computation, args


def _walk(msg):
  """Every Computation message nested in ``msg`` (depth first), ``msg`` included."""
  if isinstance(msg, pb.Computation):
    yield msg
  for field, value in msg.ListFields():
    if field.message_type is None:
      continue
    for item in value if field.is_repeated else [value]:
      yield from _walk(item)


def _intrinsics(comp: pb.Computation) -> set[str]:
  return {c.intrinsic.uri for c in _walk(comp) if c.WhichOneof("computation") == "intrinsic"}


def _local_kinds(comp: pb.Computation) -> set[str]:
  return {c.WhichOneof("computation") for c in _walk(comp)} & {"tensorflow", "xla"}


def test_export_writes_proto_manifest_and_rendering(example_export):
  from examples import analytics

  out, _ = example_export("analytics", "computation", "tff")  # shared: read, never written
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert files == ["computation.pb", "computation.txt", "manifest.json", "native/computation.jax"]
  manifest = read_manifest(out)
  assert manifest["format_version"] == 1 and manifest["target"] == "tff"
  assert set(manifest["versions"]) == {"faxbridge", "jax", "federated_language"}
  assert set(manifest["files"]) == {"computation.pb", "computation.txt", "native/computation.jax"}
  block = manifest["computation"]
  # values: each client's own ink (an fb.Ragged): its examples have no fixed length in TFF's type
  # (one computation serves clients of every size), the manifest keeps the padded length of the
  # example inputs, the batch size and the count input.
  assert block["type_signature"] == (
      "(<levels=float32[3]@SERVER,values={<examples=float32[?],count=int32>}@CLIENTS> -> "
      "<histogram=int32[20],max=float32,mean=float32,min=float32,quantiles=float32[3]>@SERVER)")
  levels, values = analytics.example_inputs()
  padded = np.shape(values.examples)[1]
  assert [(i["name"], i["placement"], i["shape"]) for i in block["inputs"]] == [
      ("levels", "SERVER", [len(levels)]), ("values_examples", "CLIENTS", [padded]),
      ("values_count", "CLIENTS", [])]
  assert block["inputs"][1]["ragged"] == {"count": "values_count", "max_length": padded,
                                          "batch_size": analytics.BATCH_SIZE}
  assert {o["name"] for o in block["outputs"]} == {
      "out_histogram", "out_max", "out_mean", "out_min", "out_quantiles"}
  # The proto is a federated_language Computation whose type matches the manifest's.
  proto = pb.Computation.FromString((out / "computation.pb").read_bytes())
  loaded = fl.framework.ConcreteComputation.from_proto(proto)
  assert str(loaded.type_signature) == block["type_signature"]
  assert {"federated_map", "federated_weighted_mean", "federated_max",
          "federated_min", "federated_secure_sum_bitwidth", "federated_apply",
          "federated_zip_at_clients"} <= _intrinsics(proto)
  assert _local_kinds(proto) == {"tensorflow"}
  assert "federated_secure_sum_bitwidth" in (out / "computation.txt").read_text()


def test_weighted_mean_sum_and_local_xla(tmp_path):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
  def stats(scale, x, w):
    scaled = fb.map(lambda s, v: s * v, fb.broadcast(scale), x)
    return fb.weighted_mean(scaled, w), fb.sum(scaled)

  args = (np.float32(2), np.ones((4, 3), np.float32), np.arange(1, 5, dtype=np.float32))
  out = fb.export(stats, *args, target="tff", out_dir=tmp_path / "xla", local="xla")
  proto = pb.Computation.FromString((out / "computation.pb").read_bytes())
  assert _local_kinds(proto) == {"xla"}
  assert {"federated_weighted_mean", "federated_sum"} <= _intrinsics(proto)
  assert read_manifest(out)["local"] == "xla"


def test_export_is_deterministic(example_export, tmp_path):
  process, args = _program("fedavg", process=True)
  a, _ = example_export("fedavg", "process", "tff")  # made by conftest, elsewhere
  b = fb.export(process, *args, target="tff", out_dir=tmp_path / "b")
  names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
  assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
  _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
  assert mismatch == [] and errors == []


def test_existing_directory_is_refused_unless_forced(tmp_path):
  comp, args = _program("two_stage")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(fb.ExportError, match="exists"):
    fb.export(comp, *args, target="tff", out_dir=out)
  assert (out / "keep.txt").read_text() == "mine"
  # force replaces only an earlier export (or an empty directory): a user's folder is kept.
  with pytest.raises(fb.ExportError, match="is not a faxbridge export"):
    fb.export(comp, *args, target="tff", out_dir=out, force=True)
  assert (out / "keep.txt").read_text() == "mine"
  (out / "keep.txt").unlink()
  fb.export(comp, *args, target="tff", out_dir=out, force=True)
  (out / "stale.txt").write_text("left in an export")
  fb.export(comp, *args, target="tff", out_dir=out, force=True)
  assert not (out / "stale.txt").exists() and (out / "computation.pb").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_failed_export_leaves_nothing_behind(tmp_path):
  @fb.computation(in_placements=(fb.CLIENTS,))
  def uses_fft(x):
    return fb.sum(fb.map(lambda v: jnp.real(jnp.fft.fft(v)), x))

  with pytest.raises(fb.FaxbridgeError, match="fft"):
    fb.export(uses_fft, np.ones((2, 4), np.float32), target="tff", out_dir=tmp_path / "fft")
  assert list(tmp_path.iterdir()) == []


def test_iterative_process_exports_initialize_and_next(example_export):
  out, _ = example_export("fedadam", "process", "tff")
  manifest = read_manifest(out)
  assert manifest["kind"] == "iterative_process"
  init = fl.framework.ConcreteComputation.from_proto(
      pb.Computation.FromString((out / "initialize.pb").read_bytes()))
  nxt = fl.framework.ConcreteComputation.from_proto(
      pb.Computation.FromString((out / "next.pb").read_bytes()))
  state = init.type_signature.result
  assert init.type_signature.parameter is None
  assert isinstance(state, fl.FederatedType) and state.placement is fl.SERVER
  assert nxt.type_signature.parameter[0].is_equivalent_to(state)
  assert nxt.type_signature.result[0].is_equivalent_to(state)
  # next's inputs in the manifest are the client data only: the state is fed back.
  assert all(i["path"][0] == 1 for i in manifest["next"]["inputs"])


def test_next_must_return_state_and_metrics(tmp_path):
  @fb.computation()
  def init():
    return jnp.zeros(3)

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def state_only(state, x):
    return state + fb.mean(x)

  with pytest.raises(fb.ExportError, match=r"return \(new_state, metrics\)"):
    fb.export(fb.IterativeProcess(init, state_only), np.ones((2, 3), np.float32),
              target="tff", out_dir=tmp_path / "bad")
  assert list(tmp_path.iterdir()) == []


def test_tampered_artifact_is_reported_and_nothing_runs(example_export, tmp_path, monkeypatch):
  shared, args = example_export("two_stage", "computation", "tff")
  out = shutil.copytree(shared, tmp_path / "t")  # a copy to tamper with
  blob = bytearray((out / "computation.pb").read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  (out / "computation.pb").write_bytes(bytes(blob))
  # Were anything run, the missing runtime would be the error instead.
  monkeypatch.setenv("FAXBRIDGE_TFF_PYTHON", str(tmp_path / "no-such-python"))
  with pytest.raises(fb.VerificationError, match=r"computation.pb: sha256 mismatch.*") as info:
    fb.verify(out, *args, runtime="tff")
  assert "nothing was run" in str(info.value)


def test_missing_tff_environment_names_the_command(example_export, tmp_path, monkeypatch):
  out, args = example_export("two_stage", "computation", "tff")
  monkeypatch.setenv("FAXBRIDGE_TFF_PYTHON", str(tmp_path / "no-such-python"))
  with pytest.raises(fb.VerificationError, match=r"make \.venv-tff/\.ready"):
    fb.verify(out, *args, runtime="tff")


def test_verify_checks_input_names_and_dtypes(example_export):
  out, args = example_export("two_stage", "computation", "tff")
  with pytest.raises(fb.VerificationError, match="dtype"):
    fb.verify(out, np.float64(2.0), args[1], runtime="tff")
  with pytest.raises(fb.VerificationError, match="lack"):
    fb.verify(out, runtime="tff", inputs={"scale": args[0]})


# -- round trips on TFF 0.87 ------------------------------------------------------------------
# Every example's computation and process on TFF (contexts, deployment forms, every round) is
# test_examples_reference.py's test_every_example_on_runtime, against an independent reference
# and the native program.
@pytest.mark.slow
def test_cli_export_and_verify(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out, inputs = tmp_path / "two_stage", tmp_path / "inputs.npz"
  cmd = [sys.executable, "-m", "faxbridge", "export", "examples.two_stage:computation",
         "--target=tff", "-o", str(out), "--save-inputs", str(inputs)]
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and "exists" in again.stderr
  verify = subprocess.run(
      [sys.executable, "-m", "faxbridge", "verify", str(out), "--runtime=tff", "--inputs",
       str(inputs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert verify.returncode == 0, verify.stdout + verify.stderr
  assert "OK" in verify.stdout and "out[0]" in verify.stdout  # outputs by the user's paths
  assert json.loads((out / "manifest.json").read_text())["name"] == "centred_variance"
  shutil.rmtree(out)

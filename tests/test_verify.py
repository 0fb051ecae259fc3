"""fb.verify's contract at the function level: what `compare` fails (tolerance, dtype, shape,
missing or unexpected outputs), the report's MISMATCH text, inputs refused against the manifest
before any runtime starts, manifests that are not there or not JSON, and float64 refused at export
while jax_enable_x64 is off."""

from __future__ import annotations

import importlib
import json

import cli_programs as progs  # tests/ is on sys.path under pytest
import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src import registry
from faxbridge._src.errors import ExportError, VerificationError
from faxbridge._src.registry import Runtime, RuntimeResult

fv = importlib.import_module("faxbridge._src.verify")  # the module: fb.verify is the function


# --- compare: every way an output can be wrong fails, and only those ----------------------------


def test_compare_within_tolerance_passes_and_beyond_fails():
  native = np.array([1.0, -2.0, 1e3], np.float32)
  ok = fv.compare("y", native, native * (1 + 5e-6))
  assert ok.ok and ok.problem == ""
  off = fv.compare("y", native, native + np.array([0, 0, 0.1], np.float32))
  assert not off.ok and off.problem == ""
  assert off.max_abs == pytest.approx(0.1, rel=1e-3)
  assert not fv.compare("y", np.float32(0), np.float32(2e-6)).ok  # beyond atol at zero


@pytest.mark.parametrize("native,other", [
    (np.int32(3), np.float32(3.0)),       # an int expected, a float given (equal value)
    (np.float32(3.0), np.int32(3)),       # and vice versa
    (np.array([True]), np.array([1], np.int32)),
    (np.float32(1.5), np.float64(1.5)),   # a runtime that widened is not running the export
    (np.int32(7), np.int64(7)),
], ids=["int-vs-float", "float-vs-int", "bool-vs-int", "f32-vs-f64", "i32-vs-i64"])
def test_compare_fails_on_dtype_mismatch_even_when_values_are_equal(native, other):
  check = fv.compare("y", native, other)
  assert not check.ok
  assert check.problem == f"dtype {np.asarray(other).dtype}, native {np.asarray(native).dtype}"


def test_the_margin_against_the_bound_is_what_decides_pass_and_fail():
  """A relative error above rtol passes where atol covers it: the margin (|err| over atol + rtol *
  |native|, computed here by hand) says so, and is above 1 exactly for the outputs that fail."""
  native = np.array([0.01, 1.0, -4.0], np.float32)
  close = native + np.array([5e-7, 0, 0], np.float32)  # rel 5e-5 > rtol, within 1e-6 + 1e-7
  far = native + np.array([0, 0, -8e-5], np.float32)    # beyond 1e-6 + 4e-5
  for other, passes in [(close, True), (far, False)]:
    check = fv.compare("y", native, other)
    diff = np.abs(other.astype(np.float64) - native.astype(np.float64))
    want = float(np.max(diff / (1e-6 + 1e-5 * np.abs(native.astype(np.float64)))))
    assert check.ok is passes and check.max_ratio == pytest.approx(want, rel=1e-9)
    assert (check.max_ratio <= 1) is passes
  assert fv.compare("y", native, close).max_rel > fv.RTOL  # the row that used to read as a contradiction
  assert fv.compare("n", np.int32(3), np.int32(3)).max_ratio == 0  # integers: no slack at all
  assert fv.compare("n", np.int32(3), np.int32(4)).max_ratio == float("inf")


def test_compare_fails_on_shape_mismatch():
  check = fv.compare("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
  assert not check.ok and check.problem == "shape (3, 2), native (2, 3)"
  assert not fv.compare("y", np.zeros((1,), np.float32), np.float32(0)).ok  # no broadcasting


def test_compare_integers_exactly_including_beyond_int64():
  assert fv.compare("n", np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32)).ok
  check = fv.compare("n", np.arange(4, dtype=np.int32), np.array([0, 1, 2, 4], np.int32))
  assert not check.ok and check.max_abs == 1
  big = np.array([2**64 - 1], np.uint64)
  assert fv.compare("n", big, big).ok  # int64 casting wrapped this around before
  assert not fv.compare("n", big, big - np.uint64(1)).ok


def test_compare_nan_and_infinity():
  nan = np.array([np.nan, 1.0], np.float32)
  assert fv.compare("y", nan, nan.copy()).ok  # the runtime computed the native NaN
  assert not fv.compare("y", nan, np.array([0.0, 1.0], np.float32)).ok
  assert not fv.compare("y", np.array([1.0], np.float32), np.array([np.nan], np.float32)).ok
  inf = np.array([np.inf], np.float32)
  assert fv.compare("y", inf, inf.copy()).ok
  assert not fv.compare("y", inf, np.array([1e30], np.float32)).ok  # rtol * inf is no slack
  assert not fv.compare("y", inf, -inf).ok


def test_compare_all_fails_missing_and_unexpected_outputs():
  expected = {"a": np.float32(1), "b": np.float32(2)}
  checks = {c.name: c for c in fv.compare_all(expected, {"a": np.float32(1), "c": np.float32(2)})}
  assert checks["a"].ok
  assert not checks["b"].ok and checks["b"].problem.startswith("missing")
  assert not checks["c"].ok and checks["c"].problem.startswith("unexpected")


# --- verify end to end with a stand-in runtime: the report and the refusals ----------------------


def _stablehlo_export(tmp_path_factory, program, args: tuple, name: str):
  return fb.export(program, *args, target="stablehlo",
                   out_dir=tmp_path_factory.mktemp("verify") / name), args


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
  """scaled_mean exported to stablehlo: its directory and example inputs."""
  return _stablehlo_export(tmp_path_factory, progs.scaled_mean, progs.example_inputs(), "scaled")


@pytest.fixture(scope="module")
def centred(tmp_path_factory):
  """centred (outputs a dict: out['mean'], out['spread']) exported to stablehlo, and its inputs."""
  return _stablehlo_export(tmp_path_factory, progs.centred, progs.centred_inputs(), "centred")


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
  args = progs.count_inputs()
  out = fb.export(progs.count_above, *args, target="stablehlo",
                  out_dir=tmp_path_factory.mktemp("verify") / "count")
  return out, args


_STAND_IN: dict = {}  # what the registered stand-in runtime runs, set per test


@pytest.fixture(autouse=True)
def _registry_as_shipped():
  """Other tests in this process see the registry as shipped ("known: iree, jax, litert, tff")."""
  yield
  registry.unregister_runtime("stand-in")


def stand_in_run(export_dir, manifest, inputs, rounds):
  return _STAND_IN["run"](export_dir, manifest, inputs, rounds)


def _runtime_returning(monkeypatch, change):
  """Runtime stand-in, registered as runtime ``stand-in`` as any plug-in is: the native program's
  own outputs, passed through ``change``; it records every call (so a test sees whether anything
  ran)."""
  registry.register_runtime(Runtime("stand-in", runner=f"{__name__}:stand_in_run",
                                    reads=("stablehlo", "tff", "tflite"),
                                    summary="the native outputs passed through a test's change"))
  calls = []

  def run(export_dir, manifest, inputs, rounds):
    calls.append(inputs)
    if change is None:  # a runtime with no native counterpart (another number of clients)
      return RuntimeResult(outputs={})
    return RuntimeResult(outputs=change(fv.native_outputs(export_dir, manifest, inputs, rounds)))

  monkeypatch.setitem(_STAND_IN, "run", run)
  return calls


def test_verify_passes_the_native_outputs_themselves(scaled, monkeypatch):
  out, args = scaled
  calls = _runtime_returning(monkeypatch, lambda outs: outs)
  report = fb.verify(out, *args, runtime="stand-in")
  assert report.ok and len(calls) == 1, str(report)
  assert str(report).splitlines()[-1].startswith("OK: 1 output on stand-in equals native")


def test_report_names_an_output_off_by_more_than_the_tolerance(scaled, monkeypatch):
  out, args = scaled
  _runtime_returning(monkeypatch, lambda outs: {k: v + np.float32(1e-3) for k, v in outs.items()})
  report = fb.verify(out, *args, runtime="stand-in")
  assert not report.ok
  text = str(report)
  assert text.splitlines()[-1] == "MISMATCH: 1 of 1 output on stand-in differs from native: out"
  assert "FAIL (exceeds tolerance)" in text
  with pytest.raises(VerificationError, match="verification failed"):
    report.raise_if_failed()


def test_report_fails_a_missing_output_as_missing(scaled, monkeypatch):
  out, args = scaled
  _runtime_returning(monkeypatch, lambda outs: {})
  report = fb.verify(out, *args, runtime="stand-in")
  assert not report.ok
  assert [c.problem.split(":")[0] for c in report.checks] == ["missing"]
  assert "MISMATCH" in str(report) and "FAIL (missing: " in str(report)


def test_report_fails_a_float_where_the_export_gives_an_int(counting, monkeypatch):
  out, args = counting
  _runtime_returning(monkeypatch, lambda outs: {k: v.astype(np.float32) for k, v in outs.items()})
  report = fb.verify(out, *args, runtime="stand-in")
  assert not report.ok
  assert "FAIL (dtype float32, native int32)" in str(report)


def _rows(text: str) -> dict[str, list[str]]:
  """The table of a printed report: each row's cells by output (columns two or more spaces apart)."""
  import re

  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("output "))
  rows = {}
  for line in lines[start + 2:]:
    if not line:
      return rows
    cells = re.split(r"  +", line)
    rows[cells[0]] = cells[1:]
  return rows


def test_every_row_shows_its_margin_and_the_tolerance_used(centred, monkeypatch):
  """Outputs by the user's names; a row passes exactly when its err / bound is at most 1; the
  tolerance printed is the one verify was given; the verdict counts what it compared."""
  out, args = centred
  # mean off by 3e-5 * (1 + |mean|): beyond 1e-6 + 1e-5 * |mean|, within 1e-4 + 1e-4 * |mean|.
  _runtime_returning(monkeypatch, lambda outs: {
      k: v + np.float32(3e-5) * (1 + np.abs(v)) if k == "out_mean" else v for k, v in outs.items()})
  strict = fb.verify(out, *args, runtime="stand-in")
  loose = fb.verify(out, *args, runtime="stand-in", rtol=1e-4, atol=1e-4)
  for report, mean_ok, bound in [(strict, False, "1e-06 + 1e-05"), (loose, True, "0.0001 + 0.0001")]:
    text = str(report)
    rows = _rows(text)
    assert sorted(rows) == ["out['mean']", "out['spread']"], text  # not out_mean, out_spread
    for _, _, ratio, result in rows.values():
      assert (float(ratio) <= 1) is result.startswith("pass"), text
    assert rows["out['mean']"][3].startswith("pass" if mean_ok else "FAIL"), text
    assert f"within {bound} * |native|" in text, text
  assert str(strict).splitlines()[-1] == ("MISMATCH: 1 of 2 outputs on stand-in differs from "
                                          "native: out['mean']")
  assert str(loose).splitlines()[-1].startswith("OK: all 2 outputs on stand-in equal native; "
                                                "largest err / bound ")


def test_print_report_is_what_the_command_line_prints(scaled, tmp_path, monkeypatch, capsys):
  """One renderer: ``faxbridge verify``'s stdout is ``print(report)`` with the time added."""
  from faxbridge._src import cli

  out, args = scaled
  inputs = tmp_path / "inputs.npz"
  np.savez(inputs, scale=args[0], values=args[1])
  report = fb.verify(out, *args, runtime="iree")
  assert cli.main(["verify", str(out), "--runtime", "iree", "--inputs", str(inputs)]) == 0
  printed = capsys.readouterr().out.rstrip("\n")
  text, last = printed.rsplit("; ", 1)
  assert text == str(report) and last.endswith(" s in all"), printed


def test_python_scalars_are_typed_as_the_export_typed_them(scaled, tmp_path, monkeypatch):
  _, (_, values) = scaled
  out = fb.export(progs.scaled_mean, 2.0, values, target="stablehlo", out_dir=tmp_path / "weak")
  _runtime_returning(monkeypatch, lambda outs: outs)
  assert fb.verify(out, 2.0, values, runtime="stand-in").ok
  with pytest.raises(VerificationError, match="'scale' has dtype float64"):
    fb.verify(out, np.float64(2.0), values, runtime="stand-in")  # a numpy scalar has its dtype


def _bad_inputs(scaled, counting):
  (_, (scale, values)), (_, (counts, thresholds)) = scaled, counting
  return {
      "unknown": ("scaled", {"scale": scale, "values": values, "weights": values},
                  r"unknown input\(s\) \['weights'\]"),
      "missing": ("scaled", {"scale": scale}, r"missing input\(s\) \['values'\]"),
      "dtype": ("scaled", {"scale": scale, "values": values.astype(np.float64)},
                r"input 'values' has dtype float64, the export takes float32"),
      "per-client-shape": ("scaled", {"scale": scale, "values": values[:, :3]},
                           r"input 'values' \(CLIENTS\) has shape \(3, 3, 2\).*\(4, 2\) per client"),
      "no-clients-axis": ("scaled", {"scale": scale, "values": values[0]},
                          r"input 'values' \(CLIENTS\) has shape \(4, 2\)"),
      "server-shape": ("scaled", {"scale": np.ones(2, np.float32), "values": values},
                       r"input 'scale' \(SERVER\) has shape \(2,\), the export takes \(\)"),
      "clients-disagree": ("counting", {"values": counts, "thresholds": thresholds[:2]},
                           r"disagree on the number of clients: 'values' has 3, 'thresholds' has 2"),
  }


@pytest.mark.parametrize("case", ["unknown", "missing", "dtype", "per-client-shape",
                                  "no-clients-axis", "server-shape", "clients-disagree"])
def test_inputs_are_refused_before_any_runtime_starts(scaled, counting, monkeypatch, case):
  which, inputs, message = _bad_inputs(scaled, counting)[case]
  out = (scaled if which == "scaled" else counting)[0]
  calls = _runtime_returning(monkeypatch, lambda outs: outs)
  with pytest.raises(VerificationError, match=message):
    fb.verify(out, runtime="stand-in", inputs=inputs)
  with pytest.raises(VerificationError, match=message):
    fv.run_on_runtime(out, "stand-in", inputs)
  assert calls == []


def test_verify_refuses_a_client_count_the_native_program_was_not_made_for(scaled, monkeypatch):
  out, (scale, values) = scaled
  calls = _runtime_returning(monkeypatch, None)
  more = np.concatenate([values, values])
  with pytest.raises(VerificationError, match=r"'values'.*made for \(3, 4, 2\) \(3 clients\)"):
    fb.verify(out, scale, more, runtime="stand-in")
  assert calls == []
  # The runtime alone runs any number of clients (the plan is per client).
  assert fv.run_on_runtime(out, "stand-in", {"scale": scale, "values": more}) is not None
  assert len(calls) == 1


def test_leaf_count_mismatch_is_refused(scaled, monkeypatch):
  out, (scale, _) = scaled
  calls = _runtime_returning(monkeypatch, lambda outs: outs)
  with pytest.raises(VerificationError, match=r"got 1 input leaves, the export takes 2"):
    fb.verify(out, scale, runtime="stand-in")
  assert calls == []


def test_manifest_problems_are_one_line_verification_errors(scaled, tmp_path):
  with pytest.raises(VerificationError, match="no such export directory"):
    fb.verify(tmp_path / "nowhere", runtime="jax")
  (tmp_path / "empty").mkdir()
  with pytest.raises(VerificationError, match=r"has no manifest\.json"):
    fb.verify(tmp_path / "empty", runtime="jax")
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "manifest.json").write_text("{not json")
  with pytest.raises(VerificationError, match="is not JSON") as err:
    fb.verify(tmp_path / "bad", runtime="jax")
  assert "\n" not in str(err.value)
  (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"files": {}}))
  with pytest.raises(VerificationError, match=r"is not a valid manifest: at \$: 'format_version' is "
                     "a required property"):
    fb.verify(tmp_path / "bad", runtime="jax")


# --- float64 at export ---------------------------------------------------------------------------


def test_float64_is_refused_at_export_without_x64(tmp_path):
  import jax

  assert not jax.config.jax_enable_x64
  scale, values = progs.example_inputs()
  with pytest.raises(ExportError) as err:
    fb.export(progs.scaled_mean, scale, values.astype(np.float64), target="stablehlo",
              out_dir=tmp_path / "f64")
  message = str(err.value)
  assert "args[1]" in message and "float64" in message
  assert "cast it to float32" in message and "jax_enable_x64" in message
  assert not (tmp_path / "f64").exists()
  with pytest.raises(ExportError, match=r"leaf args\[0\]\['w'\] .*dtype int64"):
    fb.export(fb.computation(lambda d: fb.sum(d["w"]), in_placements=(fb.CLIENTS,)),
              {"w": np.arange(6).reshape(3, 2)}, target="stablehlo", out_dir=tmp_path / "i64")

"""An export is untrusted input: every reader runs only files inside it and refuses a damaged or
hostile export with one VerificationError (exit code 2 on the command line), before anything runs.

The first tests are the edits that once got through (a piece outside the export ran, malformed JSON
gave tracebacks); the fuzz then applies random damage (export_tampering) to a real export and
watches, with an audit hook, that no file outside it is ever opened.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cli_programs as progs
import export_tampering as tampering
import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src.export import read_manifest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PIECE = "pieces/computation/server_result.mlir"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
  """scaled_mean exported to stablehlo: the export every test damages a copy of."""
  return fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo",
                   out_dir=tmp_path_factory.mktemp("untrusted") / "scaled")


@pytest.fixture()
def copy(export, tmp_path) -> Path:
  return tampering.copy_export(export, tmp_path / "export")


def _edit_json(path: Path, change) -> None:
  doc = json.loads(path.read_text())
  path.write_text(json.dumps(change(doc) or doc))


def _plan_piece(plan: dict) -> dict:
  return plan["computations"]["computation"]["server_result"]


def _point_piece_at(copy: Path, target: str) -> None:
  def change(plan):
    _plan_piece(plan)["files"]["stablehlo_text"] = target
  _edit_json(copy / "plan.json", change)
  tampering.rehash(copy)


def _outside_piece(tmp_path: Path) -> Path:
  """A copy of the real piece outside the export: it would run and verify, were it read."""
  evil = tmp_path / "evil"
  evil.mkdir()
  return evil


# One function per row of the table: each left the export as a hostile editor would.
def row_plan_points_outside(copy: Path, tmp_path: Path) -> None:
  shutil.copy(copy / PIECE, _outside_piece(tmp_path) / "server_result.mlir")
  _point_piece_at(copy, "../evil/server_result.mlir")


def row_absolute_path(copy: Path, tmp_path: Path) -> None:
  shutil.copy(copy / PIECE, _outside_piece(tmp_path) / "server_result.mlir")
  _point_piece_at(copy, str(tmp_path / "evil" / "server_result.mlir"))


def row_piece_is_a_link(copy: Path, tmp_path: Path) -> None:
  outside = _outside_piece(tmp_path) / "server_result.mlir"
  shutil.copy(copy / PIECE, outside)
  (copy / PIECE).unlink()
  (copy / PIECE).symlink_to(outside)  # same bytes: the sha256 in the manifest still matches


def row_files_is_a_list(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "manifest.json", lambda m: {**m, "files": sorted(m["files"])})


def row_file_entry_is_a_number(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "manifest.json", lambda m: m["files"].update({"plan.json": 12345}))


def row_plan_has_no_computations(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "plan.json", lambda p: p.pop("computations") and None)
  tampering.rehash(copy)


def row_stages_is_a_string(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "plan.json", lambda p: p["computations"]["computation"].update(stages="many"))
  tampering.rehash(copy)


def row_unknown_target(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "manifest.json", lambda m: {**m, "target": "evil"})


def row_clients_huge(copy: Path, tmp_path: Path) -> None:
  _edit_json(copy / "plan.json", lambda p: p.update(clients=10**12))
  tampering.rehash(copy)


ROWS = {
    "plan points outside": (row_plan_points_outside, "is not a path inside the export"),
    "absolute path": (row_absolute_path, "is not a path inside the export"),
    "piece is a link": (row_piece_is_a_link, "is a symbolic link"),
    "files is a list": (row_files_is_a_list, r"at \$\.files: expected object, got array"),
    "file entry a number": (row_file_entry_is_a_number, r"at \$\.files\['plan\.json'\]: expected "
                            "string, got integer"),
    "no computations": (row_plan_has_no_computations, "'computations' is a required property"),
    "stages a string": (row_stages_is_a_string, r"at \$\.computations\.computation\.stages: "
                        "expected array, got string"),
    "unknown target": (row_unknown_target, "runtime 'iree' does not read exports of target 'evil'"),
    "clients huge": (row_clients_huge, r"at \$\.clients: 1000000000000 is greater than the maximum"),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_each_hostile_edit_is_refused_before_anything_runs(row, copy, tmp_path):
  edit, message = ROWS[row]
  edit(copy, tmp_path)
  with pytest.raises(fb.VerificationError, match=message) as refused:
    fb.verify(copy, *progs.example_inputs(), runtime="iree")
  assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_each_hostile_edit_is_one_line_and_exit_2_on_the_command_line(export, tmp_path):
  """The table's command, `faxbridge verify DIR --runtime=iree`, in a fresh interpreter per row."""
  inputs = tmp_path / "inputs.npz"
  specs = read_manifest(export)["computation"]["inputs"]
  np.savez(inputs, **{s["name"]: np.asarray(v) for s, v in zip(specs, progs.example_inputs())})
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "PYTHONPATH")}
  env["PYTHONPATH"] = str(REPO)
  for row, (edit, message) in sorted(ROWS.items()):
    work = tmp_path / row.replace(" ", "_")
    work.mkdir()
    copy = tampering.copy_export(export, work / "export")
    edit(copy, work)
    done = subprocess.run([sys.executable, "-m", "faxbridge", "verify", str(copy), "--runtime=iree",
                           "--inputs", str(inputs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, (row, done.stdout, done.stderr)
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, (row, done.stderr)
    assert "Traceback" not in done.stderr and re.search(message, done.stderr), (row, done.stderr)


def test_the_manifest_checked_is_the_one_parsed(export, copy):
  """With bytes given (those a signature was checked on), the manifest is parsed from them, not read
  again: a manifest swapped on disk after the check changes nothing."""
  from faxbridge._src.export_reader import read_export_manifest

  signed = (export / "manifest.json").read_bytes()
  _edit_json(copy / "manifest.json", lambda m: {**m, "name": "swapped"})
  assert read_export_manifest(copy)["name"] == "swapped"
  assert read_export_manifest(copy, signed) == json.loads(signed)


# --- the fuzz ---------------------------------------------------------------------------------------
class _Opened:
  """Every file opened by this process whose real path lies under a watched folder (an audit hook:
  it sees Python's opens, the way every reader of an export opens its files)."""

  watched: list[str] = []
  seen: list[str] = []

  @classmethod
  def hook(cls, event: str, args: tuple) -> None:
    if event != "open" or not cls.watched or not isinstance(args[0], str | bytes | os.PathLike):
      return
    real = os.path.realpath(os.fsdecode(args[0]))
    if any(real.startswith(w) for w in cls.watched):
      cls.seen.append(real)


sys.addaudithook(_Opened.hook)


def fuzz(export: Path, root: Path, mutations: int, seed: int) -> collections.Counter:
  """``mutations`` random damages of copies of ``export``, each verified on IREE: the outcomes."""
  rng = random.Random(seed)
  hostile = tampering.secrets(root)
  _Opened.watched, _Opened.seen = [str(root / "outside")], []
  outcomes: collections.Counter = collections.Counter()
  args = progs.example_inputs()
  try:
    for i in range(mutations):
      copy = tampering.copy_export(export, root / f"m{i}" / "export")
      what = tampering.tamper(copy, rng, hostile)
      try:
        report = fb.verify(copy, *args, runtime="iree")
      except fb.VerificationError as e:
        assert "\n" not in str(e), (what, str(e))
        outcomes["refused"] += 1
      except Exception as e:  # anything else is a reader's bug: name the damage that found it
        raise AssertionError(f"mutation {i} ({what}): {type(e).__name__}: {e}") from e
      else:
        outcomes["verified" if report.ok else "mismatch reported"] += 1
      assert not _Opened.seen, (what, _Opened.seen)
      shutil.rmtree(root / f"m{i}", ignore_errors=True)
  finally:
    _Opened.watched = []
  return outcomes


def test_fuzzed_exports_are_verified_or_refused_never_read_outside(export, tmp_path):
  outcomes = fuzz(export, tmp_path, 50, seed=0)
  assert sum(outcomes.values()) == 50 and outcomes["refused"] > 25, outcomes


@pytest.mark.slow
def test_fuzzed_exports_many(export, tmp_path):
  outcomes = fuzz(export, tmp_path, 500, seed=1)
  assert sum(outcomes.values()) == 500, outcomes
  print(dict(outcomes))

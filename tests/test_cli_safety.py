"""The command line must not lose a user's files, leave half-written exports or processes behind,
or answer a file-system mistake or a Ctrl-C with a traceback (issue 17, items 1, 4, 7 and 12).

Each test drives ``faxbridge`` as a user would: the quick ones through ``main`` in one interpreter
(``test_cli.drive``), the interruptions in a real subprocess that gets a real SIGINT or whose TFF
runner is really killed; ``fb.export(..., force=True)`` through the public API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cli_programs as progs  # tests/ is on sys.path under pytest
import numpy as np
import pytest
from test_cli import REPO, TESTS, TIMEOUT_S, cli_env, drive

import faxbridge as fb
from faxbridge._src.export import read_manifest, sha256


def _export(out: Path, force: bool = False) -> Path:
  return fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo", out_dir=out,
                   force=force)


def _tree(root: Path) -> dict[str, bytes | str]:
  """Every file under ``root`` with its bytes (a symlink: where it points), to prove it untouched."""
  return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def _one_line_exit_2(rc: int, out: str, err: str, says: str) -> None:
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("faxbridge"), err
  assert says in lines[0], err


# --- item 1: --force replaces only an export or an empty directory ----------------------------------


@pytest.fixture
def victims(tmp_path) -> dict[str, Path]:
  """What a user may have at ``-o``: their own folder, a file, a symlink to an export, a folder
  whose manifest.json is someone else's, a folder of notes beside an unparsable manifest."""
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "notes.txt").write_text("three months of lab notes\n")
  (tmp_path / "file.txt").write_text("not a directory\n")
  real = _export(tmp_path / "real_export")
  (tmp_path / "link").symlink_to(real, target_is_directory=True)
  other = tmp_path / "other_manifest"
  other.mkdir()
  (other / "manifest.json").write_text(json.dumps({"name": "my web app", "version": "2.1"}))
  broken = tmp_path / "broken_manifest"
  broken.mkdir()
  (broken / "manifest.json").write_text("{format_version: 1")
  (broken / "data.csv").write_text("a,b\n1,2\n")
  return {"notes": notes, "file": tmp_path / "file.txt", "link": tmp_path / "link",
          "other": other, "broken": broken}


REFUSALS = {"notes": "is not a faxbridge export", "file": "is a file, not an export directory",
            "link": "is a symlink", "other": "is not a faxbridge export",
            "broken": "is not a faxbridge export"}


@pytest.mark.parametrize("victim", sorted(REFUSALS))
def test_export_force_from_python_refuses_what_is_not_an_export(victims, victim, tmp_path):
  where = victims[victim]
  before = _tree(tmp_path)
  with pytest.raises(fb.ExportError, match=REFUSALS[victim]):
    _export(where, force=True)
  assert _tree(tmp_path) == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder is left"


@pytest.mark.slow  # the CLI in a fresh Python, ~6 s
def test_export_force_from_the_cli_refuses_what_is_not_an_export(victims, tmp_path):
  cases = {name: (TESTS, ["export", "cli_programs:scaled_mean", "--target", "stablehlo", "--force",
                          "-o", path]) for name, path in victims.items()}
  before = _tree(tmp_path)
  runs = drive(cases, tmp_path.parent / f"{tmp_path.name}-results.json")
  for name, (rc, out, err) in runs.items():
    _one_line_exit_2(rc, out, err, REFUSALS[name])
  assert _tree(tmp_path) == before


def test_export_force_replaces_an_earlier_export_or_an_empty_directory(tmp_path):
  earlier = _export(tmp_path / "earlier")
  (earlier / "stale.txt").write_text("written by hand into an export\n")
  (tmp_path / "empty").mkdir()
  for out in (tmp_path / "earlier", tmp_path / "empty"):
    replaced = _export(out, force=True)
    manifest = read_manifest(replaced)
    files = {str(p.relative_to(replaced)) for p in replaced.rglob("*") if p.is_file()}
    assert files == {*manifest["files"], "manifest.json"}  # the export, whole, and nothing else
    assert all(sha256(replaced / rel) == digest for rel, digest in manifest["files"].items())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]  # no temporary left


# --- item 4: file-system mistakes are one line, exit 2, before any work --------------------------------


@pytest.mark.slow  # the CLI in a fresh Python, ~6 s
def test_file_system_mistakes_are_one_line_and_exit_2_before_any_work(tmp_path):
  (tmp_path / "a_file").write_text("x\n")
  (tmp_path / "a_dir").mkdir()
  cases = {
      "output-under-a-file": (["export", "cli_programs:scaled_mean", "--target", "stablehlo",
                               "-o", tmp_path / "a_file" / "out"],
                              f"{tmp_path / 'a_file'} is a file, not a directory"),
      "output-deep-under-a-file": (["export", "cli_programs:scaled_mean", "--target", "stablehlo",
                                    "-o", tmp_path / "a_file" / "x" / "out"],
                                   f"{tmp_path / 'a_file'} is a file, not a directory"),
      "html-into-a-missing-folder": (["inspect", "cli_programs:scaled_mean", "--html",
                                      tmp_path / "missing" / "round.html"],
                                     "no such folder"),
      "html-onto-a-directory": (["inspect", "cli_programs:scaled_mean", "--html",
                                 tmp_path / "a_dir"], "is a directory; name a file"),
      "save-inputs-into-a-missing-folder": (["export", "cli_programs:scaled_mean", "--target",
                                             "stablehlo", "-o", tmp_path / "saved",
                                             "--save-inputs", tmp_path / "missing" / "in.npz"],
                                            "no such folder"),
      "save-inputs-onto-a-directory": (["export", "cli_programs:scaled_mean", "--target",
                                        "stablehlo", "-o", tmp_path / "saved", "--save-inputs",
                                        tmp_path / "a_dir"], "is a directory; name a file"),
  }
  runs = drive({name: (TESTS, argv) for name, (argv, _) in cases.items()},
               tmp_path.parent / f"{tmp_path.name}-results.json")
  for name, (_, says) in cases.items():
    _one_line_exit_2(*runs[name], says)
  # Refused before the work: no export written, nothing drawn, no temporary folder.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"]
  assert list((tmp_path / "a_dir").iterdir()) == []


# --- item 7: the export's modes follow the umask ------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_modes_follow_the_umask(tmp_path, umask):
  previous = os.umask(umask)
  try:
    out = _export(tmp_path / "out")
  finally:
    os.umask(previous)
  paths = [out, *out.rglob("*")]
  assert len(paths) > 3
  for path in paths:
    mode = path.stat().st_mode & 0o777
    assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


# --- item 12: Ctrl-C and a killed runner ----------------------------------------------------------


def _marked_processes(marker: str) -> list[tuple[int, str]]:
  """Every live process (pid, command line) whose environment holds ``marker``: the CLI's children
  and grandchildren inherit it, whatever process group or session they moved to."""
  found = []
  for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      environ = (entry / "environ").read_bytes()
      cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
      state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone meanwhile, or not ours to read
      continue
    if marker.encode() in environ and state != "Z":
      found.append((int(entry.name), cmdline))
  return found


def _start_marked(args: list, cwd: Path, marker: str) -> subprocess.Popen:
  env = {**cli_env(), "FAXBRIDGE_TEST_MARKER": marker}
  return subprocess.Popen([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"the command ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
    assert time.monotonic() < deadline, f"no sign of {what} within {timeout} s"
    time.sleep(0.01)


@pytest.mark.slow
def test_ctrl_c_during_export_is_one_line_exit_130_and_leaves_nothing(tmp_path):
  marker = uuid.uuid4().hex
  out = tmp_path / "fedavg"
  proc = _start_marked(["export", "examples.fedavg:process", "--target=stablehlo", "-o", out], REPO,
                       marker)
  # Working: the export's temporary folder beside DIR exists (it is being written).
  _wait_for(lambda: any(p.name.startswith(".fedavg.") for p in tmp_path.iterdir()), proc,
            "the export's temporary folder")
  os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group gets it
  interrupted = time.monotonic()
  stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 130, (stdout, stderr)
  assert stderr.strip().splitlines() == ["faxbridge export: interrupted"], stderr
  # At once: nothing it started (JAX's backend-start timer included) holds the exit.
  assert time.monotonic() - interrupted < 20
  assert list(tmp_path.iterdir()) == []  # no DIR and no .fedavg.* temporary folder
  assert _marked_processes(marker) == []


def _tff_export(tmp_path: Path) -> Path:
  out = fb.export(progs.scaled_mean, *progs.example_inputs(), target="tff", out_dir=tmp_path / "x")
  np.savez(str(out) + ".inputs.npz", **{s["name"]: np.asarray(v) for s, v in zip(
      read_manifest(out)["computation"]["inputs"], progs.example_inputs())})
  return out


def _runner(marker: str) -> list[tuple[int, str]]:
  """The TFF runner among the marked processes: the one run as ``python .../tff/tff_runner``."""
  return [(pid, cmd) for pid, cmd in _marked_processes(marker)
          if len(cmd.split()) > 1 and cmd.split()[1].endswith("/tff/tff_runner")]


@pytest.mark.slow
def test_ctrl_c_during_verify_on_tff_is_one_line_exit_130_and_ends_the_runner(tmp_path):
  export = _tff_export(tmp_path)
  marker = uuid.uuid4().hex
  proc = _start_marked(["verify", export, "--runtime", "tff"], TESTS, marker)
  _wait_for(lambda: _runner(marker), proc, "the TFF runner")
  time.sleep(1.0)  # the runner importing TensorFlow
  os.killpg(proc.pid, signal.SIGINT)  # the runner has its own session: only the CLI gets it
  stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 130, (stdout, stderr)
  assert stderr.strip().splitlines() == ["faxbridge verify: interrupted"], stderr
  deadline = time.monotonic() + 5  # SIGKILL is delivered at once; its reaping may lag a little
  while _marked_processes(marker) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _marked_processes(marker) == []


@pytest.mark.slow
def test_a_killed_tff_runner_is_reported_without_tensorflows_start_up_log(tmp_path):
  export = _tff_export(tmp_path)
  marker = uuid.uuid4().hex
  proc = _start_marked(["verify", export, "--runtime", "tff"], TESTS, marker)
  _wait_for(lambda: _runner(marker), proc, "the TFF runner")
  (pid, _), = _runner(marker)
  # Killed once TensorFlow has logged its start-up noise into the runner's stderr file (in its
  # working directory), so the failure's message has that noise to leave out.
  log = Path(f"/proc/{pid}/cwd/runner.stderr")
  _wait_for(lambda: log.is_file() and b"Unable to register" in log.read_bytes(), proc,
            "TensorFlow's start-up log", timeout=60)
  os.kill(pid, signal.SIGKILL)
  stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 2, (stdout, stderr)
  assert "Traceback" not in stderr
  assert "the TFF runner was killed by SIGKILL and wrote no status" in stderr.splitlines()[0], stderr
  for noise in ("Unable to register", "cuDNN", "cuFFT", "cuBLAS", "TensorRT", "oneDNN",
                "absl::InitializeLog"):
    assert noise not in stderr, stderr
  assert _marked_processes(marker) == []

"""CI runs the whole suite: .ci/run clears what could narrow it, the Makefile's test recipes ignore
an exported PYTEST_ADDOPTS and fail pytest's "no tests ran" (exit 5), and the session refuses to
test faxbridge imported from another tree. Stand-ins for make and pytest record what they were
given, so nothing here runs the suite itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NARROWING = "-k this_matches_no_test"
# Make variables travel in these too: a test run from `make test PYTEST_ARGS=...` must not leak in.
MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKELEVEL", "PYTEST_ARGS")

RECORDER = """#!/usr/bin/env bash
# Records its arguments, working directory and the variables that could narrow a pytest run.
{{
  for v in PYTEST_ADDOPTS PYTEST_ARGS PYTEST_PLUGINS MAKEFLAGS; do
    if [ -n "${{!v+x}}" ]; then echo "$v=${{!v}}"; else echo "$v unset"; fi
  done
  echo "cwd=$PWD"
  printf 'arg=%s\\n' "$@"
}} > "{record}"
exit "${{FAKE_RC:-0}}"
"""


def _recorder(path: Path, record: Path) -> Path:
  path.write_text(RECORDER.format(record=record))
  path.chmod(0o755)
  return path


def _clean_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
  env.update(extra)
  return env


def _make(recipe: str, fake_python: Path, rc: int, *make_args: str) -> subprocess.CompletedProcess:
  # -o: the environments count as built; CORE: the stand-in instead of .venv's python.
  return subprocess.run(
      ["make", "-s", "-C", str(REPO), "-o", "envs", "-o", ".venv/.ready", "-o", ".venv-tff/.ready",
       recipe, f"CORE={fake_python}", *make_args],
      env=_clean_env(PYTEST_ADDOPTS=NARROWING, FAKE_RC=str(rc)), capture_output=True, text=True,
      timeout=60)


# Both recipes run the suite on every core (pytest-xdist), tests of one xdist_group on one worker.
PARALLEL = ["-n", "auto", "--maxprocesses=4", "--dist", "loadgroup"]


# Neither runs the tests marked `bench` (they need .venv-bench, which CI never builds: a skip there would
# read as a pass); `make test-bench` does.
@pytest.mark.parametrize("recipe,marks", [("test", ["-m", "not bench"]),
                                          ("test-quick", ["-m", "not slow and not bench"])])
def test_make_recipes_ignore_an_exported_pytest_addopts(tmp_path, recipe, marks):
  record = tmp_path / "record"
  proc = _make(recipe, _recorder(tmp_path / "python", record), 0)
  assert proc.returncode == 0, proc.stderr
  lines = record.read_text().splitlines()
  assert "PYTEST_ADDOPTS unset" in lines
  assert [line[4:] for line in lines if line.startswith("arg=")] == ["-m", "pytest", *PARALLEL,
                                                                     *marks]
  # PYTEST_ARGS given on purpose on the command line still narrows a run.
  proc = _make(recipe, _recorder(tmp_path / "python", record), 0, "PYTEST_ARGS=-x")
  assert [line[4:] for line in record.read_text().splitlines() if line.startswith("arg=")] == \
      ["-m", "pytest", *PARALLEL, *marks, "-x"]


@pytest.mark.parametrize("recipe", ["test", "test-quick"])
def test_make_recipes_fail_when_pytest_ran_no_tests(tmp_path, recipe):
  fake = _recorder(tmp_path / "python", tmp_path / "record")
  proc = _make(recipe, fake, 5)
  assert proc.returncode != 0
  assert "collected no tests" in proc.stdout
  assert _make(recipe, fake, 1).returncode != 0  # failures fail
  assert _make(recipe, fake, 0).returncode == 0


def test_ci_run_clears_what_could_narrow_the_suite(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "record"
  _recorder(bin_dir / "make", record)
  env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTEST_ADDOPTS=NARROWING,
                   PYTEST_ARGS=NARROWING, PYTEST_PLUGINS="no_such_plugin",
                   MAKEFLAGS=f"PYTEST_ARGS={NARROWING}")
  proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True,
                        text=True, cwd=tmp_path, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = record.read_text().splitlines()
  for var in ("PYTEST_ADDOPTS", "PYTEST_ARGS", "PYTEST_PLUGINS", "MAKEFLAGS"):
    assert f"{var} unset" in lines
  assert f"cwd={REPO}" in lines
  assert [line for line in lines if line.startswith("arg=")] == ["arg=test"]
  proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], env={**env, "FAKE_RC": "2"},
                        capture_output=True, text=True, cwd=tmp_path, timeout=60)
  assert proc.returncode == 2  # make's failure is CI's failure


@pytest.mark.slow  # a pytest in a fresh Python, twice: ~10 s each
@pytest.mark.parametrize("own_faxbridge", [False, True],
                         ids=["faxbridge-elsewhere", "converters-elsewhere"])
def test_session_refuses_faxbridge_from_another_tree(tmp_path, own_faxbridge):
  """A copy of this conftest in another tree: there faxbridge (or only faxbridge.converters, as an
  editable install made from this checkout maps it) comes from here, and the session must stop."""
  (tmp_path / "tests").mkdir()
  for helper in ("conftest.py", "run_shared.py", "xdist_groups.py"):  # conftest, its modules
    shutil.copyfile(REPO / "tests" / helper, tmp_path / "tests" / helper)
  (tmp_path / "tests" / "test_anything.py").write_text("def test_passes():\n  assert True\n")
  (tmp_path / "pytest.ini").write_text("[pytest]\n")
  if own_faxbridge:
    (tmp_path / "faxbridge").mkdir()
    (tmp_path / "faxbridge" / "__init__.py").write_text("")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
  if not own_faxbridge:
    env["PYTHONPATH"] = str(REPO)
  proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  output = proc.stdout + proc.stderr
  assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
  assert "would test another tree's code" in output
  assert f"faxbridge.converters from {REPO / 'converters'}" in output
  assert ("faxbridge from" in output) != own_faxbridge
  assert "1 passed" not in output


def test_the_checkout_is_ruff_clean():
  # `make lint` is on demand; this keeps CI honest about it (an unexported public name, an unused
  # import) without a separate job. ruff is in the core environment's lock file.
  ruff = Path(sys.executable).with_name("ruff")
  done = subprocess.run([str(ruff), "check", "--no-cache", str(REPO)], capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stdout + done.stderr

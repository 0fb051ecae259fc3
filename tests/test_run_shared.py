"""What the processes of one test run share (run_shared.py): an entry made once however many ask
for it at once, and a failure that reaches every waiter; and, under pytest-xdist, the users of a
module's module-scoped fixture kept on one worker so the fixture is made once (xdist_groups.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from run_shared import made_once

TESTS = Path(__file__).resolve().parent


def _race(directory: Path, key: str, make, callers: int = 4) -> list:
  """``callers`` threads ask for the same entry at once; each one's result or exception."""
  results: list = [None] * callers
  start = threading.Barrier(callers)

  def call(i: int) -> None:
    start.wait()
    try:
      results[i] = made_once(directory, key, make)
    except Exception as e:  # the point is to look at it
      results[i] = e

  threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  return results


def test_an_entry_is_made_once_for_every_caller(tmp_path):
  made = []

  def make(path: Path) -> None:
    made.append(path)
    path.mkdir()
    (path / "data").write_text("made")

  results = _race(tmp_path, "entry", make)
  assert len(made) == 1
  assert results == [tmp_path / "entry"] * 4
  assert (tmp_path / "entry" / "data").read_text() == "made"
  assert made_once(tmp_path, "entry", make) == tmp_path / "entry" and len(made) == 1


def test_a_failure_reaches_every_caller_with_its_cause(tmp_path):
  def make(path: Path) -> None:
    raise ValueError("the export failed: no rule for fft")

  results = _race(tmp_path, "broken", make)
  assert all(isinstance(r, Exception) and "no rule for fft" in str(r) for r in results), results
  assert sum(isinstance(r, ValueError) for r in results) == 1  # the maker's own error
  with pytest.raises(RuntimeError, match="no rule for fft"):  # and nobody makes it again
    made_once(tmp_path, "broken", make)


GROUPED = '''
import os
import pytest


@pytest.fixture(scope="module")
def costly(tmp_path_factory):
  with open(os.environ["MADE_LOG"], "a") as f:
    f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
  return 1


@pytest.mark.parametrize("i", range(8))
def test_uses_it(costly, i):
  assert costly == 1


@pytest.mark.parametrize("i", range(8))
def test_does_not(i):
  pass
'''


@pytest.mark.slow  # a pytest run on two workers: seconds
def test_users_of_a_module_fixture_stay_on_one_xdist_worker(tmp_path):
  """With `make test`'s options, a module-scoped fixture is made once for the run (on one worker),
  although its 8 users and 8 other tests are spread over two workers."""
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "conftest.py").write_text(
      "import xdist_groups\n\n\ndef pytest_configure(config):\n  xdist_groups.register(config)\n")
  (tmp_path / "tests" / "test_grouped.py").write_text(GROUPED)
  (tmp_path / "pytest.ini").write_text("[pytest]\n")
  log = tmp_path / "made.log"
  env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
  env.update(MADE_LOG=str(log), PYTHONPATH=str(TESTS))  # xdist_groups.py, as conftest.py uses it
  proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                         "--dist", "loadgroup", "-v", "tests"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "16 passed" in proc.stdout
  assert len(log.read_text().splitlines()) == 1, proc.stdout  # made once
  workers = {line.split()[0] for line in proc.stdout.splitlines() if "PASSED" in line}
  assert workers == {"[gw0]", "[gw1]"}, proc.stdout  # the others did spread

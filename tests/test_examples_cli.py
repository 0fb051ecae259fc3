"""``python -m examples.NAME`` reads its flags off the example's entry point: ``--rounds 2`` runs two
rounds (it used to be ignored: ten ran), ``--help`` describes the example, and a wrong flag is an
error (exit 2) instead of being ignored."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _example(*argv: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_help_describes_the_example_and_its_flags():
  done = _example("examples.fedavg", "--help")
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("usage: python -m examples.fedavg [-h] [--rounds N] [--clients N]")
  assert "FedAvg on digits" in done.stdout
  assert "rounds (default: 10)" in done.stdout and "clients (default: 8)" in done.stdout


@pytest.mark.slow  # a fresh Python importing JAX per case: ~4 s each
@pytest.mark.parametrize("argv", [["--round", "2"], ["--rounds", "0"], ["--rounds", "two"], ["extra"]])
def test_a_wrong_flag_is_a_usage_error(argv):
  done = _example("examples.fedavg", *argv)
  assert done.returncode == 2, (done.stdout, done.stderr)
  assert done.stdout == "" and "python -m examples.fedavg: error:" in done.stderr
  assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_rounds_and_clients_are_what_the_flags_say():
  done = _example("examples.fedavg", "--rounds", "2", "--clients", "3")
  assert done.returncode == 0, done.stderr
  rounds = re.findall(r"^round +(\d+):", done.stdout, re.MULTILINE)
  assert rounds == ["0", "1", "2"], done.stdout


@pytest.mark.slow
def test_the_installed_examples_run_from_any_directory(tmp_path):
  """The examples ship inside the package (faxbridge.examples), which is what `faxbridge demo` runs."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-m", "faxbridge.examples.fedavg", "--rounds", "1"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert re.findall(r"^round +(\d+):", done.stdout, re.MULTILINE) == ["0", "1"]

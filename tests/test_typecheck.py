"""CI type-checks the checkout as `make lint` does: mypy (configured in pyproject.toml) over faxbridge/
and converters/, and over the TFF runner apart, on the Python 3.11 it runs on in .venv-tff."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MYPY = Path(sys.executable).with_name("mypy")


@pytest.mark.slow  # about 30 s from a cold cache
@pytest.mark.parametrize("args", [
    ["faxbridge", "converters", "--exclude", "^converters/runtimes/tff/tff_runner/"],
    ["--python-version", "3.11", "converters/runtimes/tff/tff_runner"],
], ids=["core-and-converters", "tff-runner"])
def test_mypy_is_clean(args, tmp_path):
  done = subprocess.run([str(MYPY), "--cache-dir", str(tmp_path / "cache"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "Success: no issues found" in done.stdout

"""Native libraries' start-up noise (TensorFlow's oneDNN notice, absl's InitializeLog warning) is
dropped wherever a plug-in runs, from Python as from the command line; every other line they write to
descriptor 2 still reaches the user."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faxbridge._src import native_logs

REPO = Path(__file__).resolve().parents[1]
NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1796599557.841925 27930 port.cc:153] oneDNN custom operations are on.\n")


def test_start_up_noise_is_dropped_and_other_lines_are_written_back(capfd):
  with native_logs.quiet_start_up():
    os.write(2, (NOISE + "E0000 kernel.cc:12] an error that explains a failure\n").encode())
    assert capfd.readouterr().err == ""  # caught while inside
  assert capfd.readouterr().err == "E0000 kernel.cc:12] an error that explains a failure\n"


def test_what_was_written_comes_back_also_when_the_block_raises(capfd):
  with pytest.raises(RuntimeError), native_logs.quiet_start_up():
    os.write(2, (NOISE + "the reason\n").encode())
    raise RuntimeError("failed")
  assert capfd.readouterr().err == "the reason\n"


def test_verbose_shows_everything_as_it_is_written(capfd):
  native_logs.show_native_logs(True)
  try:
    with native_logs.quiet_start_up():
      os.write(2, NOISE.encode())
      assert capfd.readouterr().err == NOISE
  finally:
    native_logs.show_native_logs(False)


@pytest.mark.slow
def test_export_to_tff_from_python_prints_no_native_noise(tmp_path):
  """``fb.export(..., target="tff")`` imports TensorFlow on first use; a Python user saw absl's and
  oneDNN's start-up lines twice on every export."""
  script = textwrap.dedent(f"""
      import numpy as np
      import faxbridge as fb
      from cli_programs import scaled_mean
      fb.export(scaled_mean, np.float32(2.0), np.ones((3, 4), np.float32), target="tff",
                out_dir={str(tmp_path / "out")!r})
      print("exported")
  """)
  env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout == "exported\n"
  assert done.stderr == "", done.stderr

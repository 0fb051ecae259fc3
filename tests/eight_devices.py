"""Run Python code on 8 host CPU devices and read back what it reports.

The device count is fixed when jax starts (``--xla_force_host_platform_device_count``), and this
pytest process has one CPU device, so the 8-device runs happen in a fresh Python; it writes a JSON
report to the path it is given (its last argument), which the tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": ROOT}


def report(out: Path, *command: str, timeout: float = 300) -> dict:
  """Run ``python *command out`` on 8 CPU devices and return the JSON it wrote to ``out``.

  ``command``: ``("-c", SCRIPT)``, or a script path and its arguments.
  """
  proc = subprocess.run([sys.executable, *command, str(out)], env={**os.environ, **ENV}, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())

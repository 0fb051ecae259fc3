"""Many exports on runtime "jax" in ONE fresh Python (each start of one costs about a second).

``fb.verify(..., runtime="jax")`` starts a Python per export and runs the export's ``jax.export``
pieces there with ``faxbridge.converters.runtimes.jax_runner`` (the child side of the runtime). The
slow suite runs every generated program and every bundled example that way; here one child runs
``jax_runner.main`` on each export in turn, so what runs is the same code on the same files, from a
process that has nothing but the export directories. Runtime "jax" itself, the parent side that
starts the child, keeps its own tests (test_runtimes_iree_litert_jax.py, the quick suite's round
trips).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from faxbridge._src.verify import check_files, read_export_manifest
from faxbridge.converters.runtimes import jax_runner

# Runs each job with jax_runner.main; a job that raises is recorded and the next one runs.
CHILD = """
import json, sys, traceback
from faxbridge.converters.runtimes import jax_runner
errors = {}
for i, argv in enumerate(json.load(open(sys.argv[1]))):
  try:
    jax_runner.main(argv)
  except Exception:
    errors[i] = traceback.format_exc()
json.dump(errors, open(sys.argv[2], "w"))
"""
TIMEOUT_S = 1200


class JaxRunError(RuntimeError):
  """One export failed in the child: its traceback."""


def run_on_jax(jobs: Sequence[tuple[Path, Mapping[str, np.ndarray], int]]
               ) -> list[dict[str, np.ndarray] | JaxRunError]:
  """``jobs``: (export directory, inputs by manifest name, rounds; 0 for a computation). Returns
  each export's outputs keyed as ``fb.verify`` keys them, or the error of that export alone.
  Each export's files are checked against its manifest first, as ``fb.verify`` does."""
  with tempfile.TemporaryDirectory(prefix="faxbridge-jax-batch-") as tmp:
    work = Path(tmp)
    argv = []
    for i, (export_dir, inputs, rounds) in enumerate(jobs):
      check_files(Path(export_dir), read_export_manifest(Path(export_dir)))
      jax_runner.save(work / f"in{i}.npz", dict(inputs))
      argv.append([str(Path(export_dir).resolve()), str(work / f"in{i}.npz"),
                   str(work / f"out{i}.npz"), str(rounds)])
    (work / "jobs.json").write_text(json.dumps(argv))
    # The child computes in 64 bits exactly when this process does, as runtime "jax" arranges.
    env = {**os.environ, "JAX_ENABLE_X64": "1" if jax.config.jax_enable_x64 else "0"}
    done = subprocess.run([sys.executable, "-c", CHILD, "jobs.json", "errors.json"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
      raise RuntimeError(f"the jax batch child failed (exit {done.returncode}):\n"
                         f"{done.stderr[-4000:]}")
    errors = json.loads((work / "errors.json").read_text())
    return [JaxRunError(errors[str(i)]) if str(i) in errors else jax_runner.load(work / f"out{i}.npz")
            for i in range(len(argv))]

"""``fb.verify(..., runtime="jax")``: reload the ``jax.export`` pieces in a fresh process and run.

The child (``jax_runner``) starts from nothing but the export directory: it proves the serialized
pieces and ``plan.json`` suffice, without the program's Python or anything this process traced.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from faxbridge.converters.plan import load_plan, pieces
from faxbridge.converters.runtimes import jax_runner
from faxbridge.converters.runtimes.progress import ProgressFile, wait
from faxbridge.extend import RuntimeResult, VerificationError, emit

TIMEOUT_S = 600


def available() -> tuple[bool, str]:
  """The registry's availability probe: jax is what faxbridge runs on, so always here."""
  return True, "this Python (jax.export)"


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
               rounds: int) -> RuntimeResult:
  """Run the export's round(s) from its ``.jax`` pieces in a subprocess; outputs keyed as
  ``fb.verify`` keys them."""
  plan = load_plan(export_dir)
  missing = [p["name"] for p in pieces(plan) if "jax" not in p["files"]]
  if missing:
    raise VerificationError(f"{export_dir}: pieces {missing} have no jax.export artifact "
                            "(export with --target=stablehlo to run on runtime 'jax')")
  with tempfile.TemporaryDirectory(prefix="faxbridge-jax-") as tmp:
    in_path, out_path = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
    progress = ProgressFile(Path(tmp) / "progress.jsonl")
    jax_runner.save(in_path, inputs)
    cmd = [sys.executable, "-m", "faxbridge.converters.runtimes.jax_runner", str(export_dir),
           str(in_path), str(out_path), str(rounds), str(progress.path)]
    # The child runs in an empty directory and imports the same faxbridge as this process; it
    # never imports the program (it is given nothing but the export's path).
    path = os.pathsep.join(p for p in [_faxbridge_root(), os.environ.get("PYTHONPATH")] if p)
    emit("jax.start", "starting a fresh Python for the jax.export pieces")
    with open(Path(tmp) / "stderr", "w+") as err:
      proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err, cwd=tmp,
                              env={**os.environ, "PYTHONPATH": path, **_x64_env()})
      try:
        code = wait(proc, TIMEOUT_S, progress,
                    lambda line: emit(line["name"], line["message"], **line.get("fields", {})))
      except BaseException as e:  # a timeout, or a listener that raised: the child goes too
        proc.kill()
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
          raise VerificationError(f"runtime 'jax' did not finish within {TIMEOUT_S} s") from None
        raise
      err.seek(0)
      stderr = err.read()
    if code != 0:
      raise VerificationError(f"runtime 'jax' failed (exit {code}):\n{stderr[-4000:]}")
    outputs = jax_runner.load(out_path)
  return RuntimeResult(outputs=outputs, info={
      "process": "a fresh Python process, which deserialized the pieces' jax.export files (nothing "
                 "of this process's traces or compiled code)"})


def _x64_env() -> dict[str, str]:
  """The child computes in 64 bits exactly when this process does (however it was switched on:
  the environment variable or ``jax.config.update``), or a float64 export cannot run there."""
  import jax

  return {"JAX_ENABLE_X64": "1" if jax.config.jax_enable_x64 else "0"}


def _faxbridge_root() -> str:
  """The directory holding the ``faxbridge`` package this process imported (an editable checkout
  or site-packages), so the child imports the same code."""
  import faxbridge

  return str(Path(faxbridge.__file__).resolve().parent.parent)

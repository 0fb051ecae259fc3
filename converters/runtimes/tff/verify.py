"""``fb.verify(..., runtime="tff")``: execute an export on TFF 0.87 through the runner.

Single-stage computations (and ``next`` of an iterative process) also go through TFF's deployment
forms: the runner builds MapReduceForm and DistributeAggregateForm and runs the computation rebuilt
from MapReduceForm, whose outputs must equal native too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faxbridge.extend import RuntimeResult

from .client import run_computation


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
               rounds: int) -> RuntimeResult:
  iterative = manifest["kind"] == "iterative_process"
  block = manifest["next"] if iterative else manifest["computation"]
  # MapReduceForm and DistributeAggregateForm describe one round of an iterative process:
  # (<state@SERVER, data@CLIENTS> -> <state@SERVER, metrics@SERVER>).
  forms = iterative and block.get("stages") == 1
  run = run_computation(export_dir, inputs, rounds=rounds if iterative else None, forms=forms)
  info = {"context": run.context, "tff_wall_s": round(run.timings.get("wall_s", 0.0), 2)}
  extra = {}
  for name, status in run.forms.items():
    info[f"{name}_form"] = "built" if status.built else f"failed: {status.error}"
    if status.built and status.ran:
      extra[f"{name} rebuilt"] = status.outputs
    elif status.built:
      info[f"{name}_form"] = f"built, rebuilt computation failed: {status.run_error}"
  if not forms:
    info["forms"] = ("not applicable: the deployment forms describe the next of a single-stage "
                     f"iterative process (this is a {manifest['kind']} of {block.get('stages')} "
                     "stages)")
  return RuntimeResult(outputs=run.outputs, extra_outputs=extra, info=info)

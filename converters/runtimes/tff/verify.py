"""``fb.verify(..., runtime="tff")``: execute an export on TFF 0.87 through the runner.

Single-stage computations (and ``next`` of an iterative process) also go through TFF's deployment
forms: the runner builds MapReduceForm and DistributeAggregateForm and runs the computation rebuilt
from each, whose outputs must equal native too (each is a further run in the report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faxbridge.extend import RuntimeResult

from .client import FORMS, TffRun, rebuilt_run, run_computation

# What each execution context is (the runner reports "native" or "test", protocol "Execution context").
CONTEXTS = {"native": "TFF's native C++ context (tff.backends.native)",
            "test": "TFF's test C++ context (tff.backends.test: the program has secure sums, which "
                    "it computes in the clear; the native context rejects them)"}


def _time_text(run: TffRun) -> str:
  """Where the runner's seconds went, each part named."""
  t = run.timings
  parts = [f"{t['runner_import_s']:.1f} s importing TFF", f"{t.get('execute_s', 0.0):.1f} s running"]
  if "forms_s" in t:
    parts.append(f"{t['forms_s']:.1f} s building the deployment forms and running their rebuilds")
  return f"{t.get('wall_s', 0.0):.1f} s, in .venv-tff: {', '.join(parts)}"


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
               rounds: int) -> RuntimeResult:
  iterative = manifest["kind"] == "iterative_process"
  block = manifest["next"] if iterative else manifest["computation"]
  # MapReduceForm and DistributeAggregateForm describe one round of an iterative process:
  # (<state@SERVER, data@CLIENTS> -> <state@SERVER, metrics@SERVER>).
  forms = iterative and block.get("stages") == 1
  run = run_computation(export_dir, inputs, rounds=rounds if iterative else None, forms=forms)
  info: dict[str, str] = {"execution context": CONTEXTS.get(run.context, run.context)}
  extra = {}
  for name, status in run.forms.items():
    form = FORMS.get(name, name)
    run_label = rebuilt_run(name)
    if not status.built:
      info[form] = f"not built: {status.error}"
    elif not status.ran:
      info[form] = f"built; next rebuilt from it failed to run: {status.run_error}"
    else:
      info[form] = f"built; next rebuilt from it ran on TFF's test context: rows [{run_label}]"
      extra[run_label] = status.outputs
  if not forms:
    info["deployment forms"] = (
        "not built: MapReduceForm and DistributeAggregateForm describe the next of a single-stage "
        f"iterative process (this is a {manifest['kind'].replace('_', ' ')} of "
        f"{block.get('stages')} stage{'' if block.get('stages') == 1 else 's'})")
  info["TFF runner time"] = _time_text(run)
  return RuntimeResult(outputs=run.outputs, extra_outputs=extra, info=info)

"""``--forms``: MapReduceForm and DistributeAggregateForm of a computation (or ``next``), each
rebuilt into a computation and run on the same inputs. A form that fails is reported, never fatal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_federated as tff

from .protocol import PROGRESS, error_text

if TYPE_CHECKING:
  from .computations import Program
  from .contexts import Contexts

NAMES = ("mapreduce", "distribute_aggregate")


def build_forms(comp: Any) -> dict[str, tuple[Any, dict]]:
  """Builds both forms; returns per form the rebuilt computation (None if it failed) and status."""
  mr = tff.backends.mapreduce
  makers = {
      "mapreduce": (mr.get_map_reduce_form_for_computation, mr.get_computation_for_map_reduce_form),
      "distribute_aggregate": (mr.get_distribute_aggregate_form_for_computation,
                               mr.get_computation_for_distribute_aggregate_form),
  }
  built = {}
  for name in NAMES:
    to_form, from_form = makers[name]
    start = time.perf_counter()
    status: dict[str, Any] = {"built": False, "error": None, "ran": False, "run_error": None}
    rebuilt = None
    try:
      rebuilt = from_form(to_form(comp))
      status["built"] = True
    except Exception as e:
      status["error"] = error_text(e)
    status["build_s"] = time.perf_counter() - start
    built[name] = (rebuilt, status)
  return built


def run_forms(program: Program, contexts: Contexts, arrays: dict[str, np.ndarray],
              rounds: int | None, outputs: dict[str, np.ndarray]) -> dict[str, dict]:
  """Builds the forms of ``program.comp`` and runs each rebuild as the program's computation (the
  same initial state for an iterative process); adds their outputs to ``outputs`` under
  ``"{form}/{key}"`` and returns the forms' statuses."""
  statuses = {}
  PROGRESS.report("forms", forms=list(NAMES))
  for name, (rebuilt, status) in build_forms(program.comp).items():
    if rebuilt is not None:
      start = time.perf_counter()
      try:
        # Rebuilt forms hold secure-sum slots (empty or not): only the test context runs them.
        # The number of clients is decided as for the original (same inputs, same manifest).
        rebuilt_out = program.execute(contexts, "test", rebuilt, arrays, rounds, form=name)
        outputs.update({f"{name}/{k}": v for k, v in rebuilt_out.items()})
        status["ran"] = True
      except Exception as e:
        status["run_error"] = error_text(e)
      status["run_s"] = time.perf_counter() - start
    statuses[name] = status
  return statuses

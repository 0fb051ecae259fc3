"""The TFF 0.87 runtime: exports of the ``tff`` target executed in .venv-tff, from the core.

TFF 0.87 needs TF 2.14 and numpy 1.25 and can never share the core's environment, so this package
has two sides that talk only through files (``docs/tff_runner_protocol.md``):

* the core side, imported as ``faxbridge.converters.runtimes.tff``: ``launch`` (finding .venv-tff's
  Python, starting the runner, reading its status), ``client`` (batched ``run_graphs`` and
  ``run_computations``) and ``verify`` (``fb.verify(..., runtime="tff")``);
* ``tff_runner/``, the runner that runs inside .venv-tff, started by path and importing nothing
  from faxbridge (its own ``__init__`` lists its modules).

``RUNTIME`` is its registry entry (the ``faxbridge.runtimes`` entry point ``tff``).
"""

from faxbridge.extend import Runtime

from .client import (
    ComputationJob,
    FormStatus,
    GraphJob,
    TffRun,
    run_computation,
    run_computations,
    run_graph,
    run_graphs,
)
from .launch import DEFAULT_TIMEOUT_S, ENV_VAR, MAKE_COMMAND, RUNNER, tff_python

RUNTIME = Runtime(
    "tff", runner="faxbridge.converters.runtimes.tff.verify:verify_run",
    summary="TensorFlow Federated 0.87's native context, in .venv-tff",
    install=MAKE_COMMAND, available="faxbridge.converters.runtimes.tff.launch:available")

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_VAR",
    "RUNNER",
    "RUNTIME",
    "ComputationJob",
    "FormStatus",
    "GraphJob",
    "TffRun",
    "run_computation",
    "run_computations",
    "run_graph",
    "run_graphs",
    "tff_python",
]

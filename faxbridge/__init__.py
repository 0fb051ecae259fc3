"""faxbridge: federated computations written once in JAX, run as sharded XLA, exported to
TensorFlow Federated, StableHLO (IREE) and TFLite (LiteRT), and proven equal by execution.

    import faxbridge as fb

    @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
    def fedavg_round(params, data):
      updates = fb.map(local_training, fb.broadcast(params), data)
      return fb.mean(updates)
"""

from faxbridge import events
from faxbridge._src.api import broadcast, map, max, mean, min, secure_sum, sum, weighted_mean
from faxbridge._src.computation import Computation, TracedComputation, computation
from faxbridge._src.dp import dp_adaptive_init, dp_adaptive_mean, dp_epsilon, dp_mean
from faxbridge._src.drjax_frontend import from_drjax
from faxbridge._src.errors import (
  ExportError,
  FaxbridgeError,
  PlacementError,
  TraceError,
  UnsupportedPrimitiveError,
  VerificationError,
)
from faxbridge._src.execution import compiler_options, execution_strategy
from faxbridge._src.export import export
from faxbridge._src.form import FederatedForm
from faxbridge._src.iterative import IterativeProcess
from faxbridge._src.placements import CLIENTS, SERVER, Placement
from faxbridge._src.ragged import Ragged, fold, ragged
from faxbridge._src.signing import keygen
from faxbridge._src.split import split
from faxbridge._src.verify import verify

__version__ = "0.1.0"


__all__ = [
    "CLIENTS",
    "SERVER",
    "Computation",
    "ExportError",
    "FaxbridgeError",
    "FederatedForm",
    "IterativeProcess",
    "Placement",
    "PlacementError",
    "Ragged",
    "TraceError",
    "TracedComputation",
    "UnsupportedPrimitiveError",
    "VerificationError",
    "broadcast",
    "compiler_options",
    "computation",
    "dp_adaptive_init",
    "dp_adaptive_mean",
    "dp_epsilon",
    "dp_mean",
    "events",
    "execution_strategy",
    "export",
    "fold",
    "from_drjax",
    "keygen",
    "map",
    "max",
    "mean",
    "min",
    "ragged",
    "secure_sum",
    "split",
    "sum",
    "verify",
    "weighted_mean",
]

"""The surface for writers of export targets, runtimes and aggregations.

``import faxbridge as fb`` is what a user of faxbridge needs; a package that adds a target, a runtime
or an aggregation (the built-in ones under ``faxbridge.converters`` included) imports what it builds
on from here, as JAX extensions import ``jax.extend``. Everything else under ``faxbridge._src`` is
private and free to change.

The pieces a target reads:

* :class:`SplitProgram`: the program split once: its :class:`FederatedForm` per computation
  (``computation``, or ``initialize`` and ``next``), the native reference and the state links;
* the form's data model (:class:`Stage`, :class:`Piece`, :class:`TensorSpec`,
  :class:`Aggregation`) and its one interpreter (:func:`interpret` with a :class:`Backend`,
  :func:`run_program` for the rounds of an iterative process);
* the errors to raise (:class:`ExportError` while exporting, :class:`VerificationError` while
  running an export) and :func:`describe`, which turns an equation's ``source_info`` into the user's
  ``file:line``;
* :mod:`jax_internals`: the few private JAX objects a lowering needs (primitives JAX gives no public
  handle on), each with its reason, so that no package reaches into ``jax._src`` itself.
"""

from faxbridge._src import jax_internals
from faxbridge._src.errors import (
  ExportError,
  FaxbridgeError,
  UnsupportedPrimitiveError,
  VerificationError,
)
from faxbridge._src.export import SplitProgram, read_manifest
from faxbridge._src.form import (
  Aggregation,
  Backend,
  FederatedForm,
  PerClientBackend,
  Piece,
  Stage,
  TensorSpec,
  interpret,
  number_of_clients,
  run_program,
)
from faxbridge._src.locations import describe, enclosing
from faxbridge._src.registry import RuntimeResult
from faxbridge._src.serialization import strip_locations

__all__ = [
    "Aggregation",
    "Backend",
    "ExportError",
    "FaxbridgeError",
    "FederatedForm",
    "PerClientBackend",
    "Piece",
    "RuntimeResult",
    "SplitProgram",
    "Stage",
    "TensorSpec",
    "UnsupportedPrimitiveError",
    "VerificationError",
    "describe",
    "enclosing",
    "interpret",
    "jax_internals",
    "number_of_clients",
    "read_manifest",
    "run_program",
    "strip_locations",
]

"""The surface for writers of export targets, runtimes and aggregations.

``import faxbridge as fb`` is what a user of faxbridge needs; a package that adds a target, a runtime
or an aggregation (the built-in ones under ``faxbridge.converters`` included) imports what it builds
on from here, as JAX extensions import ``jax.extend``. Everything else under ``faxbridge._src`` is
private and free to change.

The pieces a target reads:

* :class:`SplitProgram`: the program split once: its :class:`FederatedForm` per computation
  (``computation``, or ``initialize`` and ``next``), the native reference and the state links;
  :func:`native_any_clients` writes the native reference for any number of clients too, for a
  target whose runtime may complete a round over some of the clients (``RuntimeResult.clients``);
* the form's data model (:class:`Stage`, :class:`Piece`, :class:`TensorSpec`,
  :class:`Aggregation`) and its one interpreter (:func:`interpret` with a :class:`Backend`,
  :func:`run_program` for the rounds of an iterative process);
* aggregations: :func:`define_aggregation` (an aggregation defined outside faxbridge, with its
  :class:`Stream`), :func:`aggregate` (bind one from an ``fb.*``-style function),
  :func:`aggregation_rule` (a rule by kind; kinds of installed packages are found through the
  entry-point group :data:`AGGREGATION_ENTRY_POINTS`), and the built-in aggregation primitives
  (``sum_p``, ``mean_p``, ``weighted_mean_p``, ``secure_sum_p``, ``max_p``, ``min_p``) a target's
  own tables are keyed by;
* the errors to raise (:class:`ExportError` while exporting, :class:`VerificationError` while
  running an export, :class:`RoundFailedError` when a round failed on the runtime after it
  started: a node dropped out) and :func:`describe`, which turns an equation's ``source_info`` into the user's
  ``file:line``, and :func:`user_name`, which names a computation's input or output leaf as the user
  indexes it (``params['w1']``);
* :mod:`jax_internals`: the few private JAX objects a lowering needs (primitives JAX gives no public
  handle on), each with its reason, so that no package reaches into ``jax._src`` itself.

What a target or runtime declares about itself, for the registry: :class:`Target` (with its
:class:`Option` s and an optional :class:`Demo`) or :class:`Runtime`, named by an entry point of
group ``faxbridge.targets`` / ``faxbridge.runtimes`` (or added with :func:`register_target` /
:func:`register_runtime`); :func:`importable` is the usual ``available`` probe of a runtime.
Progress is reported with :func:`emit` (``faxbridge.events`` lists who listens and how).

Signed exports, for a reader that runs an export somewhere ``fb.verify`` does not (a Flower node):
:func:`check_signature` (the check ``fb.verify(..., trust=PUB)`` makes, also on signature bytes
received apart from the export), :func:`read_signature` (an export's signature file, to forward)
and :func:`write_new` (create a key file, never replacing one).
"""

from faxbridge._src import jax_internals
from faxbridge._src.aggregations import (
  AGGREGATION_ENTRY_POINTS,
  AggregationRule,
  Stream,
  aggregation_rule,
  define_aggregation,
  max_p,
  mean_p,
  min_p,
  secure_sum_p,
  sum_p,
  weighted_mean_p,
)
from faxbridge._src.api import aggregate
from faxbridge._src.errors import (
  ExportError,
  FaxbridgeError,
  RoundFailedError,
  UnsupportedPrimitiveError,
  VerificationError,
)
from faxbridge._src.events import emit
from faxbridge._src.export import SplitProgram, native_any_clients
from faxbridge._src.export_reader import contained_file, read_export_manifest, read_json
from faxbridge._src.form import (
  Aggregation,
  Backend,
  Binding,
  FederatedForm,
  PerClientBackend,
  Piece,
  RaggedSpec,
  Stage,
  TensorSpec,
  client_values,
  interpret,
  number_of_clients,
  run_program,
)
from faxbridge._src.locations import describe, enclosing
from faxbridge._src.native_logs import without_start_up_noise
from faxbridge._src.ragged import batches_p, fold_p, own_length
from faxbridge._src.registry import (
  Demo,
  Option,
  Runtime,
  RuntimeResult,
  Target,
  importable,
  register_runtime,
  register_target,
  unregister_runtime,
  unregister_target,
)
from faxbridge._src.render import user_name
from faxbridge._src.serialization import strip_locations
from faxbridge._src.signing import check_signature, read_signature, write_new

__all__ = [
  "AGGREGATION_ENTRY_POINTS",
  "Aggregation",
  "AggregationRule",
  "Backend",
  "Binding",
  "Demo",
  "ExportError",
  "FaxbridgeError",
  "FederatedForm",
  "Option",
  "PerClientBackend",
  "Piece",
  "RaggedSpec",
  "RoundFailedError",
  "Runtime",
  "RuntimeResult",
  "SplitProgram",
  "Stage",
  "Stream",
  "Target",
  "TensorSpec",
  "UnsupportedPrimitiveError",
  "VerificationError",
  "aggregate",
  "aggregation_rule",
  "batches_p",
  "check_signature",
  "client_values",
  "contained_file",
  "define_aggregation",
  "describe",
  "emit",
  "enclosing",
  "fold_p",
  "importable",
  "interpret",
  "jax_internals",
  "max_p",
  "mean_p",
  "min_p",
  "native_any_clients",
  "number_of_clients",
  "own_length",
  "read_export_manifest",
  "read_json",
  "read_signature",
  "register_runtime",
  "register_target",
  "run_program",
  "secure_sum_p",
  "strip_locations",
  "sum_p",
  "unregister_runtime",
  "unregister_target",
  "user_name",
  "weighted_mean_p",
  "without_start_up_noise",
  "write_new",
]

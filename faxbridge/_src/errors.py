"""The few public error classes faxbridge raises, each about something the user can fix.

Every error that concerns user code names the user's ``file:line`` (taken from the JAX equation's
``source_info``), says what was found, and what to write instead.
"""

from __future__ import annotations


class FaxbridgeError(Exception):
  """Base class of every error faxbridge raises on purpose; never raised itself.

  Catch it to handle all of them; docs/troubleshooting.md shows each subclass with a real message
  and its fix.
  """


class PlacementError(FaxbridgeError, TypeError):
  """A federated value is used at the wrong placement (raised while tracing; also a TypeError).

  For example a JAX operation on a CLIENTS value outside ``fb.map``, a SERVER value passed to
  ``fb.map`` without ``fb.broadcast``, or CLIENTS inputs whose leading axes disagree.

  Example::

    PlacementError: JAX operation 'reduce_sum' was applied to a CLIENTS-placed value outside fb.map
    at placement_reduce.py:9 (total). Outside fb.map only SERVER values may be computed on. Write
    per-client work inside fb.map(fn, ...), and combine clients with an aggregation: fb.sum(x)
    instead of x.sum(axis=0), fb.mean(x) instead of x.mean(axis=0).
  """


class TraceError(FaxbridgeError, TypeError):
  """A computation cannot be traced into one static federated program (also a TypeError).

  For example Python control flow on a traced value, a traced value made a numpy array or a Python
  number (``np.asarray(x)``, ``float(x)``), or a static argument of a federated operation that it
  cannot take (``fb.secure_sum(x, bitwidth=0)``).

  Example::

    TraceError: clipped_mean: Python control flow depends on a traced value at trace_if.py:9
    (clipped_mean). A federated computation must be one static program: use jnp.where, lax.cond or
    lax.fori_loop instead of if/while on array values, or pass the value as a static Python number.
  """


class UnsupportedPrimitiveError(FaxbridgeError, NotImplementedError):
  """A JAX primitive has no rule in a converter's table (also a NotImplementedError).

  Raised by the plain-TF lowering (``faxbridge.converters.tf.to_tf`` and the ``tff`` target);
  docs/tf_primitives.md lists the primitives it supports.

  Example::

    UnsupportedPrimitiveError: the tf converter has no rule for JAX primitive 'cbrt' at
    unsupported_cbrt.py:8 (f); see docs/tf_primitives.md for the supported primitives
  """


class ExportError(FaxbridgeError):
  """A computation cannot be exported to the requested target (names the cause and location).

  For example a float64 example argument with ``jax_enable_x64`` off, an existing ``out_dir``
  without ``force=True``, client work that calls back into Python, or an op the target lacks.

  Example::

    ExportError: total: example argument leaf args[0] (arguments) has dtype float64 but
    jax_enable_x64 is off, so JAX would silently export it as float32; cast it to float32
    (x.astype(np.float32)) or enable jax_enable_x64 (...)
  """


class VerificationError(FaxbridgeError):
  """An export cannot be verified: tampered files, inputs that do not fit, a missing runtime.

  A mismatch of outputs is not raised by ``fb.verify`` (see the report's ``ok``); the report's
  ``raise_if_failed()`` raises it as this error.

  Example::

    VerificationError: input 'x' has shape (5, 3), the export's native program was made for (4, 3)
    (4 clients); verify runs it, so inputs must have its shapes (run_on_runtime runs the runtime
    alone for other client counts)
  """


class RoundFailedError(VerificationError):
  """A runtime started running the export and one of its invocations failed there: a node of a
  federation dropped out (died, or did not reply within the round timeout) and the round could
  not complete. A verification ran and did not pass, so ``faxbridge verify`` exits 1 (not 2, which
  says nothing ran). The message names the round, the node and the timeout, and where the state of
  the last completed round is kept to resume from.

  Example::

    RoundFailedError: the Flower run failed: round2: node client-0001 dropped out: no reply
    within the round timeout of 30 s. The outputs of initialize, round1 are kept in
    /tmp/faxbridge-flower-out-k2j3: resume from round 1 with fb.verify(..., runtime='flower',
    resume_from='/tmp/faxbridge-flower-out-k2j3') (...)
  """


"""The few public error classes faxbridge raises, each about something the user can fix.

Every error that concerns user code names the user's ``file:line`` (taken from the JAX equation's
``source_info``), says what was found, and what to write instead.
"""

from __future__ import annotations


class FaxbridgeError(Exception):
  """Base class of every error faxbridge raises on purpose."""


class PlacementError(FaxbridgeError, TypeError):
  """A federated value is used at the wrong placement.

  Example::

    PlacementError: fb.map received a SERVER-placed value as argument 1 at train.py:42 (round_fn).
    fb.map applies a per-client function to CLIENTS-placed values; broadcast the server value first:
    fb.map(fn, fb.broadcast(params), data)
  """


class TraceError(FaxbridgeError, TypeError):
  """A computation cannot be traced into one static federated program.

  Example::

    TraceError: round_fn: Python control flow depends on a traced value at train.py:30 (round_fn).
    A federated computation must be one static program: use jnp.where, lax.cond or lax.fori_loop...
  """


class UnsupportedPrimitiveError(FaxbridgeError, NotImplementedError):
  """A JAX primitive has no rule in a converter's table.

  Example::

    UnsupportedPrimitiveError: the tf converter has no rule for JAX primitive 'fft' at model.py:17 (f)
  """


class ExportError(FaxbridgeError):
  """A computation cannot be exported to the requested target (names the cause and location)."""


class VerificationError(FaxbridgeError):
  """An exported artifact failed verification: tampered files, a missing runtime, or a mismatch."""

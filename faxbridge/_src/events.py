"""Progress events: the library says what it is doing; whoever wants to know listens.

Modelled on ``jax.monitoring``: library code calls :func:`emit` at each step worth reporting
(tracing and splitting a program, lowering each piece, serializing the native reference, checking
files, starting a runtime, each round on a runtime and natively); a listener registered with
:func:`listen` receives every event of this process, in the order they happen, until its ``with``
block ends. The command line listens and prints the messages to a terminal; a test or a notebook
may collect them. Nothing is replaced or patched to report progress, so another user of the library
in the same process sees the library as it is.

Listeners are per process (not per thread): events that a runtime's helper process reports are
read back by the runtime's client and emitted here, in this process. With no listener, ``emit``
returns at once.

Event names are dotted, owner first (``export.split``, ``verify.runtime``, ``round``,
``stablehlo.lower``): the core's are listed in ``CORE_EVENTS``; a target declares its own in its
registry entry (``Target.steps``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# The events the core emits, by name: what each one means.
CORE_EVENTS = {
    "export.load": "loading a target's exporter",
    "export.split": "tracing and splitting the program",
    "export.native": "serializing the native reference (native/)",
    "verify.files": "checking the export's files against the manifest's sha256",
    "verify.load": "loading a runtime",
    "verify.runtime": "running the export on a runtime",
    "verify.native": "running the stored native program",
    "round": "one computation or round of a program, on a runtime or natively (fields: who, "
             "computation, round, rounds)",
}


@dataclasses.dataclass(frozen=True)
class Event:
  """One step: ``name`` (what kind of step), ``message`` (a line for a person), ``fields`` (the
  step's data, e.g. ``round=2, rounds=5``) and ``time`` (``time.perf_counter()`` when emitted)."""

  name: str
  message: str
  fields: dict[str, Any]
  time: float


Listener = Callable[[Event], None]

_listeners: tuple[Listener, ...] = ()  # replaced whole (never mutated), so emit reads it unlocked
_lock = threading.Lock()


def emit(name: str, message: str, **fields: Any) -> None:
  """Report one step to every listener of this process (nothing happens without one)."""
  listeners = _listeners
  if not listeners:
    return
  event = Event(name, message, fields, time.perf_counter())
  for listener in listeners:
    listener(event)


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[Listener]:
  """Call ``listener(event)`` for every event emitted in this process while inside.

  Example:
    >>> seen = []
    >>> with fb.events.listen(seen.append):
    ...   fb.export(total, x, target="stablehlo", out_dir="total_export")
    >>> [e.name for e in seen][:2]
    ['export.load', 'export.split']
  """
  global _listeners
  with _lock:
    _listeners = (*_listeners, listener)
  try:
    yield listener
  finally:
    with _lock:
      # Only this registration goes (the same function may be registered twice, nested).
      i = len(_listeners) - 1 - _listeners[::-1].index(listener)
      _listeners = _listeners[:i] + _listeners[i + 1:]


def listening() -> bool:
  """Whether any listener is registered: lets a caller skip work done only to report progress."""
  return bool(_listeners)


__all__ = ["CORE_EVENTS", "Event", "Listener", "emit", "listen", "listening"]

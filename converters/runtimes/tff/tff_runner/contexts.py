"""TFF's execution contexts: which one runs a program (native or test), and with how many clients.

TFF infers the number of clients of a call from its argument's CLIENTS-placed lists. When there are
none (a computation with only SERVER inputs that broadcasts, a parameterless ``initialize``), it
uses the context's ``default_num_clients``, which is 0 unless set: the computation would silently
run on no clients. So the count comes from the manifest then (``docs/tff_runner_protocol.md``,
"Number of clients"), and a context is made per default count.
"""

from __future__ import annotations

from typing import Any

import tensorflow_federated as tff

from .protocol import ProtocolError

SECURE_MARKER = "secure"


def scan_proto(message: Any, intrinsics: set[str], placements: set[str]) -> None:
  """Collects every intrinsic URI and placement URI in a Computation proto (types included;
  GraphDefs inside stay opaque Any bytes)."""
  name = message.DESCRIPTOR.name
  if name == "Intrinsic":
    intrinsics.add(message.uri)
  elif name == "Placement":
    placements.add(message.uri)
  for field, value in message.ListFields():
    if field.type == field.TYPE_MESSAGE:
      for item in value if field.label == field.LABEL_REPEATED else [value]:
        scan_proto(item, intrinsics, placements)


def default_clients(block: dict, from_inputs: int | None, uses_clients: bool,
                    where: str) -> int | None:
  """The ``default_num_clients`` a call needs, or None when any context serves.

  A CLIENTS-placed input fixes the count (TFF infers it from the list), whatever the manifest says:
  an export runs with any number of clients. Otherwise the signature block's ``clients`` does; a
  computation that never mentions CLIENTS needs no count.
  """
  if from_inputs is not None:
    return None
  declared = block.get("clients")
  if declared is not None:
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
      raise ProtocolError(f"{where}: manifest \"clients\" must be a positive integer, not "
                          f"{declared!r}")
    return declared
  if uses_clients:
    raise ProtocolError(
        f"{where}: the computation places values at CLIENTS, but no CLIENTS-placed input gives "
        "the number of clients and its manifest block has no \"clients\" field; TFF would run it "
        "on zero clients")
  return None


class Contexts:
  """Creates TFF's execution contexts lazily, once per (kind, default number of clients).

  Each context owns a worker_binary (started on first use, about a second), so calls whose
  argument fixes the number of clients reuse whichever context of their kind exists.
  """

  def __init__(self) -> None:
    self._made: dict[tuple[str, int], Any] = {}

  def get(self, kind: str, clients: int | None) -> Any:
    if clients is None:
      for (made_kind, _), context in self._made.items():
        if made_kind == kind:
          return context
      clients = 0
    key = (kind, clients)
    if key not in self._made:
      if kind == "native":
        self._made[key] = tff.backends.native.create_sync_local_cpp_execution_context(
            default_num_clients=clients)
      elif kind == "test":
        # The test context replaces secure sums by plain ones; the native one rejects them.
        self._made[key] = tff.backends.test.create_sync_test_cpp_execution_context(
            default_num_clients=clients)
      else:
        raise ValueError(f"unknown context kind {kind!r}")
    return self._made[key]

  def run(self, kind: str, clients: int | None, fn: Any, *args: Any) -> Any:
    with tff.framework.get_context_stack().install(self.get(kind, clients)):
      return fn(*args)


# Module-level on purpose: the workers must stay reachable until end_children() ends them, rather
# than depend on when garbage collection happens to run TFF's own cleanup.
CONTEXTS = Contexts()

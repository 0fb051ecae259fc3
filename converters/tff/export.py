"""``--target=tff``: federated_language computation protos (byte-compatible with TFF 0.87's
``tensorflow_federated.proto.v0``) with plain-TF (default) or XLA local computations.

Files: ``computation.pb`` (or ``initialize.pb`` and ``next.pb`` for an iterative process), a
readable ``computation.txt`` per computation, and the manifest blocks the TFF runner reads (see
``docs/tff_runner_protocol.md``): the type signature and every input and output leaf with its
name, placement, per-client shape, dtype and path in the parameter or result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import federated_language as fl

from faxbridge.converters.tff.compose import to_federated_computation
from faxbridge.converters.tff.local import LOCAL_FORMS
from faxbridge.errors import ExportError
from faxbridge.program import SplitProgram


def _write(comp, out: Path, stem: str) -> None:
  proto = comp.to_proto()
  (out / f"{stem}.pb").write_bytes(proto.SerializeToString(deterministic=True))
  block = comp.to_building_block()
  (out / f"{stem}.txt").write_text(
      f"{stem}: {comp.type_signature}\n\n{block.formatted_representation()}\n"
  )


def export_tff(split: SplitProgram, out: Path, local: str = "tensorflow", **options: Any) -> dict:
  """Write a ``.pb`` and a ``.txt`` per computation; return the manifest part: the local form and
  each computation's TFF type signature (the runner checks it against what it loads)."""
  if options:
    raise ExportError(f"the tff target takes no options {sorted(options)}")
  if local not in LOCAL_FORMS:
    raise ExportError(f"--local must be one of {LOCAL_FORMS}, got {local!r}")
  comps = {name: to_federated_computation(form, local) for name, form in split.forms.items()}
  if split.kind == "iterative_process":
    _check_iterative(comps["initialize"], comps["next"], split.name)
  part: dict[str, Any] = {"local": local}
  for name, comp in comps.items():
    _write(comp, out, name)
    part[name] = {"type_signature": str(comp.type_signature)}
  return part


def _check_iterative(init, nxt, name: str) -> None:
  """``tff.templates.IterativeProcess`` feeds element 0 of ``next``'s result back as the state."""
  state_type = init.type_signature.result
  param, result = nxt.type_signature.parameter, nxt.type_signature.result
  is_pair = isinstance(result, fl.StructType) and len(result) == 2
  if not is_pair or not result[0].is_equivalent_to(state_type) or \
      not param[0].is_equivalent_to(state_type):
    raise ExportError(
        f"{name}: next must take the state initialize makes ({state_type}) first and "
        f"return (new_state, metrics); got {nxt.type_signature}")

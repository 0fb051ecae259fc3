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

from faxbridge.computation import Computation
from faxbridge.converters.tff.compose import to_federated_computation
from faxbridge.converters.tff.local import LOCAL_FORMS
from faxbridge.errors import ExportError
from faxbridge.iterative import IterativeProcess
from faxbridge.split import FederatedForm, leaf_paths, split


def signature_block(form: FederatedForm, comp, *, skip_first_arg: bool = False) -> dict:
  """The manifest block of one computation: its TFF type and where every leaf sits."""
  in_paths = leaf_paths(form.in_tree)
  inputs = [
      {**b.to_json(), "path": p}
      for b, p in zip(form.inputs, in_paths)
      if not (skip_first_arg and p[0] == 0)
  ]
  # A tuple result is a struct of federated values; any other result is one federated value,
  # which paths step through: either way the leaf paths of the output pytree are the TFF paths.
  outputs = [{**b.to_json(), "path": p} for b, p in zip(form.outputs, leaf_paths(form.out_tree))]
  return {
      "type_signature": str(comp.type_signature),
      "inputs": inputs,
      "outputs": outputs,
      "stages": len(form.stages),
      "bytes_per_client": form.bytes_per_client(),
  }


def _write(comp, out: Path, stem: str) -> None:
  proto = comp.to_proto()
  (out / f"{stem}.pb").write_bytes(proto.SerializeToString(deterministic=True))
  block = comp.to_building_block()
  (out / f"{stem}.txt").write_text(
      f"{stem}: {comp.type_signature}\n\n{block.formatted_representation()}\n"
  )


def export_tff(program, example_args, out: Path, local: str = "tensorflow",
               **options: Any) -> dict:
  if options:
    raise ExportError(f"the tff target takes no options {sorted(options)}")
  if local not in LOCAL_FORMS:
    raise ExportError(f"--local must be one of {LOCAL_FORMS}, got {local!r}")
  local_form = local
  if isinstance(program, IterativeProcess):
    state = program.state_spec()
    init_form = split(program.initialize)
    next_form = split(program.next, state, *example_args)
    init = to_federated_computation(init_form, local_form)
    nxt = to_federated_computation(next_form, local_form)
    _check_iterative(init, nxt, program)
    _write(init, out, "initialize")
    _write(nxt, out, "next")
    return {"local": local_form,
            "initialize": signature_block(init_form, init),
            "next": signature_block(next_form, nxt, skip_first_arg=True)}
  if not isinstance(program, Computation):
    raise ExportError(f"cannot export {type(program).__name__}: expected fb.computation or "
                      "fb.IterativeProcess")
  form = split(program, *example_args)
  comp = to_federated_computation(form, local_form)
  _write(comp, out, "computation")
  return {"local": local_form, "computation": signature_block(form, comp)}


def _check_iterative(init, nxt, program) -> None:
  """``tff.templates.IterativeProcess`` feeds element 0 of ``next``'s result back as the state."""
  state_type = init.type_signature.result
  param, result = nxt.type_signature.parameter, nxt.type_signature.result
  is_pair = isinstance(result, fl.StructType) and len(result) == 2
  if not is_pair or not result[0].is_equivalent_to(state_type) or \
      not param[0].is_equivalent_to(state_type):
    raise ExportError(
        f"{program.__name__}: next must take the state initialize makes ({state_type}) first and "
        f"return (new_state, metrics); got {nxt.type_signature}")

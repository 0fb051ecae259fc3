"""A program to export, normalized once: a computation, or an iterative process's two computations.

Every target, the manifest and verify read a :class:`SplitProgram`: its federated forms by
computation name (``computation``, or ``initialize`` and ``next``), how the server state flows
between them, and the computations with the argument specs that ``jax.export`` serializes as the
native reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from faxbridge.computation import Computation
from faxbridge.errors import ExportError
from faxbridge.form import FederatedForm, state_links
from faxbridge.iterative import IterativeProcess
from faxbridge.split import split

Program = Computation | IterativeProcess


@dataclasses.dataclass(frozen=True)
class SplitProgram:
  name: str
  kind: str  # "computation" or "iterative_process"
  forms: dict[str, FederatedForm]
  native: dict[str, tuple[Computation, tuple]]  # computation name -> (computation, arg specs)
  state: dict[str, list[dict[str, str]]] | None = None  # see faxbridge.form.state_links

  def blocks(self) -> dict[str, dict]:
    """The manifest block of each computation: the leaves a caller passes and gets back (for
    ``next``, the inputs after the state), the clients it was traced for, its stages and traffic."""
    out = {}
    for name, form in self.forms.items():
      skip_state = name == "next"
      out[name] = {
          "clients": form.clients,
          "inputs": [b.to_json() for b in form.inputs if not (skip_state and b.path[0] == 0)],
          "outputs": [b.to_json() for b in form.outputs],
          "stages": len(form.stages),
          "bytes_per_client": form.bytes_per_client(),
      }
    return out


def _specs(args: Sequence[Any]) -> tuple:
  return tuple(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tuple(args)))


def split_program(program: Program, example_args: Sequence[Any]) -> SplitProgram:
  """Split ``program`` for the signature of ``example_args`` (for an iterative process: next's
  arguments after the state).

  Raises:
    ExportError: not a computation or iterative process, a program that cannot be split, or a
      ``next`` whose state does not match ``initialize``'s.
  """
  specs = _specs(example_args)
  if isinstance(program, IterativeProcess):
    state = program.state_spec()
    init, nxt = split(program.initialize), split(program.next, state, *specs)
    try:
      links = state_links(init, nxt)
    except ValueError as e:
      raise ExportError(f"{program.__name__}: {e}") from None
    return SplitProgram(program.__name__, "iterative_process", {"initialize": init, "next": nxt},
                        {"initialize": (program.initialize, ()),
                         "next": (program.next, (state, *specs))}, links)
  if isinstance(program, Computation):
    return SplitProgram(program.__name__, "computation",
                        {"computation": split(program, *specs)},
                        {"computation": (program, specs)})
  raise ExportError(f"cannot export {type(program).__name__}: expected fb.computation or "
                    "fb.IterativeProcess")


__all__ = ["Program", "SplitProgram", "split_program"]

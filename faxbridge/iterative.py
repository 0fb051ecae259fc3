"""``fb.IterativeProcess``: an ``initialize`` and a ``next`` computation, as TFF's template has them.

``initialize()`` takes no arguments and returns the server state; ``next(state, *client_args)``
returns ``(new_state, metrics)`` (or just the new state). Exported to TFF, they become the two
computations ``tff.templates.IterativeProcess`` is built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from faxbridge.computation import Computation
from faxbridge.placements import SERVER


@dataclasses.dataclass(frozen=True)
class IterativeProcess:
  initialize: Computation
  next: Computation

  def __post_init__(self):
    if self.initialize.in_placements:
      raise TypeError("IterativeProcess: initialize must take no arguments")
    if not self.next.in_placements or self.next.in_placements[0] is not SERVER:
      raise TypeError("IterativeProcess: next's first argument must be the SERVER-placed state")

  @property
  def __name__(self) -> str:
    return getattr(self.next, "__name__", "iterative_process")

  def state_spec(self) -> Any:
    """The shapes and dtypes of the server state (``initialize``'s output)."""
    return jax.eval_shape(self.initialize)

  def run(self, rounds: int, *client_args) -> tuple[Any, list]:
    """``rounds`` rounds natively from ``initialize()``: the final state and each round's output."""
    state, history = self.initialize(), []
    for _ in range(rounds):
      out = self.next(state, *client_args)
      state = out[0] if isinstance(out, tuple) else out
      history.append(out)
    return state, history

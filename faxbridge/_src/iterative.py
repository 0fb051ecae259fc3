"""``fb.IterativeProcess``: an ``initialize`` and a ``next`` computation, as TFF's template has them.

``initialize()`` takes no arguments and returns the server state; ``next(state, *client_args)``
returns ``(new_state, metrics)`` (or just the new state). Exported to TFF, they become the two
computations ``tff.templates.IterativeProcess`` is built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from faxbridge._src.computation import Computation
from faxbridge._src.placements import SERVER


@dataclasses.dataclass(frozen=True)
class IterativeProcess:
  """``initialize`` and ``next``: ``state_0 = initialize()``, ``(state_{t+1}, metrics_t) =
  next(state_t, *client_args)``.

  ``initialize`` takes no arguments; ``next``'s first argument is the SERVER-placed state, and it
  returns the new state, or ``(state, metrics)``. :func:`faxbridge._src.export` writes both
  computations and how the state feeds back; :func:`faxbridge._src.verify` runs ``rounds`` rounds.

  Example:
    >>> init = fb.computation(lambda: np.zeros(2, np.float32))
    >>> @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
    ... def step(state, x):
    ...   return state + fb.mean(x), fb.sum(x)
    >>> process = fb.IterativeProcess(init, step)
    >>> state, history = process.run(3, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    >>> state.tolist(), history[-1][1].tolist()
    ([6.0, 9.0], [4.0, 6.0])
  """

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

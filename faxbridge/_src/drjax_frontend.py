"""``fb.from_drjax``: a function written against drjax's API, as a faxbridge computation.

drjax's jaxpr cannot be translated after the fact: its ``map_fn`` is a plain ``vmap`` and leaves
no boundary, so per-client work is indistinguishable from server work. The translation therefore
happens at the API level: while the computation traces the user's function, the attributes of the
``drjax`` module are swapped for faxbridge equivalents, so every ``drjax.broadcast`` / ``map_fn`` /
``reduce_*`` call binds faxbridge's primitives directly:

======================================  =========================================================
drjax                                   faxbridge
======================================  =========================================================
``broadcast(x)``                        ``fb.broadcast(x)``
``map_fn(f, (a, b))`` / ``map_fn(f, a)``  ``fb.map(f, a, b)`` / ``fb.map(f, a)``; SERVER values
                                        ``f`` captures become ``fb.broadcast`` arguments
``reduce_sum(x)``                       ``fb.sum(x)``
``reduce_mean(x)``                      ``fb.mean(x)``
``reduce_weighted_mean(x, w)``          per leaf: ``fb.weighted_mean(x, w)`` for one weight per
                                        client that does not widen ``x``'s dtype, else drjax's
                                        own ``fb.sum(map(x * w)) / fb.sum(w)``
======================================  =========================================================

A function already decorated with ``drjax.program`` runs as it is: its own patching step is
swapped for a check that its placement is the one being translated, so our functions stay in
place (the same holds for drjax programs it calls).
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from faxbridge._src import api
from faxbridge._src.computation import Computation
from faxbridge._src.errors import PlacementError, TraceError
from faxbridge._src.jax_internals import is_user_filename
from faxbridge._src.locations import traceback_location
from faxbridge._src.placements import CLIENTS, SERVER, Placement

PyTree = Any

# The drjax functions a program may call, and those this module translates.
_TRANSLATED = ("broadcast", "map_fn", "reduce_sum", "reduce_mean", "reduce_weighted_mean")
# Serializes the swap: the drjax module is process-global (drjax's own program does the same).
_LOCK = threading.RLock()
_FAXBRIDGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _drjax():
  try:
    import drjax
  except ImportError as e:  # pragma: no cover - drjax is in the core environment
    raise ImportError("fb.from_drjax needs the drjax package (pip install drjax)") from e
  return drjax


def _user_line() -> str:
  """`` at file:line (function)`` of the innermost caller outside faxbridge, drjax and JAX."""
  drjax_dir = os.path.dirname(os.path.abspath(_drjax().__file__)) + os.sep
  for frame in reversed(traceback.extract_stack()):
    name = os.path.abspath(frame.filename)
    if name.startswith((_FAXBRIDGE_DIR, drjax_dir)) or frame.filename.startswith("<"):
      continue
    if is_user_filename(frame.filename) and "contextlib" not in frame.filename:
      return f" at {frame.filename}:{frame.lineno} ({frame.name})"
  return ""


def _unsupported(feature: str, instead: str, where: str | None = None) -> TraceError:
  return TraceError(
      f"fb.from_drjax does not support {feature}{where or _user_line()}: {instead}"
  )


def _program_placements(fn: Callable) -> dict[str, int] | None:
  """The ``placements`` of a function decorated with ``drjax.program``, or None."""
  code = getattr(fn, "__code__", None)
  if code is None or fn.__closure__ is None or "placed_computations" not in code.co_freevars:
    return None
  cells = dict(zip(code.co_freevars, fn.__closure__))
  computations = cells["placed_computations"].cell_contents
  return dict(getattr(computations, "_placements_to_n_elements", {})) or None


class _Translation:
  """The drjax API as faxbridge calls, for one placement (name and number of clients)."""

  def __init__(self, placement: str, clients: int | None):
    self.placement = placement
    self.clients = clients

  # -- the translated API (signatures as drjax 0.2.1's) -----------------------------------------
  def broadcast(self, x: PyTree, *, mesh=None) -> PyTree:
    """``[x, ..., x]``: ``fb.broadcast``."""
    self._refuse_mesh("broadcast", mesh)
    return api.broadcast(x)

  def map_fn(self, fn: Callable, arg: PyTree, *, mesh=None) -> PyTree:
    """``[fn(a_1), ..., fn(a_n)]``, a tuple ``arg`` unpacked into ``fn``'s arguments: ``fb.map``.

    drjax maps with ``vmap``, so ``fn`` may capture values of the enclosing program, which every
    client then sees whole. fb.map keeps the boundary explicit instead: captured SERVER values
    travel as ``fb.broadcast`` arguments (a captured CLIENTS value is a PlacementError there).
    """
    self._refuse_mesh("map_fn", mesh)
    args = arg if isinstance(arg, tuple) else (arg,)
    leaves, in_tree = jax.tree.flatten(args)
    per_client = [jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v)) for v in leaves]
    # The same check fb.map makes, done first so that tracing fn below sees valid shapes.
    api.clients_of("map", leaves)
    try:
      closed, out_shape = jax.make_jaxpr(
          lambda *flat: fn(*jax.tree.unflatten(in_tree, list(flat))), return_shape=True
      )(*per_client)
    except NameError as e:
      if "axis name" not in str(e):
        raise
      raise _unsupported(
          f"collectives over drjax's placement axis '{self.placement}' inside drjax.map_fn",
          "per-client work sees one client only; combine clients outside the map with "
          f"drjax.reduce_sum / reduce_mean / reduce_weighted_mean (JAX: {e})",
          traceback_location(e),
      ) from e
    captured = [c for c in closed.consts if isinstance(c, jax.core.Tracer)]
    if not captured:
      return api.map(fn, *args)
    # Replay the traced per-client jaxpr with the captured values as explicit arguments.
    is_captured = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    out_tree = jax.tree.structure(out_shape)

    def explicit(*flat):
      flat_args, caps = flat[: len(leaves)], iter(flat[len(leaves):])
      consts = [next(caps) if cap else c for c, cap in zip(closed.consts, is_captured)]
      out = jax.core.eval_jaxpr(closed.jaxpr, consts, *flat_args)
      return jax.tree.unflatten(out_tree, out)

    return api.map(explicit, *leaves, *api.broadcast(captured))

  def reduce_sum(self, x: PyTree) -> PyTree:
    """``sum_i x_i``: ``fb.sum``."""
    return api.sum(x)

  def reduce_mean(self, x: PyTree) -> PyTree:
    """``(1/n) sum_i x_i``: ``fb.mean`` (floating values; drjax 0.2.1 cannot lower integers)."""
    return api.mean(x)

  def reduce_weighted_mean(self, x: PyTree, w: PyTree) -> PyTree:
    """``sum_i w_i x_i / sum_i w_i`` per leaf, ``w`` of ``x``'s tree structure (as drjax).

    A weight of one scalar per client that does not widen the value's dtype is
    ``fb.weighted_mean`` (TFF's weighted ``federated_mean``); any other weight (one per element,
    or a wider dtype) is computed as drjax computes it, ``fb.sum(x * w) / fb.sum(w)``, with the
    product as client work, so the result's dtype is drjax's.
    """

    def leaf(v, wv):
      v, wv = jnp.asarray(v), jnp.asarray(wv)
      n = jnp.shape(v)[0] if jnp.ndim(v) else None
      if (wv.shape == (n,) and jnp.issubdtype(v.dtype, jnp.inexact)
          and jnp.result_type(v, wv) == v.dtype):
        return api.weighted_mean(v, wv)
      weighted = api.map(lambda vi, wi: vi * wi, v, wv)
      return api.sum(weighted) / api.sum(wv)

    return jax.tree.map(leaf, x, w)

  # -- drjax.program inside the translated function ---------------------------------------------
  def replace_api(self, module, placed_computations, prim_computations, *, placement: str):
    """Stands in for drjax's patching step: a ``drjax.program`` called while translating keeps
    our functions in place, provided it has the same placement."""
    del module, prim_computations
    sizes = dict(getattr(placed_computations, "_placements_to_n_elements", {}))
    n = sizes.get(placement)
    clients = self.clients if self.clients is not None else api.traced_clients()
    if placement != self.placement or (clients is not None and n != clients):
      raise PlacementError(
          f"fb.from_drjax translates one placement, '{self.placement}' with {clients} "
          f"clients, but a "
          f"drjax.program with placements={{'{placement}': {n}}} was called{_user_line()}; "
          "nested or additional placements have no faxbridge equivalent: use one placement "
          "throughout (faxbridge has SERVER and CLIENTS)."
      )

  def _refuse_mesh(self, op: str, mesh) -> None:
    if mesh is not None:
      raise _unsupported(
          f"drjax.{op}(mesh=...)",
          "pass the mesh to fb.from_drjax(fn, mesh=...) instead; CLIENTS values are sharded "
          "along its axis named 'clients'.",
      )

  def unsupported(self, name: str) -> Callable:
    def refuse(*args, **kwargs):
      del args, kwargs
      raise _unsupported(
          f"drjax.{name}",
          f"it has no faxbridge translation; the translated API is drjax.{', drjax.'.join(_TRANSLATED)}.",
      )

    return refuse


@contextlib.contextmanager
def _swapped(translation: _Translation) -> Iterator[None]:
  """The drjax module's public functions replaced by ``translation``'s, restored after."""
  drjax = _drjax()
  from drjax._src import api as drjax_api  # where drjax.program looks up its patching step

  swaps = [(drjax_api, "_replace_api", translation.replace_api)]
  for name in dir(drjax):
    value = getattr(drjax, name)
    if name.startswith("_") or name == "program" or not callable(value) \
        or isinstance(value, type):
      continue
    impl = getattr(translation, name) if name in _TRANSLATED else translation.unsupported(name)
    swaps.append((drjax, name, impl))
  with _LOCK:
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
      for module, name, impl in swaps:
        setattr(module, name, impl)
      yield
    finally:
      for module, name, value in saved:
        setattr(module, name, value)


def _placement(p: Placement | str, name: str) -> Placement:
  if isinstance(p, Placement):
    return p
  if isinstance(p, str) and p.lower() == "server":
    return SERVER
  if isinstance(p, str) and p.lower() in ("clients", name.lower()):
    return CLIENTS
  raise TypeError(
      f"fb.from_drjax: in_placements takes fb.SERVER, fb.CLIENTS, 'server' or "
      f"'{name}', got {p!r}"
  )


def from_drjax(
    fn: Callable,
    *,
    clients: int | None = None,
    in_placements: Sequence[Placement | str] = (),
    mesh: jax.sharding.Mesh | None = None,
) -> Computation:
  """A function written with drjax's API, as an :func:`fb.computation` with the same boundaries.

  ``drjax.broadcast`` becomes ``fb.broadcast``, ``drjax.map_fn`` ``fb.map``, ``reduce_sum`` /
  ``reduce_mean`` / ``reduce_weighted_mean`` ``fb.sum`` / ``fb.mean`` / ``fb.weighted_mean``, so
  the result splits, exports and verifies like any computation. ``fn`` may be the plain function
  or one decorated with ``drjax.program(placements={name: n})`` (then ``clients`` defaults to
  ``n``). Values are those of the same function under ``drjax.program``, and so are gradients.

  Args:
    fn: a function calling ``drjax.broadcast``, ``drjax.map_fn`` and ``drjax.reduce_*``.
    clients: the number of clients (drjax's placement size); inferred from CLIENTS inputs or
      from ``fn``'s ``drjax.program`` when None.
    in_placements: one per positional argument: ``fb.SERVER`` / ``fb.CLIENTS``, or the strings
      ``'server'`` / ``'clients'`` (or the drjax placement's own name).
    mesh: as for :func:`fb.computation`.

  Raises:
    TraceError: (when traced) a drjax feature without a faxbridge translation: ``mesh=`` on a
      drjax call, collectives over the placement axis inside ``map_fn``, any other drjax
      function; the message names it and the user's ``file:line``.
    PlacementError: (when traced) a ``drjax.program`` of another placement called inside, or
      ``clients`` disagreeing with ``fn``'s ``drjax.program``.

  Example:
    >>> @drjax.program(placements={"clients": 2})
    ... def shifted_mean(s, x):
    ...   return drjax.reduce_mean(drjax.map_fn(lambda s, x: x + s, (drjax.broadcast(s), x)))
    >>> comp = fb.from_drjax(shifted_mean, in_placements=("server", "clients"))
    >>> comp(np.float32(10.0), np.array([1.0, 3.0], np.float32)).tolist()
    12.0
  """
  sizes = _program_placements(fn)
  name = "clients"
  if sizes is not None:
    if len(sizes) != 1:  # drjax.program itself refuses this; kept for a clear message
      raise PlacementError(f"fb.from_drjax translates one drjax placement, got {sizes}")
    ((name, n),) = sizes.items()
    if clients is not None and clients != n:
      raise PlacementError(
          f"fb.from_drjax: clients={clients}, but {getattr(fn, '__name__', fn)!r} is a "
          f"drjax.program with placements={{'{name}': {n}}}"
      )
    clients = n
  placements = tuple(_placement(p, name) for p in in_placements)
  translation = _Translation(name, clients)

  def translated(*args: Any) -> Any:
    with _swapped(translation):
      return fn(*args)

  for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
    if hasattr(fn, attr):
      setattr(translated, attr, getattr(fn, attr))
  # Argument names come from the user's fn (inspect.signature follows __wrapped__).
  translated.__wrapped__ = getattr(fn, "__wrapped__", fn)  # type: ignore[attr-defined]
  return Computation(translated, clients=clients, in_placements=placements, mesh=mesh)

"""``fb.computation``: tracing, placement checking, caching and native (sharded XLA) execution."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util

from faxbridge._src import execution, jax_internals, placements
from faxbridge._src.api import federated_context, in_federated_trace
from faxbridge._src.errors import PlacementError, TraceError
from faxbridge._src.execution import Strategy
from faxbridge._src.locations import describe, traceback_location
from faxbridge._src.placements import CLIENTS, Placement

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TracedComputation:
  """A federated computation traced for one input signature (:meth:`Computation.trace`).

  ``pretty()`` prints its jaxpr with every value's placement: ``{f32[3]}@CLIENTS`` is one
  ``f32[3]`` per client, ``f32[3]@SERVER`` one on the server.

  Attributes:
    jaxpr: the whole computation as a ClosedJaxpr; federated operations are faxbridge primitives
      and every ``fb.map`` keeps its per-client function as a sub-jaxpr.
    in_placements / out_placements: one placement per flat input / output leaf.
    in_tree / out_tree: pytree structures of the (positional) inputs and of the output.
    clients: the number of clients.
    var_placements: the placement of every variable of ``jaxpr`` (for printing and splitting).
  """

  jaxpr: jcore.ClosedJaxpr
  in_placements: tuple[Placement, ...]
  out_placements: tuple[Placement, ...]
  in_tree: Any
  out_tree: Any
  clients: int | None
  var_placements: dict = dataclasses.field(repr=False, compare=False)
  name: str = "computation"
  arg_names: tuple[str, ...] = ()

  def pretty(self) -> str:
    """The jaxpr as text with the placement of every variable shown (``{f32[3]}@CLIENTS``)."""
    from faxbridge._src.pretty import pretty_traced

    return pretty_traced(self)

  def __str__(self) -> str:
    return self.pretty()


def _caller() -> str:
  """`` at file:line (function)`` of the user code that called or traced the computation."""
  return describe(source_info_util.current())


def arg_names(fn: Callable, count: int) -> list[str]:
  """The user's names for the positional parameters (``params``, ``data``...), else ``arg{i}``."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    params = []
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return positional[:count] if len(positional) >= count else [f"arg{i}" for i in range(count)]


# JAX's errors for a traced value used where Python needs a concrete one. While the computation is
# traced its arguments (and every value of an fb.map'd function) are abstract: the whole program
# is traced once, so nothing can be read back into Python or numpy.
_CONCRETE_VALUE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                          jax.errors.TracerIntegerConversionError)
_STATIC_INSTEAD = ("The computation is traced once into one static program, so its values are abstract: "
                   "{fix}, or make a value that must be concrete a static Python constant the "
                   "function closes over (e.g. functools.partial(fn, lr=0.1)) instead of an "
                   "argument.")


def _concrete_value_message(e: Exception) -> str:
  """What the user did (by JAX's error class), the user's file:line and what to write instead."""
  at = traceback_location(e)
  if isinstance(e, jax.errors.TracerBoolConversionError):
    return (f"Python control flow depends on a traced value{at}. A federated computation must be "
            "one static program: use jnp.where, lax.cond or lax.fori_loop instead of if/while on "
            "array values, or pass the value as a static Python number.")
  if isinstance(e, jax.errors.TracerArrayConversionError):
    return (f"a traced value is converted to a numpy array (np.asarray, np.array or a numpy "
            f"function){at}. " + _STATIC_INSTEAD.format(
                fix="compute with jax.numpy instead (jnp.asarray(x), jnp.sum(x))"))
  return (f"a traced value is converted to a Python number (float(x), int(x), x.item(), a shape "
          f"or an index){at}. " + _STATIC_INSTEAD.format(
              fix="keep it a JAX array (x.astype(jnp.float32), jnp operations)"))


def _flat_placements(in_placements: Sequence[Placement], args: Sequence) -> list[Placement]:
  out = []
  for place, arg in zip(in_placements, args):
    out += [place] * len(jax.tree.leaves(arg))
  return out


def _shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


class Computation:
  """A federated computation: call it to run natively; ``trace`` it to see its federated jaxpr.

  Made by :func:`computation`. Calling it traces ``fn`` once per input signature (pytree
  structure, shapes, dtypes), checks every placement, and runs it as one ``jax.jit``-compiled XLA
  program, with CLIENTS values sharded over a mesh axis named ``clients`` when there is one, and
  its maps executed with the execution strategy in force (``strategy_for`` says which). It
  composes with JAX transformations (``jax.grad(comp)``, ``jax.vmap(comp)``), and is what
  :func:`faxbridge._src.split`, :func:`faxbridge._src.export` and :class:`faxbridge.IterativeProcess` take.

  Example:
    >>> @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
    ... def shifted_mean(s, x):
    ...   return fb.mean(fb.map(lambda s, x: x + s, fb.broadcast(s), x))
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)  # 2 clients
    >>> shifted_mean(np.float32(10.0), x).tolist()
    [12.0, 13.0]
    >>> shifted_mean.trace(np.float32(10.0), x).out_placements
    (fb.SERVER,)
  """

  def __init__(
      self,
      fn: Callable,
      *,
      clients: int | None = None,
      in_placements: Sequence[Placement] = (),
      mesh: jax.sharding.Mesh | None = None,
      strategy: Strategy | None = None,
  ):
    for p in in_placements:
      if not isinstance(p, Placement):
        raise TypeError(f"in_placements takes fb.SERVER or fb.CLIENTS, got {p!r}")
    self.fn = fn
    self.clients = clients
    self.in_placements = tuple(in_placements)
    self.mesh = mesh
    self.strategy = None if strategy is None else execution.validate(strategy)
    self._signatures: dict = {}
    self.__name__: str = getattr(fn, "__name__", type(fn).__name__)  # update_wrapper refines it
    # Name and docstring only: copying fn's __dict__ would copy another Computation's own `fn`
    # (fb.computation(jax.grad(comp))) over this one's.
    functools.update_wrapper(self, fn, updated=())

  # -- tracing -------------------------------------------------------------------------------
  def _check_args(self, args: Sequence, where: str | None = None) -> int | None:
    """The number of clients of ``args``, or a PlacementError saying why they are not this
    computation's inputs, located at ``where`` (default: the user's line that called or traced it;
    see :func:`check_inputs`)."""
    where = _caller() if where is None else where
    if len(args) != len(self.in_placements):
      raise PlacementError(
          f"{self.__name__}{where} takes {len(self.in_placements)} positional arguments (one "
          f"per entry of in_placements), got {len(args)}"
      )
    n = self.clients
    for i, (place, arg) in enumerate(zip(self.in_placements, args)):
      if place is not CLIENTS:
        continue
      for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
        shape = _shape_of(leaf)
        if not shape or (n is not None and shape[0] != n):
          raise PlacementError(
              f"argument {i}{jax.tree_util.keystr(path)} of {self.__name__}{where} is "
              "CLIENTS-placed, so "
              f"its leading axis is the clients axis{'' if n is None else f' (size {n})'}; got "
              f"shape {shape}"
          )
        n = shape[0]
    if n == 0:
      raise PlacementError(f"{self.__name__}{where}: the CLIENTS-placed inputs hold no client")
    return n

  def _wrapped(self, clients: int | None, mesh) -> Callable:
    def run(*args):
      with federated_context(clients, mesh):
        return self.fn(*args)

    return run

  def trace(self, *args: PyTree) -> TracedComputation:
    """Trace for the signature of ``args`` (arrays or ``jax.ShapeDtypeStruct`` pytrees).

    Raises:
      PlacementError: a value used at the wrong placement, or CLIENTS inputs whose leading axes
        disagree (with each other or with ``clients=``); names the user's ``file:line``.
      TraceError: Python control flow that depends on a traced value.
    """
    mesh = self._resolve_mesh()
    with _as_ambient(mesh):
      return self._trace(args, mesh)

  def _trace(self, args: Sequence, mesh) -> TracedComputation:
    clients = self._check_args(args)
    try:
      closed, out_shape = jax.make_jaxpr(self._wrapped(clients, mesh), return_shape=True)(*args)
    except _CONCRETE_VALUE_ERRORS as e:
      raise TraceError(f"{self.__name__}: {_concrete_value_message(e)}") from e
    in_places = _flat_placements(self.in_placements, args)
    out_places, env = placements.infer(closed.jaxpr, in_places)
    return TracedComputation(
        jaxpr=closed,
        in_placements=tuple(in_places),
        out_placements=tuple(out_places),
        in_tree=jax.tree.structure(tuple(args)),
        out_tree=jax.tree.structure(out_shape),
        clients=clients,
        var_placements=env,
        name=self.__name__,
        arg_names=tuple(arg_names(self.fn, len(args))),
    )

  # -- native execution ------------------------------------------------------------------------
  def _resolve_mesh(self):
    if self.mesh is not None:
      return _auto_axes(self.mesh)
    try:
      ambient = jax.sharding.get_mesh()
    except ValueError:  # under an outer transformation only the abstract mesh is known
      return None
    return None if ambient.empty else _auto_axes(ambient)

  def _executable(self, args: Sequence, mesh):
    # The cache key is built on every call, so it reads attributes only (building avals and
    # promoting dtypes cost several times JAX's own dispatch).
    leaves, tree = jax.tree.flatten(tuple(args))
    # Called while another federated computation is traced, this one's primitives must land in
    # that jaxpr as they are (for trace, split, export): no strategy then; nor for an export's
    # stored native program.
    plain = in_federated_trace() or execution.forced_plain()
    strategy = None if plain else execution.requested(self.strategy)
    key = (tree, tuple(map(_leaf_signature, leaves)), mesh, strategy)
    entry = self._signatures.get(key)
    if entry is None:
      traced = self._trace(args, mesh)
      resolved = "vmap" if strategy is None else execution.resolve(
          strategy, traced.jaxpr.jaxpr, traced.clients, _clients_devices(mesh))
      if resolved == "vmap" or any(isinstance(c, jax.core.Tracer) for c in traced.jaxpr.consts):
        run = self._wrapped(traced.clients, mesh)
      else:
        run = _streamed(traced, int(resolved[1]), mesh)
      sharded = mesh is not None and "clients" in mesh.axis_names
      if sharded:
        _check_even(traced, mesh)
      jitted = jax.jit(run)
      # XLA options apply to a top-level jit only (JAX refuses them on a nested one), so a call
      # staged into the user's own jit (or scan, checkpoint) runs `jitted`, inlined into theirs;
      # under grad or vmap alone, `top` still runs as a top-level jit.
      options = execution.compiler_options() if mesh is not None else {}
      top = jax.jit(run, compiler_options=options) if options else jitted
      entry = self._signatures[key] = _Executable(traced, jitted, top, sharded, resolved)
    return entry

  def strategy_for(self, *args: PyTree) -> str | tuple[str, int]:
    """How a native call with ``args`` executes: ``"vmap"`` or ``("stream", k)``.

    What ``"auto"`` picked here (backend, sizes), or the strategy set explicitly; see
    :func:`faxbridge.execution_strategy`.
    """
    mesh = self._resolve_mesh()
    with _as_ambient(mesh):
      return self._executable(args, mesh).strategy

  def lower(self, *args: PyTree) -> jax.stages.Lowered:
    """This computation lowered for ``args`` (arrays or ``jax.ShapeDtypeStruct`` pytrees) as a
    call compiles it: its strategy, its inputs placed on its mesh as a call places them, and
    :func:`faxbridge.compiler_options`. As with ``jax.jit(f).lower``, ``.compile()`` gives the
    executable and its ``memory_analysis()``.

    Example:
      >>> @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
      ... def total(s, x):
      ...   return fb.sum(fb.map(jnp.multiply, fb.broadcast(s), x))
      >>> x = jax.ShapeDtypeStruct((1000, 64), jnp.float32)
      >>> exe = total.lower(jax.ShapeDtypeStruct((), jnp.float32), x).compile()
      >>> exe.memory_analysis().output_size_in_bytes
      256
    """
    mesh = self._resolve_mesh()
    with _as_ambient(mesh):
      run = self._executable(args, mesh)
      return run.top.lower(*_placed(run.traced, mesh, args) if run.sharded else args)

  def __call__(self, *args: PyTree) -> PyTree:
    mesh = self._resolve_mesh()
    if mesh is None:  # the common case, kept short: it runs on every call
      return self._executable(args, None).jitted(*args)
    if _traced_under_explicit_mesh(mesh, args):
      return _in_auto_axes(self, args, mesh)
    with _as_ambient(mesh):
      run = self._executable(args, mesh)
      jitted = run.jitted if jax_internals.inside_a_staged_trace() else run.top
      return jitted(*_placed(run.traced, mesh, args)) if run.sharded else jitted(*args)


class _Executable(NamedTuple):
  """A computation's native program for one input signature (``Computation._executable``)."""

  traced: TracedComputation
  jitted: Callable  # jax.jit of the program
  top: Callable  # the same with faxbridge's XLA options, for calls no outer trace stages in
  sharded: bool  # its CLIENTS inputs are split over a mesh's ``clients`` axis
  strategy: str | tuple[str, int]  # what the execution strategy resolved to


def _traced_under_explicit_mesh(mesh, args: Sequence) -> bool:
  """Whether an outer ``jax.jit`` traces this call (``args`` are tracers) with ``mesh``'s axes in
  force as Explicit ones (``jax.set_mesh`` of a ``jax.make_mesh`` mesh). Called eagerly,
  ``_as_ambient`` puts the computation's Auto copy in force instead. The mesh is read first: it
  is the cheap test, and the common call has none."""
  ctx = jax.sharding.get_abstract_mesh()
  if ctx.empty or not ctx.explicit_axes or ctx.axis_names != mesh.axis_names:
    return False
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def _in_auto_axes(comp: Computation, args: Sequence, mesh) -> PyTree:
  """A call traced by an outer ``jax.jit`` under an Explicit mesh, through
  ``jax.sharding.auto_axes``: inside, the mesh's axes are Auto and the computation places its
  values as on an Auto mesh (CLIENTS values split over ``clients``, model shardings kept by the
  compiler); its results come back typed CLIENTS over ``clients``, SERVER replicated (Explicit
  typing needs one sharding per result before the call; a model-sharded SERVER result is
  resharded, the work inside is not)."""
  P = jax.sharding.PartitionSpec
  shapes = [jax.ShapeDtypeStruct(np.shape(x), jax.typeof(x).dtype) for x in jax.tree.leaves(args)]
  placed = comp._trace(jax.tree.unflatten(jax.tree.structure(tuple(args)), shapes), None)
  out_specs = jax.tree.unflatten(placed.out_tree, [P("clients") if p is CLIENTS else P()
                                                   for p in placed.out_placements])

  def inside(*args):
    return comp._executable(args, mesh).jitted(*args)

  return jax.sharding.auto_axes(inside, out_sharding=out_specs)(*args)


def check_inputs(comp: Computation, args: Sequence, where: str = "") -> None:
  """The check a call of ``comp`` with ``args`` makes first (their number, the clients axis of the
  CLIENTS-placed ones), located at ``where`` instead of the calling line: the command line calls
  with what a module's ``example_inputs()`` returned, and its own line is no use to the user.

  Raises:
    PlacementError: ``args`` are not ``comp``'s inputs.
  """
  comp._check_args(args, where)


def _clients_devices(mesh) -> int:
  return 1 if mesh is None or "clients" not in mesh.axis_names else mesh.shape["clients"]


def _streamed(traced: TracedComputation, block: int, mesh) -> Callable:
  """The traced computation run by the streaming interpreter (``faxbridge/_src/execution.py``)."""
  sharded = None
  if _clients_devices(mesh) > 1:
    axis = lambda p: 0 if p is CLIENTS else None
    sharded = execution.StreamMesh(mesh, tuple(map(axis, traced.in_placements)),
                                   tuple(map(axis, traced.out_placements)))

  def run(*args):
    outs = execution.bind(traced.jaxpr, jax.tree.leaves(args), block, sharded)
    return jax.tree.unflatten(traced.out_tree, outs)

  return run


def _leaf_signature(x) -> tuple:
  shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
  if shape is None or dtype is None:  # a Python number: weakly typed, its type is its signature
    return (type(x),)
  return (tuple(shape), dtype, getattr(x, "weak_type", False))


def _auto_axes(mesh):
  """``mesh`` with every axis of type Auto, so faxbridge may place values with sharding constraints.

  ``jax.make_mesh`` makes Explicit axes by default, and ``with_sharding_constraint`` refuses those.
  """
  auto = jax.sharding.AxisType.Auto
  if all(t == auto for t in mesh.axis_types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * mesh.devices.ndim)


def _as_ambient(mesh):
  """Make ``mesh`` (Auto axes) the ambient mesh while tracing and running, when another is set.

  Under ``jax.set_mesh`` of a mesh with Explicit axes, JAX checks sharding constraints against that
  ambient mesh; the computation's own (Auto) copy of it must be the one in force.
  """
  try:
    ambient = jax.sharding.get_mesh()
  except ValueError:
    return contextlib.nullcontext()
  if mesh is None or ambient.empty or ambient == mesh:
    return contextlib.nullcontext()
  return jax.set_mesh(mesh)


def _put(x, sharding):
  # Host data goes onto the mesh explicitly: under multi-process jax.distributed a jit cannot take
  # numpy inputs for arrays that span other processes' devices.
  if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and x.sharding == sharding):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):  # lowered for a signature (Computation.lower)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)
  return jax.device_put(x, sharding)


def _check_even(traced: TracedComputation, mesh) -> None:
  size = mesh.shape["clients"]
  if traced.clients is not None and traced.clients % size:
    raise ValueError(
        f"{traced.name}: {traced.clients} clients cannot be split evenly over the mesh's "
        f"'clients' axis of size {size}"
    )


def _on_mesh(x, mesh, clients: bool) -> jax.sharding.NamedSharding:
  """Where an input leaf goes on ``mesh``: the sharding its user gave it, else the default.

  A SERVER leaf keeps the ``NamedSharding`` it has on ``mesh``'s devices (a model-sharded weight stays
  model-sharded; on the computation's own Auto copy of the mesh), else it is replicated; it is never
  split over the ``clients`` axis. A CLIENTS leaf keeps its sharding when its leading axis is split
  over ``clients`` (the other axes, say the examples over a ``data`` axis, as given), else it is
  split over ``clients`` only.
  """
  P = jax.sharding.PartitionSpec
  given = getattr(x, "sharding", None) if isinstance(x, jax.Array | jax.ShapeDtypeStruct) else None
  if (isinstance(given, jax.sharding.NamedSharding) and given.mesh.axis_names == mesh.axis_names
      and given.mesh.devices.shape == mesh.devices.shape
      and (given.mesh.devices == mesh.devices).all()):
    on_clients = "clients" in execution.spec_axes(given.spec, slice(0, 1))
    if on_clients if clients else "clients" not in execution.spec_axes(given.spec):
      return jax.sharding.NamedSharding(mesh, given.spec)
  return jax.sharding.NamedSharding(mesh, P("clients") if clients else P())


def _placed(traced: TracedComputation, mesh, args: Sequence) -> tuple:
  """``args`` on ``mesh`` (:func:`_on_mesh`): CLIENTS leaves split over its ``clients`` axis, every
  other sharding the user's. Outputs are left to the compiler: the constraints inside the program
  pin only the clients axis of CLIENTS values, so a SERVER result keeps the model sharding that
  propagates to it."""
  leaves = jax.tree.leaves(tuple(args))
  placed = [_put(x, _on_mesh(x, mesh, p is CLIENTS)) for x, p in zip(leaves, traced.in_placements)]
  return jax.tree.unflatten(traced.in_tree, placed)


def computation(
    fn: Callable | None = None,
    *,
    clients: int | None = None,
    in_placements: Sequence[Placement] = (),
    mesh: jax.sharding.Mesh | None = None,
    strategy: Strategy | None = None,
) -> Computation | Callable[[Callable], Computation]:
  """Make ``fn`` a federated computation.

  Inside ``fn``, a SERVER argument is an ordinary array and a CLIENTS argument holds one value
  per client on its leading axis (size ``n``, the number of clients). Values cross between them
  only through ``fb.broadcast`` (SERVER -> CLIENTS), ``fb.map`` (per-client work) and the
  aggregations (CLIENTS -> SERVER); every other JAX operation is server work.

  Args:
    fn: a function of JAX values written with ``fb.broadcast``, ``fb.map`` and aggregations.
    clients: the number of clients; inferred from the CLIENTS-placed inputs when None.
    in_placements: one placement per positional argument (a pytree argument shares it).
    mesh: a device mesh; with an axis named ``clients``, CLIENTS values are sharded along it.
      Defaults to JAX's ambient mesh (``jax.set_mesh``).
    strategy: how native calls execute the maps: ``"vmap"`` (all clients at once), ``"stream"``
      (a scan over clients, aggregations fused into it as accumulators), ``("stream", k)`` (a scan
      over blocks of ``k`` clients, vmap inside a block) or ``"auto"`` (stream on CPU; vmap on
      GPU/TPU while memory allows). Defaults to the innermost ``fb.execution_strategy`` block,
      else ``"auto"``. Tracing, splitting and exports do not depend on it.

  Returns:
    A :class:`Computation`; without ``fn``, a decorator that makes one.

  Example:
    >>> def local_step(w, x):
    ...   return w - 0.1 * (w - x)  # one step towards the client's data
    >>> @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
    ... def fedavg_round(w, x):
    ...   return fb.mean(fb.map(local_step, fb.broadcast(w), x))
    >>> x = np.array([[1.0], [3.0]], np.float32)  # 2 clients
    >>> [round(v, 4) for v in fedavg_round(np.zeros(1, np.float32), x).tolist()]
    [0.2]
  """
  make = functools.partial(Computation, clients=clients, in_placements=in_placements, mesh=mesh,
                           strategy=strategy)
  return make if fn is None else make(fn)

"""Every use of JAX's private modules (``jax._src``), each with the reason no public API serves.

Checked against jax 0.12: ``jax.extend`` (``core``, ``core.primitives``, ``source_info_util``,
``mlir``, ``random``, ``backend``), ``jax.interpreters`` and ``jax.experimental`` have none of these.
Every other module of faxbridge imports them from here (the converters through
``faxbridge.extend.jax_internals``), so a JAX upgrade that moves one fails here, at import, in one
place. What has a public form is imported publicly where it is used: ``jax.extend.source_info_util``
(``current``, ``user_context``), ``jax.extend.mlir`` (``serialize_portable_artifact``, used by
``serialization.py`` instead of the private ``jax._src.export._export._module_to_bytecode``).
"""

from __future__ import annotations

from collections.abc import Iterator

from jax._src import callback as _callback
from jax._src import core as _core
from jax._src import debugging as _debugging
from jax._src import source_info_util as _source_info_util
from jax._src.interpreters import partial_eval as _pe
from jax._src.pjit import reshard_p
from jax._src.random import prng, random_clone_p

__all__ = [
  "PYTHON_CALLBACKS",
  "eqn_context_on",
  "innermost_scope",
  "inside_a_staged_trace",
  "is_user_filename",
  "prng",
  "random_clone_p",
  "reshard_p",
  "user_frames",
]


def is_user_filename(file_name: str) -> bool:
  """Whether ``file_name`` is user code to JAX: not JAX's own, the standard library's, or a path
  registered with ``register_exclusion``.

  Private because: ``jax.extend.source_info_util`` has ``summarize`` (the innermost such frame only)
  and ``register_exclusion``, but not the predicate. faxbridge must also skip its own frames, and
  registering them as exclusions would change the tracebacks JAX shows for every other library.
  """
  return _source_info_util.is_user_filename(file_name)


def user_frames(traceback) -> Iterator:
  """The user frames (``file_name``, ``start_line``, ``function_name``) of an equation's
  ``source_info.traceback``, innermost first. Private for the same reason as
  :func:`is_user_filename`: the public module gives only the innermost one, as a string."""
  return _source_info_util.user_frames(traceback)


def innermost_scope(source_info) -> str | None:
  """The name of the innermost ``jax.named_scope`` an equation was bound in, when nothing (no
  transformation) was applied inside that scope; else None.

  Private because: ``jax.extend.source_info_util`` exposes ``NameStack`` but not its elements
  (``Scope``, ``Transform``), and its string form joins names with ``/``, which a name may hold.
  """
  stack = source_info.name_stack.stack if source_info is not None else ()
  last = stack[-1] if stack else None
  return last.name if isinstance(last, _source_info_util.Scope) else None


# The primitives of Python callbacks (``jax.pure_callback``, ``jax.experimental.io_callback``,
# ``jax.debug.callback``, ``jax.debug.print``), which cannot run on a client device or a TFF worker.
# Private because: ``jax.extend.core.primitives`` lists no callback primitive; tracing a callback to
# read its primitive off the jaxpr would run at every import. Absent ones are left out.
PYTHON_CALLBACKS = frozenset(
    p for p in (getattr(_callback, "pure_callback_p", None),
                getattr(_callback, "io_callback_p", None),
                getattr(_debugging, "debug_callback_p", None),
                getattr(_debugging, "debug_print_p", None)) if p is not None)

# For the TF lowering (converters/tf), each a primitive a jaxpr may hold that it must lower:
# * ``reshard_p``: ``jax.sharding.reshard``'s primitive; not in ``jax.extend.core.primitives``.
# * ``random_clone_p``: ``jax.random.clone``'s primitive; not in ``jax.extend.core.primitives``.
# * ``prng``: the key types' implementations (``prngs``, the ``random_*_impl_base`` functions JAX
#   lowers ``random_seed/split/fold_in/bits`` with, ``random_wrap_p``, ``random_unwrap_p``,
#   ``iota_2x32_shape_p``); ``jax.extend.random`` defines new implementations but exposes neither
#   the registry nor these functions and primitives.


# Private because: an equation records the abstract mesh it was traced under in its context
# (``JaxprEqnContext.cur_abstract_mesh``, set again whenever the equation is evaluated); no public
# API makes an equation's context with another mesh. The stream strategy evaluates a computation
# traced under an Auto mesh inside ``shard_map``, where the clients axis is Manual.
def eqn_context_on(ctx, mesh):
  """``ctx`` (an equation's ``JaxprEqnContext``) with ``mesh`` as its abstract mesh when it holds
  another mesh over the same axes; else ``ctx`` itself."""
  held = ctx.cur_abstract_mesh
  if held.empty or held == mesh or held.axis_names != mesh.axis_names:
    return ctx
  return _core.JaxprEqnContext._create(
      ctx.compute_type, ctx.threefry_partitionable, mesh, ctx.cur_layout_mode,
      ctx.remove_size_one_mesh_axis, ctx.no_collectives,
      None if ctx.xla_metadata is None else tuple(sorted(ctx.xla_metadata.items())))


# Private because: whether a call is being staged into a jaxpr (an outer ``jax.jit``, ``make_jaxpr``,
# ``lax.scan``, ``jax.checkpoint``) is JAX's trace context; no public API says so. A computation's
# call compiles with XLA options only outside one: JAX refuses options on a jit that another stages
# in, while one evaluated under ``grad`` or ``vmap`` alone still runs as a top-level jit.
def inside_a_staged_trace() -> bool:
  """Whether a trace that stages out a jaxpr is in progress here (at any depth)."""
  trace = _core.trace_ctx.trace
  while trace is not None:
    if isinstance(trace, _pe.DynamicJaxprTrace):
      return True
    trace = getattr(trace, "parent_trace", None)
  return False

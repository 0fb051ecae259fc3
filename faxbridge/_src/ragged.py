"""Clients with their own data sizes: the ragged CLIENTS input and the fold over a client's own
examples (docs/ragged.md).

A federation's clients hold different numbers of examples. ``fb.ragged([data_0, ..., data_{n-1}])``
pads them to one length ``L`` and keeps each client's count of real examples::

    Ragged(examples = a pytree of [n, L, ...] arrays, count = int32[n], batch_size = b or None)

It is a pytree, placed at CLIENTS like any other value (every leaf has the clients axis first), so
``fb.map`` hands each client its own ``Ragged`` (leaves ``[L, ...]``, ``count`` a scalar), and
inside it ``fb.fold`` runs the client's loop over its real examples only:

    fold(step, c, data) = step(... step(step(c, x_0), x_1) ..., x_{count-1})

(with ``batch_size=b``: over its ``ceil(count / b)`` batches, each with the mask of its real
examples). The padding ``x_count, ..., x_{L-1}`` never reaches a value or a derivative.

``fold_p`` is a local primitive (client work, like ``lax.scan``), with its whole story here:

* abstract evaluation: the carry's avals;
* impl and lowering: a ``while_loop`` of ``count`` steps. The step reads the real item ``j``; on a
  step that runs past the count (only under ``vmap``, where the loop runs to the largest count of the
  batch and JAX's batching rule keeps each finished carry) it reads item 0 (zeros for an empty
  client), never the padding, and its result is dropped;
* batching: ``vmap`` of that loop, so a block of clients runs to the block's largest count (the
  stream strategy sorts clients by count so that blocks hold similar sizes: ``execution.py``);
* JVP: two folds, the primal one and one of the step's JVP (linear in the tangents), as
  ``call_rules.py`` does for ``fb.map``, so that ``linearize`` and ``grad`` see a known primal fold;
* transpose: of a fold linear in its undefined operands (the tangent fold): a loop forward over the
  ``count`` real items keeping the carry each step starts from, then a loop backward from
  ``count - 1`` to 0 through each step's VJP. Padded items get a zero cotangent; nothing is
  computed on them, so nothing of them (NaN, 1e30) can reach a gradient.

With a batch size the client's examples become batches through ``batches_p`` (a second local
primitive, linear in the examples): ``[L, ...]`` leaves and the count -> ``[L / b, b, ...]`` batches
whose examples past the count are zeros, the mask of the real ones, and ``ceil(count / b)``. It is
one equation whose parameters do not hold ``L``, so an exporter can run it (and the fold) on a
client's own length: a symbolic ``L`` under ``jax.export``, an unknown dimension in TF.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core as jax_core
from jax import lax
from jax.extend import core as jcore
from jax.extend import source_info_util
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

from faxbridge._src.errors import PlacementError
from faxbridge._src.locations import describe

PyTree = Any

__all__ = ["Ragged", "batches_p", "fold", "fold_p", "fold_sites", "fold_steps", "input_specs",
           "own_length", "padding_reads", "ragged"]


# --------------------------------------------------------------------------------------------------
# The data.
# --------------------------------------------------------------------------------------------------
@jax.tree_util.register_pytree_with_keys_class
class Ragged:
  """Examples padded to one length, with the count of the real ones (``fb.ragged`` makes one).

  At CLIENTS (an argument of a computation): ``examples`` is a pytree of ``[n, L, ...]`` arrays
  (client ``i``'s real examples are ``[i, :count[i]]``; the rest is padding whose values never
  matter) and ``count`` is ``int32[n]``. Inside ``fb.map`` a client sees its own: leaves
  ``[L, ...]``, ``count`` a scalar. ``batch_size`` (static) says that the client's loop runs over
  batches of that many examples (``L`` is then a multiple of it); None: over single examples.

  ``count`` is an ordinary CLIENTS value: ``fb.weighted_mean(deltas, data.count)`` weights each
  client by its real examples. As a pytree a ``Ragged`` has the leaves of ``examples`` then ``count``
  (named ``examples`` / ``count`` in the split: ``data_examples_x``, ``data_count``).

  Example:
    >>> padded = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], np.float32)  # 2 clients, L = 3
    >>> data = fb.Ragged(padded, np.array([2, 1], np.int32))
    >>> @fb.computation(in_placements=(fb.CLIENTS,))
    ... def weighted(data):
    ...   means = fb.map(lambda d: fb.fold(lambda c, x: c + x, 0.0, d) / d.count, data)
    ...   return fb.weighted_mean(means, data.count)
    >>> weighted(data).tolist()  # (1 + 2 + 3) / 3
    2.0
  """

  __slots__ = ("batch_size", "count", "examples")
  examples: PyTree
  count: Any
  batch_size: int | None

  def __init__(self, examples: PyTree, count: Any, batch_size: int | None = None):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
        batch_size, int | np.integer) or batch_size < 1):
      raise ValueError(f"fb.Ragged: batch_size must be a positive int or None, got {batch_size!r}")
    if not jax.tree.leaves(examples):
      raise ValueError("fb.Ragged: examples holds no array: give it the clients' padded examples")
    object.__setattr__(self, "examples", examples)
    object.__setattr__(self, "count", count)
    object.__setattr__(self, "batch_size", None if batch_size is None else int(batch_size))

  def __setattr__(self, name, value):
    raise AttributeError("fb.Ragged is immutable: make a new one")

  def __repr__(self) -> str:
    shapes = jax.tree.map(lambda x: getattr(x, "shape", x), self.examples)
    batch = "" if self.batch_size is None else f", batch_size={self.batch_size}"
    return f"Ragged(examples={shapes}, count={getattr(self.count, 'shape', self.count)}{batch})"

  @property
  def num_batches(self) -> Any:
    """The number of batches the client's loop runs: ``ceil(count / batch_size)`` (the count
    itself without a batch size)."""
    if self.batch_size is None:
      return self.count
    return (self.count + self.batch_size - 1) // self.batch_size

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("examples"), self.examples),
            (jax.tree_util.GetAttrKey("count"), self.count)), self.batch_size

  @classmethod
  def tree_unflatten(cls, batch_size, children):
    # No checks: JAX rebuilds pytrees with tracers, placeholders and None leaves.
    out = object.__new__(cls)
    object.__setattr__(out, "examples", children[0])
    object.__setattr__(out, "count", children[1])
    object.__setattr__(out, "batch_size", batch_size)
    return out


# Exports serialize the computation with jax.export (the native reference), whose calling convention
# holds the input pytree: a Ragged node's aux data is its batch size (an int or None).
jax.export.register_pytree_node_serialization(
    Ragged, serialized_name="faxbridge.Ragged",
    serialize_auxdata=lambda batch_size: json.dumps(batch_size).encode(),
    deserialize_auxdata=lambda data: json.loads(data))


def ragged(clients: Sequence[PyTree], *, batch_size: int | None = None,
           max_length: int | None = None) -> Ragged:
  """A CLIENTS input from each client's own examples: padded to one length, with the counts.

  ``clients[i]`` is client ``i``'s pytree of arrays whose leading axis is its examples (every leaf
  of a client has the same number; the pytree structure, the other dimensions and the dtypes are
  the same for all clients). The result holds ``[n, L, ...]`` arrays padded with zeros and
  ``count = int32[n]``; ``L`` is the largest count (at least 1), or ``max_length`` when given (so
  that rounds of different clients keep one signature and one compiled program), rounded up to a
  multiple of ``batch_size``.

  Example:
    >>> data = fb.ragged([np.ones((3, 2), np.float32), np.ones((1, 2), np.float32)])
    >>> data.examples.shape, data.count.tolist()
    ((2, 3, 2), [3, 1])

  Raises:
    ValueError: no clients, clients whose pytrees, trailing shapes or dtypes differ, a client whose
      leaves disagree on its number of examples, or ``max_length`` below the largest count.
  """
  clients = list(clients)
  if not clients:
    raise ValueError("fb.ragged needs at least one client's examples")
  flat = [jax.tree_util.tree_flatten_with_path(c) for c in clients]
  tree = jax.tree.structure(clients[0])
  paths = [p for p, _ in flat[0][0]]
  if not paths:
    raise ValueError("fb.ragged: client 0's examples hold no array")
  counts: list[int] = []
  for i, (leaves, _) in enumerate(flat):
    if jax.tree.structure(clients[i]) != tree:  # type: ignore[operator]
      raise ValueError(f"fb.ragged: client {i}'s examples are a {jax.tree.structure(clients[i])}, "
                       f"client 0's a {tree}: every client needs the same pytree")
    sizes = {jax.tree_util.keystr(p): np.shape(x)[0] if np.ndim(x) else None for p, x in leaves}
    known = {v for v in sizes.values() if v is not None}
    if None in sizes.values() or len(known) != 1:
      raise ValueError(f"fb.ragged: client {i}'s leaves must share one leading (examples) axis, "
                       f"got {sizes}")
    counts.append(int(known.pop()))
  length = max(max(counts), 1)
  if max_length is not None:
    if max_length < max(counts):
      raise ValueError(f"fb.ragged: max_length={max_length} is below the largest client's "
                       f"{max(counts)} examples")
    length = max(max_length, 1)
  if batch_size is not None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"fb.ragged: batch_size must be a positive int, got {batch_size!r}")
    length = -(-length // batch_size) * batch_size
  padded = []
  for k, path in enumerate(paths):
    first = np.asarray(flat[0][0][k][1])
    out = np.zeros((len(clients), length, *first.shape[1:]), first.dtype)
    for i, (leaves, _) in enumerate(flat):
      x = np.asarray(leaves[k][1])
      if x.shape[1:] != first.shape[1:] or x.dtype != first.dtype:
        raise ValueError(
            f"fb.ragged: leaf {jax.tree_util.keystr(path)} of client {i} is {x.dtype}{list(x.shape)}"
            f", client 0's {first.dtype}{list(first.shape)}: clients may differ only in their "
            "number of examples (the leading axis)")
      out[i, : x.shape[0]] = x
    padded.append(out)
  return Ragged(jax.tree.unflatten(tree, padded), np.asarray(counts, np.int32), batch_size)


def input_specs(in_tree) -> dict[int, tuple[int, int | None]]:
  """For a computation's input pytree structure: ``{example leaf index: (count leaf index,
  batch size)}`` of every ``Ragged`` in it (what the split records for exporters)."""
  indexed = jax.tree.unflatten(in_tree, list(range(in_tree.num_leaves)))
  out: dict[int, tuple[int, int | None]] = {}
  for node in jax.tree.leaves(indexed, is_leaf=lambda x: isinstance(x, Ragged)):
    if isinstance(node, Ragged):
      for i in jax.tree.leaves(node.examples):
        out[i] = (node.count, node.batch_size)
  return out


# --------------------------------------------------------------------------------------------------
# batches: a client's examples as batches of b (what fb.fold loops over with a batch size).
# --------------------------------------------------------------------------------------------------
batches_p = jcore.Primitive("faxbridge_batches")
batches_p.multiple_results = True


def _real_rows(length, count):
  """``bool[length]``: which of the padded examples are real (``length`` may be symbolic)."""
  return lax.iota(jnp.int32, length) < count


def _zero_padding(x, real):
  return jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _batches(*args, batch_size: int) -> list:
  """``(*leaves [L, ...], count) -> (*batches [L / b, b, ...], mask bool[L / b, b], ceil(count / b))``:
  examples past the count are zeros in the batches (so the step's masked terms never see the
  padding, and ``0 * NaN`` cannot arise), the mask says which are real."""
  *leaves, count = args
  b = batch_size
  length = leaves[0].shape[0]
  real = _real_rows(length, count)
  out = [_zero_padding(x, real).reshape(length // b, b, *x.shape[1:]) for x in leaves]
  n = jnp.clip(count, 0, length).astype(jnp.int32)
  return [*out, real.reshape(length // b, b), (n + b - 1) // b]


def _batches_abstract_eval(*args, batch_size: int):
  *leaves, count = args
  if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(f"fb.fold: the count must be an integer scalar, got {count.str_short()}")
  lengths = {x.shape[0] if x.ndim else None for x in leaves}
  if None in lengths or len(lengths) != 1:
    raise TypeError(f"fb.fold: examples of different lengths {[x.shape for x in leaves]}")
  length: Any = lengths.pop()  # an int, or a symbolic dimension under jax.export
  if isinstance(length, int) and length % batch_size:
    raise TypeError(f"fb.fold: the padded length {length} is not a multiple of batch_size "
                    f"{batch_size}")
  nb = length // batch_size
  return [*(jax_core.ShapedArray((nb, batch_size, *x.shape[1:]), x.dtype) for x in leaves),
          jax_core.ShapedArray((nb, batch_size), np.dtype(bool)),
          jax_core.ShapedArray((), np.dtype(np.int32))]


def _batches_jvp(primals, tangents, *, batch_size: int):
  out = batches_p.bind(*primals, batch_size=batch_size)
  moving = [i for i, t in enumerate(tangents[:-1]) if type(t) is not ad.Zero]
  t_out: list = [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
  if moving:  # linear in the examples: the same batching of their tangents
    moved = batches_p.bind(*(tangents[i] for i in moving), primals[-1], batch_size=batch_size)
    for i, t in zip(moving, moved):
      t_out[i] = t
  return out, t_out


def _batches_transpose(cts, *args, batch_size: int):
  *leaves, count = args
  if ad.is_undefined_primal(count):
    raise TypeError("fb.fold: the count cannot be a linear operand")
  out: list = []
  for x, ct in zip(leaves, cts):
    if not ad.is_undefined_primal(x):
      out.append(None)
    elif type(ct) is ad.Zero:
      out.append(ad.Zero(x.aval))
    else:  # the padding got zeros, so its cotangent is zero
      ct = ct.reshape(x.aval.shape)
      out.append(_zero_padding(ct, _real_rows(x.aval.shape[0], count)))
  return [*out, None]


def _batches_batch(args, dims, *, batch_size: int):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  out = jax.vmap(lambda *a: _batches(*a, batch_size=batch_size), in_axes=tuple(dims),
                 axis_size=size)(*args)
  return out, [0] * len(out)


batches_p.def_abstract_eval(_batches_abstract_eval)
batches_p.def_impl(_batches)
mlir.register_lowering(batches_p, mlir.lower_fun(_batches, multiple_results=True))
ad.primitive_jvps[batches_p] = _batches_jvp
ad.primitive_transposes[batches_p] = _batches_transpose
batching.primitive_batchers[batches_p] = _batches_batch


# --------------------------------------------------------------------------------------------------
# fold: fb.fold(step, init, data) -> the carry after the client's real examples.
# --------------------------------------------------------------------------------------------------
fold_p = jcore.Primitive("faxbridge_fold")
fold_p.multiple_results = True


def _here() -> str:
  return describe(source_info_util.current())


def fold(step: Callable, init: PyTree, data: Ragged) -> PyTree:
  """The client's loop over its own examples: ``step`` applied to the real ones only, in order.

  ``fold(step, c, data) = step(... step(step(c, x_0), x_1) ..., x_{count-1})`` with ``x_j`` the
  pytree of example ``j`` (each leaf without its examples axis). With ``data.batch_size = b`` the
  loop runs over the client's ``ceil(count / b)`` batches and is called ``step(carry, batch, mask)``:
  ``batch`` holds ``b`` examples (leaves ``[b, ...]``) and ``mask`` is ``bool[b]``, True for its
  real examples (all but the tail of the last batch); weight by it, e.g. a loss
  ``sum(mask * per_example) / max(sum(mask), 1)``. An empty client (count 0) returns ``init``.

  Call it inside ``fb.map`` on the client's ``Ragged`` (or at the server on a server-placed one).
  ``step`` returns a carry of ``init``'s structure, shapes and dtypes; it may use values of the
  enclosing function (the broadcast weights, a learning rate). The padding never reaches a value
  or a gradient: past the count nothing is computed on it (docs/ragged.md).

  Example:
    >>> @fb.computation(in_placements=(fb.CLIENTS,))
    ... def totals(data):
    ...   return fb.map(lambda d: fb.fold(lambda c, x: c + x, 0.0, d), data)
    >>> totals(fb.ragged([np.array([1.0, 2.0], np.float32), np.array([5.0], np.float32)])).tolist()
    [3.0, 5.0]

  Raises:
    TypeError: ``data`` is no ``fb.Ragged``, the count is not an integer, or ``step`` returns a
      carry that does not match ``init``.
    PlacementError: ``data`` holds all clients (call it inside ``fb.map``).
  """
  if not isinstance(data, Ragged):
    raise TypeError(f"fb.fold{_here()} folds over an fb.Ragged (fb.ragged(...) makes one, or "
                    f"fb.Ragged(padded_examples, count)), got {type(data).__name__}")
  count = jnp.asarray(data.count)
  if count.ndim:
    raise PlacementError(
        f"fb.fold{_here()} received the counts of {count.shape[0]} clients: it runs one client's "
        "loop. Call it inside fb.map, on the client's own data: "
        "fb.map(lambda d: fb.fold(step, init, d), data).")
  if not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(f"fb.fold{_here()}: the count must be an integer, got {count.dtype}")
  leaves, tree = jax.tree.flatten(data.examples)
  leaves = [jnp.asarray(x) for x in leaves]
  lengths = {int(x.shape[0]) for x in leaves if x.ndim}
  if any(x.ndim == 0 for x in leaves) or len(lengths) != 1:
    raise TypeError(f"fb.fold{_here()}: every leaf of the examples needs the same leading "
                    f"(examples) axis, got shapes {[x.shape for x in leaves]}")
  length = lengths.pop()
  b = data.batch_size
  count = count.astype(jnp.int32)
  if b is not None:
    if length % b:
      raise TypeError(f"fb.fold{_here()}: the padded length {length} is not a multiple of "
                      f"batch_size {b}")
    *items, mask, count = batches_p.bind(*leaves, count, batch_size=b)
    items.append(mask)
  else:
    items = leaves
  init_leaves, init_tree = jax.tree.flatten(init)
  init_leaves = [jnp.asarray(x) for x in init_leaves]
  if items[0].shape[0] == 0:  # nothing to fold: no example can be real
    return init
  carry_avals = [jax_core.ShapedArray(x.shape, x.dtype) for x in init_leaves]
  item_avals = [jax_core.ShapedArray(x.shape[1:], x.dtype) for x in items]
  nc = len(init_leaves)
  out_trees = []

  def flat_step(*args):
    carry = jax.tree.unflatten(init_tree, list(args[:nc]))
    item = list(args[nc:])
    if b is None:
      out = step(carry, jax.tree.unflatten(tree, item))
    else:
      out = step(carry, jax.tree.unflatten(tree, item[:-1]), item[-1])
    out_leaves, out_tree = jax.tree.flatten(out)
    out_trees.append(out_tree)
    return out_leaves

  closed = jax.make_jaxpr(flat_step)(*carry_avals, *item_avals)
  if out_trees[-1] != init_tree:  # type: ignore[operator]
    raise TypeError(f"fb.fold{_here()}: step returned a {out_trees[-1]}, the carry (init) is a "
                    f"{init_tree}: it must return the carry's structure")
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(init)[0]]
  for path, want, got in zip(paths, carry_avals, closed.out_avals):
    if (want.shape, want.dtype) != (got.shape, got.dtype):
      raise TypeError(
          f"fb.fold{_here()}: step returned {got.str_short()} for carry leaf init{path}, which is "
          f"{want.str_short()}: a step keeps its carry's shapes and dtypes (write init with the "
          "dtype the step computes in, e.g. 0.0 or jnp.zeros(..., jnp.float32))")
  out = _bind(closed, [], init_leaves, count, items)
  return jax.tree.unflatten(init_tree, out)


def _bind(closed: jcore.ClosedJaxpr, consts: Sequence, init: Sequence, count, items: Sequence) -> list:
  """``fold_p`` of the step ``closed``, traced on (``consts``, carry, item) leaves -> carry leaves.
  Its own constants (values the step captured from the enclosing function among them) become
  operands too, in front."""
  jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
  consts = [*closed.consts, *consts]
  return fold_p.bind(*consts, *init, count, *items, jaxpr=jcore.ClosedJaxpr(jaxpr, ()),
                     num_consts=len(consts), num_carry=len(init))


def _split(args: Sequence, num_consts: int, num_carry: int):
  consts = list(args[:num_consts])
  carry = list(args[num_consts: num_consts + num_carry])
  count = args[num_consts + num_carry]
  items = list(args[num_consts + num_carry + 1:])
  return consts, carry, count, items


def _abstract_eval(*args, jaxpr, num_consts, num_carry):
  _, _, count, items = _split(args, num_consts, num_carry)
  if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(f"fb.fold: the count must be an integer scalar, got {count.str_short()}")
  if len({x.shape[0] for x in items}) != 1:
    raise TypeError(f"fb.fold: items of different lengths {[x.shape for x in items]}")
  return [jax_core.ShapedArray(a.shape, a.dtype) for a in jaxpr.out_avals]


def _real(j, n):
  return (j >= 0) & (j < n)


def _stand_in(items: Sequence, n) -> list:
  """What the step reads on a step that is not real: item 0, which is real when any is (zeros for
  an empty client), so that no padded value enters the step."""
  return [jnp.where(n > 0, x[0], jnp.zeros_like(x[0])) for x in items]


def _item(items: Sequence, j, n, stand_in: Sequence) -> list:
  real = _real(j, n)
  return [jnp.where(real, lax.dynamic_index_in_dim(x, j, 0, keepdims=False), s)
          for x, s in zip(items, stand_in)]


def _loop(*args, jaxpr, num_consts, num_carry):
  """The fold: ``count`` steps of a while loop (clamped to the padded length)."""
  consts, init, count, items = _split(args, num_consts, num_carry)
  step = jcore.jaxpr_as_fun(jaxpr)
  n = jnp.clip(count, 0, items[0].shape[0])
  stand_in = _stand_in(items, n)

  def body(state):
    j, carry = state
    return j + 1, list(step(*consts, *carry, *_item(items, j, n, stand_in)))

  _, out = lax.while_loop(lambda s: s[0] < n, body, (jnp.zeros((), n.dtype), list(init)))
  return out


fold_p.def_abstract_eval(_abstract_eval)
fold_p.def_impl(_loop)
mlir.register_lowering(fold_p, mlir.lower_fun(_loop, multiple_results=True))


def _batch(args, dims, **params):
  # vmap of the loop: with a batched count JAX runs it to the batch's largest count and keeps each
  # finished element's carry (lax.while_loop's batching rule).
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  out = jax.vmap(lambda *a: _loop(*a, **params), in_axes=tuple(dims), axis_size=size)(*args)
  return out, [0] * len(out)


batching.primitive_batchers[fold_p] = _batch


def _has_tangent(aval) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _zero_tangent(aval):
  t = aval.to_tangent_aval()
  return np.zeros(t.shape, t.dtype)


def _per_item(x) -> jax_core.ShapedArray:
  aval = jax.typeof(x)
  return jax_core.ShapedArray(aval.shape[1:], aval.dtype)


def _whole(x) -> jax_core.ShapedArray:
  aval = jax.typeof(x)
  return jax_core.ShapedArray(aval.shape, aval.dtype)


def _jvp(primals, tangents, *, jaxpr, num_consts, num_carry):
  params = dict(jaxpr=jaxpr, num_consts=num_consts, num_carry=num_carry)
  out = fold_p.bind(*primals, **params)
  consts, init, count, items = _split(primals, num_consts, num_carry)
  d_consts, d_init, _, d_items = _split(tangents, num_consts, num_carry)
  nz_consts = [type(t) is not ad.Zero for t in d_consts]
  nz_items = [type(t) is not ad.Zero for t in d_items]
  float_carry = [_has_tangent(a) for a in jaxpr.out_avals]
  zeros_out = [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
  moving = any(nz_consts) or any(nz_items) or any(type(t) is not ad.Zero for t in d_init)
  if not moving or not any(float_carry):
    return out, zeros_out
  # Every float carry leaf gets a tangent: one that starts at zero may pick one up in a step.
  t_init = [jnp.zeros(jax.typeof(c).shape, jax.typeof(c).dtype) if type(t) is ad.Zero else t
            for c, t, f in zip(init, d_init, float_carry) if f]
  step = jcore.jaxpr_as_fun(jaxpr)
  c_avals, i_avals = jaxpr.in_avals[:num_consts], jaxpr.in_avals[num_consts + num_carry:]
  carry_avals = jaxpr.in_avals[num_consts: num_consts + num_carry]
  n_nzc, n_nzi = sum(nz_consts), sum(nz_items)

  def tangent_step(*args):
    it = iter(args)
    cs = [next(it) for _ in range(num_consts)]
    dcs_nz = [next(it) for _ in range(n_nzc)]
    carry = [next(it) for _ in range(num_carry)]
    tcarry = [next(it) for _ in t_init]
    xs = [next(it) for _ in i_avals]
    dxs_nz = [next(it) for _ in range(n_nzi)]
    def pick(flags, given, avals):  # the given tangents where flagged, zeros elsewhere
      g = iter(given)
      return [next(g) if f else _zero_tangent(a) for f, a in zip(flags, avals)]

    dcs, dxs = pick(nz_consts, dcs_nz, c_avals), pick(nz_items, dxs_nz, i_avals)
    dcarry = pick(float_carry, tcarry, carry_avals)
    p_out, t_out = jax.jvp(step, (*cs, *carry, *xs), (*dcs, *dcarry, *dxs))
    return [*p_out, *(t for t, f in zip(t_out, float_carry) if f)]

  new_consts = [*consts, *(t for t, nz in zip(d_consts, nz_consts) if nz)]
  new_items = [*items, *(t for t, nz in zip(d_items, nz_items) if nz)]
  avals = [*map(_whole, new_consts), *map(_whole, init), *map(_whole, t_init),
           *map(_per_item, items), *map(_per_item, new_items[len(items):])]
  closed = jax.make_jaxpr(tangent_step)(*avals)
  # The traced operands are (consts, their tangents, carry, its tangents, items, theirs): the
  # consts, carry and items blocks fold_p takes.
  both = _bind(closed, new_consts, [*init, *t_init], count, new_items)
  t_out = iter(both[num_carry:])
  return out, [next(t_out) if f else z for f, z in zip(float_carry, zeros_out)]


def _transpose(cts, *args, jaxpr, num_consts, num_carry):
  """The fold is linear in its undefined operands given the others (it is a tangent fold): its
  transpose runs the real items forward (keeping each step's starting carry) then backward
  through each step's VJP. Linear operands are taken as zeros: the carry's linear part is then
  zero all along, so the stored carries are the linearization points."""
  undefined = [ad.is_undefined_primal(a) for a in args]
  values = [jnp.zeros(a.aval.shape, a.aval.dtype) if u else a for a, u in zip(args, undefined)]
  consts, init, count, items = _split(values, num_consts, num_carry)
  lin_consts, lin_init, _, lin_items = _split(undefined, num_consts, num_carry)
  if undefined[num_consts + num_carry]:
    raise TypeError("fb.fold: the count cannot be a linear operand")
  step = jcore.jaxpr_as_fun(jaxpr)
  length = items[0].shape[0]
  n = jnp.clip(count, 0, length)
  stand_in = _stand_in(items, n)
  float_carry = [i for i, a in enumerate(jaxpr.out_avals) if _has_tangent(a)]
  cts = [jnp.zeros(a.shape, a.dtype) if type(ct) is ad.Zero else ct
         for ct, a in zip(cts, jaxpr.out_avals)]

  def forward(state):
    j, carry, kept = state
    kept = [lax.dynamic_update_index_in_dim(k, c, j, 0) for k, c in zip(kept, carry)]
    return j + 1, list(step(*consts, *carry, *_item(items, j, n, stand_in))), kept

  kept0 = [jnp.zeros((length, *jnp.shape(c)), jax.typeof(c).dtype) for c in init]  # init may be a literal
  zero = jnp.zeros((), n.dtype)
  _, _, kept = lax.while_loop(lambda s: s[0] < n, forward, (zero, list(init), kept0))

  ci = [i for i, lin in enumerate(lin_consts) if lin]
  xi = [i for i, lin in enumerate(lin_items) if lin]

  def backward(state):
    j, ct_carry, ct_consts, ct_items = state
    j = j - 1
    carry = [lax.dynamic_index_in_dim(k, j, 0, keepdims=False) for k in kept]
    item = _item(items, j, n, stand_in)

    def f(lc, fc, li):
      cs, c, x = list(consts), list(carry), list(item)
      for i, v in zip(ci, lc):
        cs[i] = v
      for i, v in zip(float_carry, fc):
        c[i] = v
      for i, v in zip(xi, li):
        x[i] = v
      out = step(*cs, *c, *x)
      return [out[i] for i in float_carry]

    _, vjp = jax.vjp(f, [consts[i] for i in ci], [carry[i] for i in float_carry],
                     [item[i] for i in xi])
    d_consts, d_carry, d_items = vjp(list(ct_carry))
    ct_consts = [a + b for a, b in zip(ct_consts, d_consts)]
    ct_items = [lax.dynamic_update_index_in_dim(buf, d, j, 0) for buf, d in zip(ct_items, d_items)]
    return j, list(d_carry), ct_consts, ct_items

  state = (n, [cts[i] for i in float_carry], [jnp.zeros_like(consts[i]) for i in ci],
           [jnp.zeros_like(items[i]) for i in xi])
  _, ct_carry, ct_consts, ct_items = lax.while_loop(lambda s: s[0] > 0, backward, state)
  by_carry = dict(zip(float_carry, ct_carry))
  out: list = [None] * len(args)
  for i, c in zip(ci, ct_consts):
    out[i] = c
  for k, lin in enumerate(lin_init):
    if lin:
      out[num_consts + k] = by_carry[k]
  for i, c in zip(xi, ct_items):
    out[num_consts + num_carry + 1 + i] = c
  return out


ad.primitive_jvps[fold_p] = _jvp
ad.primitive_transposes[fold_p] = _transpose


# --------------------------------------------------------------------------------------------------
# What other modules ask about folds.
# --------------------------------------------------------------------------------------------------
def fold_sites(jaxpr: jcore.Jaxpr) -> list:
  """The ``source_info`` of every fold in ``jaxpr`` and the jaxprs nested in it."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive is fold_p:
      out.append(eqn.source_info)
    for sub in jcore.jaxprs_in_params(eqn.params):
      out += fold_sites(sub)
  return out


def _scalar_work(jaxpr: jcore.Jaxpr) -> bool:
  """Whether every value ``jaxpr`` computes (inside calls too) is a scalar, without loops."""
  from faxbridge._src import placements

  for eqn in jaxpr.eqns:
    if any(getattr(v.aval, "shape", None) != () for v in eqn.outvars):
      return False
    body = placements.call_body(eqn)
    if body is not None:
      if not _scalar_work(body[0]):
        return False
    elif list(jcore.jaxprs_in_params(eqn.params)):
      return False
  return True


def fold_steps(closed: jcore.ClosedJaxpr) -> tuple[jcore.ClosedJaxpr, list[bool]] | None:
  """A cheap function of one client's inputs that says how many steps its folds run (the sum of
  their clamped counts), and which of the inputs it reads; None when ``closed`` (a per-client
  jaxpr) has no fold whose count is a few scalar operations away from the inputs.

  The stream strategy evaluates it for every client to sort clients by their work, so that each
  block of clients runs its loops only as far as its own largest count.
  """
  from faxbridge._src import placements

  if not fold_sites(closed.jaxpr):
    return None
  found: list = []

  def interpret(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]
    for eqn in jaxpr.eqns:
      invals = [read(a) for a in eqn.invars]
      body = placements.call_body(eqn)
      if body is not None and fold_sites(body[0]):
        outs = interpret(body[0], body[1], invals)
      else:
        if eqn.primitive is fold_p:
          _, _, count, items = _split(invals, eqn.params["num_consts"], eqn.params["num_carry"])
          found.append(jnp.clip(count, 0, jnp.shape(items[0])[0]).astype(jnp.int32))
        if eqn.primitive is batches_p:  # its count of batches is scalar work on the count
          *leaves, count = invals
          length, b = jnp.shape(leaves[0])[0], eqn.params["batch_size"]
          n = jnp.clip(count, 0, length).astype(jnp.int32)
          outs = [*(jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[:-1]),
                  (n + b - 1) // b]
        else:
          outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
          outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def steps(*args):
    interpret(closed.jaxpr, closed.consts, args)
    return [sum(found[1:], found[0]) if found else jnp.zeros((), jnp.int32)]

  traced = jax.make_jaxpr(steps)(*closed.in_avals)
  if not found:
    return None
  # Constants become leading inputs for the dead-code pass, then go back to being constants.
  nconst = len(traced.consts)
  jaxpr, used = pe.dce_jaxpr(pe.convert_constvars_jaxpr(traced.jaxpr), [True])
  if not _scalar_work(jaxpr):
    return None  # a count computed by array work (a model, another fold) is no cheap sort key
  kept = [c for c, u in zip(traced.consts, used[:nconst]) if u]
  const_vars = jaxpr.invars[: len(kept)]
  jaxpr = jaxpr.replace(constvars=const_vars, invars=jaxpr.invars[len(kept):])
  return jcore.ClosedJaxpr(jaxpr, kept), list(used[nconst:])


def padding_reads(jaxpr: jcore.Jaxpr, ragged: Sequence[bool]) -> list[tuple[Any, str]]:
  """Where ``jaxpr`` (a client piece; ``ragged[i]``: input ``i`` is a client's padded examples)
  reads the examples other than through ``fb.fold``: ``(source_info, what)`` per read.

  An export runs each client on its own examples, so the padded length it was traced with is
  gone: a value may reach the examples only as a fold's items, directly or through the batching
  of ``batches_p`` (its batches and mask going to folds only), and never be an output.
  """
  padded = {v for v, r in zip(jaxpr.invars, ragged) if r}
  batched: set = set()
  out: list[tuple[Any, str]] = []
  for eqn in jaxpr.eqns:
    reads = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal)
             and (v in padded or v in batched)]
    if not reads:
      continue
    if eqn.primitive is batches_p and all(i < len(eqn.invars) - 1 for i in reads) and \
        not any(eqn.invars[i] in batched for i in reads):
      batched.update(eqn.outvars[:-1])  # the batches and the mask; the count of batches is free
      continue
    if eqn.primitive is fold_p:
      first_item = eqn.params["num_consts"] + eqn.params["num_carry"] + 1
      if all(i >= first_item for i in reads):
        continue
    out.append((eqn.source_info, eqn.primitive.name))
  for v in jaxpr.outvars:
    if not isinstance(v, jcore.Literal) and (v in padded or v in batched):
      out.append((None, "an output of the client's work"))
  return out


def own_length(count: int, batch_size: int | None) -> int:
  """The rows a runtime gives a client of ``count`` examples in a fixed-shape program: whole
  batches, at least one (``jax.export``'s symbolic dimensions are at least 1)."""
  b = batch_size or 1
  return max(1, -(-int(count) // b)) * b

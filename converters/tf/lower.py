"""The driver: walk a jaxpr equation by equation and emit plain TensorFlow ops.

An environment maps every jaxpr variable to a ``tf.Tensor``; each equation's rule (``registry``) turns
the tensors of its inputs into the tensors of its outputs. Sub-jaxprs (``jit``, ``custom_jvp_call``,
loop bodies...) are lowered by the same walk, so the cost is linear in the number of equations.

PRNG keys (``key<fry>``) are carried as their uint32 data, shape ``key_shape + (2,)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax import lax
from jax.extend import core as jcore

from faxbridge.extend import ExportError, FaxbridgeError, UnsupportedPrimitiveError, describe, enclosing

from . import registry


def is_key(aval: Any) -> bool:
  """True for an aval whose dtype is a typed PRNG key (``key<fry>``)."""
  return jax.dtypes.issubdtype(getattr(aval, "dtype", None), jax.dtypes.prng_key)


def physical(aval: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of the TF tensor that carries ``aval`` (keys: their uint32 key data)."""
  if is_key(aval):
    return tuple(aval.shape) + tuple(aval.dtype._impl.key_shape), np.dtype(np.uint32)
  return tuple(aval.shape), np.dtype(aval.dtype)


def tf_dtype(dtype: Any) -> tf.DType:
  """The TF dtype of a numpy/jax dtype (a ``tf.DType`` passes through)."""
  return dtype if isinstance(dtype, tf.DType) else tf.as_dtype(np.dtype(dtype))


def constant(value: Any, dtype: Any = None) -> tf.Tensor:
  """A ``Const`` op holding ``value`` (a numpy/jax array or a python scalar)."""
  if isinstance(value, jax.Array) and is_key(value):
    value = jax.random.key_data(value)
  arr = np.asarray(value, dtype=None if dtype is None else np.dtype(dtype))
  return tf.constant(arr, dtype=tf_dtype(arr.dtype))


def _x64_check(aval: Any, where: str) -> None:
  dt = np.dtype(physical(aval)[1])
  if dt.itemsize == 8 and dt.kind in "fiu" and not jax.config.jax_enable_x64:
    raise ExportError(f"64-bit value of dtype {dt}{where} while jax_enable_x64 is off")
  if dt.kind == "c":
    raise ExportError(f"complex dtype {dt}{where} is not supported by the tf converter")


def _fuse_transposed_products(jaxpr: jcore.Jaxpr) -> list[Any]:
  """The equations of ``jaxpr`` with each ``transpose[1, 0](dot_general(a, b))`` whose product has
  no other use written as one ``dot_general(b, a)`` with the contracting dims swapped (no batch
  dims, one free dim per side): ``(op(a) op(b))^T = op(b)^T op(a)^T``, i.e.
  ``out^T[n, m] = sum_k b[.., n, ..] * a[.., m, ..]``.

  Why: JAX's gradient of ``x @ w`` is a matmul followed by a transpose; as one MatMul with swapped
  operands and transpose flags the TF graph has no Transpose op (the FedAvg client step spent about
  half its time in them). A product with another use (or a jaxpr output) is left alone, as fusing
  it would compute the matmul twice.
  """
  uses: dict[Any, list[Any]] = {}  # variable -> the equations (None: the jaxpr's outputs) using it
  for e in jaxpr.eqns:
    for atom in e.invars:
      if not isinstance(atom, jcore.Literal):
        uses.setdefault(atom, []).append(e)
  for atom in jaxpr.outvars:
    if not isinstance(atom, jcore.Literal):
      uses.setdefault(atom, []).append(None)
  fused: dict[Any, Any] = {}  # product variable -> its dot_general, for products used by one transpose
  for e in jaxpr.eqns:
    out_aval: Any = e.outvars[0].aval  # ShapedArrays (typed as AbstractValue): dot_general's are arrays
    if e.primitive is not lax.dot_general_p or len(out_aval.shape) != 2:
      continue
    (lc, rc), (lb, _) = e.params["dimension_numbers"]
    la, ra = (a.aval for a in e.invars)
    assert hasattr(la, "shape") and hasattr(ra, "shape")
    users = uses.get(e.outvars[0], [])
    if (not lb and len(la.shape) - len(lc) == 1 and len(ra.shape) - len(rc) == 1 and len(users) == 1
        and users[0] is not None and users[0].primitive is lax.transpose_p
        and tuple(users[0].params["permutation"]) == (1, 0)):
      fused[e.outvars[0]] = e
  if not fused:
    return list(jaxpr.eqns)
  out: list[Any] = []
  for e in jaxpr.eqns:
    if e.primitive is lax.dot_general_p and e.outvars[0] in fused:
      continue  # emitted in place of its transpose
    if e.primitive is lax.transpose_p and not isinstance(e.invars[0], jcore.Literal) \
        and e.invars[0] in fused:
      dot = fused[e.invars[0]]
      (lc, rc), batch = dot.params["dimension_numbers"]
      e = dot.replace(invars=dot.invars[::-1], outvars=e.outvars,
                      params={**dot.params, "dimension_numbers": ((rc, lc), batch)})
    out.append(e)
  return out


# Name scope of the TF ops of equation number N when a Lowering names them (``name_scopes=True``).
SCOPE_PREFIX = "jaxeqn"
_SCOPED_OP = re.compile(r'"((?:[^"/]+/)*?' + SCOPE_PREFIX + r'\d+/[^"]*)"')
_SCOPE_ID = re.compile(SCOPE_PREFIX + r"(\d+)/")


class Lowering:
  """State of one lowering.

  ``producers`` maps each jaxpr variable seen so far to the equation that defined it, so a rule can
  look at how its operands were made (e.g. ``bitwise.known_zero_bits`` proves an OR disjoint).

  With ``name_scopes`` the ops of each equation are emitted under the name scope ``jaxeqn<N>``
  (nested for sub-jaxprs), so a TF op named in a later error (the TFLite converter's) leads back
  to the equation, and the user's line, that emitted it: ``equations_named``. Off by default, as it
  changes the graph's op names (and so the bytes of exported artifacts).
  """

  def __init__(self, name_scopes: bool = False) -> None:
    self.producers: dict[Any, Any] = {}
    self.name_scopes = name_scopes
    # scope number -> (equation, " at file:line (fn)", scope number of the enclosing equation)
    self.scoped: list[tuple[Any, str, int | None]] = []
    self._scope: int | None = None  # the scope being filled
    self._enclosing: Any = None  # source_info a sub-jaxpr's equations fall back on

  def lower_closed(self, closed: jcore.ClosedJaxpr, args: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Outputs of ``closed`` applied to ``args``, as TF tensors in the current graph."""
    return self.lower(closed.jaxpr, closed.consts, args)

  def lower(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Outputs of the open ``jaxpr`` given its ``consts`` (any arrays) and ``args`` (TF tensors)."""
    if len(args) != len(jaxpr.invars) or len(consts) != len(jaxpr.constvars):
      raise ExportError(
          f"internal: jaxpr takes {len(jaxpr.constvars)} consts and {len(jaxpr.invars)} args, "
          f"got {len(consts)} and {len(args)}")
    env: dict[Any, tf.Tensor] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c if isinstance(c, tf.Tensor) else constant(c, physical(v.aval)[1])
    env.update(zip(jaxpr.invars, args))

    def read(atom: Any) -> tf.Tensor:
      if isinstance(atom, jcore.Literal):
        return constant(atom.val, physical(atom.aval)[1])
      return env[atom]

    for eqn in _fuse_transposed_products(jaxpr):
      outs = self.lower_eqn(eqn, [read(a) for a in eqn.invars])
      for v, t in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = t
          self.producers[v] = eqn
    return [read(a) for a in jaxpr.outvars]

  def lower_eqn(self, eqn: Any, args: list[tf.Tensor]) -> list[tf.Tensor]:
    """Apply the registered rule of ``eqn.primitive`` and check the result against the avals."""
    name = eqn.primitive.name  # for messages only: the table is keyed by the Primitive object
    info = registry.lookup(eqn.primitive)
    # Inside a library function (jax.nn.relu's jit, jax.random's expansions) the equation may name
    # no user frame: the enclosing equation's user line is the one to show.
    outer = self._enclosing
    where = describe(eqn.source_info, outer)
    if info is None:
      raise UnsupportedPrimitiveError(
          f"the tf converter has no rule for JAX primitive '{name}'{where}; "
          f"see docs/tf_primitives.md for the supported primitives")
    for v in eqn.outvars:
      _x64_check(v.aval, f" produced by '{name}'{where}")
    self._enclosing = enclosing(eqn.source_info, outer)
    try:
      if self.name_scopes:
        parent, self._scope = self._scope, len(self.scoped)
        self.scoped.append((eqn, where, parent))
        try:
          with tf.name_scope(f"{SCOPE_PREFIX}{self._scope}"):
            outs = info.fn(self, eqn, *args)
        finally:
          self._scope = parent
      else:
        outs = info.fn(self, eqn, *args)
    except FaxbridgeError:
      raise
    except Exception as e:  # a TF shape/dtype error inside a rule: say which equation caused it
      raise ExportError(f"lowering JAX primitive '{name}'{where} to TensorFlow failed: {e}") from e
    finally:
      self._enclosing = outer
    if not eqn.primitive.multiple_results:
      outs = [outs]
    outs = list(outs)
    if len(outs) != len(eqn.outvars):
      raise ExportError(f"internal: rule for '{name}' returned {len(outs)} values, "
                        f"expected {len(eqn.outvars)}{where}")
    for v, t in zip(eqn.outvars, outs):
      shape, dtype = physical(v.aval)
      # A dimension TF does not know passes: a client's own number of examples (rules_ragged.py),
      # traced at the padded length. Every known dimension must be the jaxpr's.
      got = t.shape.as_list() if t.shape.rank is not None else None
      if got is None or len(got) != len(shape) or t.dtype != tf_dtype(dtype) or \
          any(g is not None and g != s for g, s in zip(got, shape)):
        raise ExportError(f"internal: rule for '{name}' produced {t.dtype.name}{t.shape} where the "
                          f"jaxpr has {dtype}{list(shape)}{where}")
    return outs

  def equations_named(self, text: str) -> list[tuple[str, str]]:
    """``(primitive name, " at file:line (fn)")`` of each equation whose scoped TF ops ``text`` names
    (quoted, as in MLIR locations: ``"jaxeqn3/jaxeqn7/Less@__inference_f_12"``), innermost scope,
    in order of first mention, without repeats. An equation whose sub-equation is also named (the
    ``scan`` around a failing ``dot_general``: diagnostics name the loop op too) is left out."""
    found: dict[int, None] = {}
    for m in _SCOPED_OP.finditer(text):
      ids = _SCOPE_ID.findall(m.group(1))
      if ids and int(ids[-1]) < len(self.scoped):
        found.setdefault(int(ids[-1]))
    enclosing_found = set()
    for i in found:
      parent = self.scoped[i][2]
      while parent is not None:
        enclosing_found.add(parent)
        parent = self.scoped[parent][2]
    return [(self.scoped[i][0].primitive.name, self.scoped[i][1]) for i in found
            if i not in enclosing_found]


def lower_closed(closed: jcore.ClosedJaxpr, args: Sequence[tf.Tensor]) -> list[tf.Tensor]:
  """Lower ``closed`` applied to ``args`` into the current TF graph (or ``tf.function``)."""
  return Lowering().lower_closed(closed, args)

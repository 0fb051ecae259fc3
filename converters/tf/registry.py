"""The rule table: JAX ``Primitive`` object -> TensorFlow emitter.

A rule is ``rule(ctx, eqn, *args) -> tf.Tensor | Sequence[tf.Tensor]``: ``args`` are the TF tensors of
``eqn.invars`` (keys as their uint32 data), ``eqn.params`` and the avals are read off ``eqn``, and
``ctx`` (a :class:`faxbridge.converters.tf.lower.Lowering`) lowers sub-jaxprs. Adding a primitive is one
``@register`` and one test; the table is also the source of ``docs/tf_primitives.md``.

The table is keyed by the ``Primitive`` objects themselves, as JAX keys its own tables
(``ad.primitive_jvps``, ``batching.primitive_batchers``, the MLIR lowerings): a name is only a label,
two primitives may share one (a library's own ``"map"``), and a renamed primitive must not silently
lose or steal a rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.extend import core as jcore

Rule = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class RuleInfo:
  """One table entry.

  ``tflite`` says how the emitted ops fare with the TFLite converter restricted to TFLITE_BUILTINS:
  ``"builtin"`` (every op has a builtin), ``"tf-only"`` (some op has none: the graph runs in TF but does
  not convert), or ``"partial"`` (builtin in the common cases named by ``note``, TF-only otherwise).
  """

  primitive: jcore.Primitive
  fn: Rule
  family: str
  tflite: str
  note: str

  @property
  def name(self) -> str:
    """The primitive's name, for messages and the docs table only (never a key)."""
    return self.primitive.name


_RULES: dict[jcore.Primitive, RuleInfo] = {}
_TFLITE_KINDS = ("builtin", "tf-only", "partial")


def _check_primitive(prim: Any) -> jcore.Primitive:
  # A string here is the old, name-keyed API: refuse it rather than never match.
  if not isinstance(prim, jcore.Primitive):
    raise TypeError(f"rules are keyed by jax Primitive objects (e.g. jax.lax.add_p), got {prim!r}")
  return prim


def register(*prims: jcore.Primitive, family: str, tflite: str = "builtin",
             note: str = "") -> Callable[[Rule], Rule]:
  """Decorator: make ``fn`` the rule of each JAX primitive in ``prims`` (``Primitive`` objects)."""
  if tflite not in _TFLITE_KINDS:
    raise ValueError(f"tflite must be one of {_TFLITE_KINDS}, got {tflite!r}")
  prims = tuple(_check_primitive(p) for p in prims)

  def deco(fn: Rule) -> Rule:
    for prim in prims:
      if prim in _RULES:
        raise ValueError(f"primitive {prim.name!r} registered twice ({_RULES[prim].fn} and {fn})")
      _RULES[prim] = RuleInfo(prim, fn, family, tflite, note)
    return fn

  return deco


def lookup(prim: jcore.Primitive) -> RuleInfo | None:
  """The rule of ``prim`` (an equation's ``eqn.primitive``), or None."""
  return _RULES.get(_check_primitive(prim))


def all_rules() -> dict[jcore.Primitive, RuleInfo]:
  """A copy of the whole table, sorted by family then primitive name (then registration order)."""
  return dict(sorted(_RULES.items(), key=lambda kv: (kv[1].family, kv[0].name)))

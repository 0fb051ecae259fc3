"""The rule table: JAX primitive name -> TensorFlow emitter.

A rule is ``rule(ctx, eqn, *args) -> tf.Tensor | Sequence[tf.Tensor]``: ``args`` are the TF tensors of
``eqn.invars`` (keys as their uint32 data), ``eqn.params`` and the avals are read off ``eqn``, and
``ctx`` (a :class:`faxbridge.converters.tf.lower.Lowering`) lowers sub-jaxprs. Adding a primitive is one
``@register`` and one test; the table is also the source of ``docs/tf_primitives.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Rule = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class RuleInfo:
  """One table entry.

  ``tflite`` says how the emitted ops fare with the TFLite converter restricted to TFLITE_BUILTINS:
  ``"builtin"`` (every op has a builtin), ``"tf-only"`` (some op has none: the graph runs in TF but does
  not convert), or ``"partial"`` (builtin in the common cases named by ``note``, TF-only otherwise).
  """

  name: str
  fn: Rule
  family: str
  tflite: str
  note: str


_RULES: dict[str, RuleInfo] = {}
_TFLITE_KINDS = ("builtin", "tf-only", "partial")


def register(*names: str, family: str, tflite: str = "builtin", note: str = "") -> Callable[[Rule], Rule]:
  """Decorator: make ``fn`` the rule of each JAX primitive in ``names``."""
  if tflite not in _TFLITE_KINDS:
    raise ValueError(f"tflite must be one of {_TFLITE_KINDS}, got {tflite!r}")

  def deco(fn: Rule) -> Rule:
    for name in names:
      if name in _RULES:
        raise ValueError(f"primitive {name!r} registered twice ({_RULES[name].fn} and {fn})")
      _RULES[name] = RuleInfo(name, fn, family, tflite, note)
    return fn

  return deco


def lookup(name: str) -> RuleInfo | None:
  """The rule of primitive ``name``, or None."""
  return _RULES.get(name)


def all_rules() -> dict[str, RuleInfo]:
  """A copy of the whole table, sorted by family then primitive name."""
  return dict(sorted(_RULES.items(), key=lambda kv: (kv[1].family, kv[0])))

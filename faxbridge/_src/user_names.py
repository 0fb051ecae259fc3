"""What the user called an aggregated value: ``deltas['w1']`` rather than ``upload3``.

An aggregation equation of the jaxpr knows two things about where it came from, and the names here
are made of exactly those two, so that nothing is guessed:

* the **leaf's path** in the pytree that was aggregated: ``fb.*`` aggregations (``aggregate`` in
  :mod:`faxbridge._src.api`) bind each leaf inside ``jax.named_scope(KIND + keystr(path))``
  (``weighted_mean['w1']``). A name scope is JAX's own way of naming equations for people (it shows
  in profiles and HLO metadata); every interpreter ignores it, so the params, the jaxpr and every
  export stay as they were, and it survives re-binding (the split's inlining keeps each equation's
  ``source_info``). The kind in the scope tells the aggregation bound by ``fb.weighted_mean``
  itself from the ``sum`` its JVP binds inside the same scope.
* the **user's call**: the equation's ``source_info`` holds the traceback with the exact span
  (line and column) of the call in the user's file. Parsed with :mod:`ast`, that span is one
  ``Call`` node: when it calls the aggregation by its name (``fb.weighted_mean(deltas, weights)``,
  ``mean(x)``), its first argument's source text is the value's name (``deltas``) and its second
  argument (or ``weight=``) the weight's; when the call is the right-hand side of ``name = ...``,
  that name is the result's (``mean_delta``).

Why not the Python variable a value was computed into, or the mapped function's output position?
Neither is in the jaxpr: ``fb.map``'s equation has flat outputs and no function name, and a variable
name exists only in the source. The argument of the aggregation call is where the user names the
value being aggregated, and the column span pins the call down even with several on one line. What
cannot be read this way (no source file, a call made inside a library such as ``fb.dp_mean``, an
argument that is a long expression) keeps the shortest honest text (``fb.dp_mean(deltas)``,
``fb.map(…)``) or none, and the form's internal names are shown instead.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import linecache
import os

from faxbridge._src.jax_internals import innermost_scope
from faxbridge._src.locations import user_frame

_SHORT = 40  # an argument's source text longer than this is shown as its call's head: fb.map(…)


@dataclasses.dataclass(frozen=True)
class AggregationNames:
  """The user's names of one aggregation: the value (``deltas['w1']``), its weight (``weights``)
  and its result (``mean_delta['w1']``); None where the source does not say."""

  value: str | None = None
  weight: str | None = None
  result: str | None = None


def aggregation_names(eqn, kind: str) -> AggregationNames:
  """The names of the aggregation ``eqn`` of ``kind`` (see the module docstring)."""
  scope = innermost_scope(eqn.source_info)
  if scope is None or not scope.startswith(kind):
    return AggregationNames()
  path = scope[len(kind):]
  if path and path[0] not in "[.":  # another kind whose name starts with this one's
    return AggregationNames()
  call, target = _call_at(user_frame(eqn.source_info))
  if call is None:
    return AggregationNames()
  func = _text(call.func)
  short_kind = kind.rpartition(".")[2]
  if func is None or func.rpartition(".")[2] != short_kind:
    # A library call that aggregates inside (fb.dp_mean): the call, with its first argument.
    arg = _argument(call.args[0]) if call.args else None
    return AggregationNames(value=f"{func or '…'}({arg or '…'}){path}")
  value = _argument(call.args[0]) if call.args else None
  weight_node = call.args[1] if len(call.args) > 1 else next(
      (k.value for k in call.keywords if k.arg == "weight"), None)
  weight = _argument(weight_node) if weight_node is not None else None
  return AggregationNames(value=None if value is None else value + path, weight=weight,
                          result=None if target is None else target + path)


def _argument(node: ast.expr) -> str | None:
  """An argument as the user wrote it, or its call's head (``fb.map(…)``) when long."""
  text = _text(node)
  if text is not None and len(text) <= _SHORT and "\n" not in text:
    return text
  if isinstance(node, ast.Call) and (head := _text(node.func)) is not None and len(head) <= _SHORT:
    return f"{head}(…)"
  return None


def _text(node: ast.AST) -> str | None:
  try:
    return ast.unparse(node)
  except Exception:  # an unparsable node only loses its name
    return None


def _call_at(frame) -> tuple[ast.Call | None, str | None]:
  """The call whose span is ``frame``'s, and the name it is assigned to (``x = call``), if any."""
  if frame is None or getattr(frame, "start_column", -1) < 0:
    return None, None
  calls = _calls(frame.file_name, _mtime(frame.file_name))
  return calls.get((frame.start_line, frame.start_column, frame.end_line, frame.end_column),
                   (None, None))


def _mtime(path: str) -> float:
  try:
    return os.stat(path).st_mtime
  except OSError:
    return -1.0


@functools.lru_cache(maxsize=64)
def _calls(path: str, mtime: float) -> dict[tuple[int, int, int, int], tuple[ast.Call, str | None]]:
  """Every call of a source file by its span, with the name it is assigned to. Cached per file
  and modification time: a computation traced many times parses its file once."""
  del mtime  # part of the cache key only
  source = "".join(linecache.getlines(path))
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return {}
  targets: dict[int, str] = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
      target = node.targets[0] if isinstance(node, ast.Assign) else node.target
      single = isinstance(node, ast.AnnAssign) or len(node.targets) == 1
      if single and isinstance(target, ast.Name):
        targets[id(node.value)] = target.id
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and node.end_lineno is not None and node.end_col_offset is not None:
      key = (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
      out[key] = (node, targets.get(id(node)))
  return out


__all__ = ["AggregationNames", "aggregation_names"]

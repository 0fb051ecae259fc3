"""The TF op types a lowered graph may contain, checked on every node (function bodies included).

Only plain ops that TF 2.14's runtime (TFF 0.87) executes: no ``XlaCallModule`` or other ``Xla*`` op,
no resource variables, no function calls other than the functional control-flow ops.
"""

from __future__ import annotations

from collections.abc import Iterable

from tensorflow.core.framework import graph_pb2

from faxbridge.extend import ExportError

ALLOWED_OPS: frozenset[str] = frozenset({
    # graph plumbing
    "Placeholder", "Const", "Identity", "IdentityN", "NoOp",
    # elementwise arithmetic and math
    "AddV2", "Sub", "Mul", "RealDiv", "FloorDiv", "FloorMod", "Neg", "Abs", "Sign", "Floor", "Ceil",
    "Round", "Maximum", "Minimum", "Exp", "Log", "Sqrt", "Rsqrt", "Tanh", "Sigmoid", "Sin", "Cos",
    "Atan2", "Pow", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Lgamma", "Digamma",
    # comparisons, logic, selection, casts
    "Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr",
    "LogicalNot", "SelectV2", "Cast", "Bitcast",
    # bitwise
    "BitwiseXor", "BitwiseOr", "BitwiseAnd", "LeftShift", "RightShift",
    # layout
    "Reshape", "BroadcastTo", "Transpose", "ConcatV2", "Pack", "Split", "SplitV", "StridedSlice", "Slice",
    "ReverseV2", "PadV2", "Pad", "Range", "Fill", "ExpandDims", "Squeeze",
    # the rows of a client's own examples, a dimension the graph does not know (rules_ragged.py)
    "Shape",
    # reductions, scans, sorting
    "Sum", "Max", "Min", "Prod", "All", "Any", "ArgMax", "ArgMin", "Cumsum", "Cumprod",
    "CumulativeLogsumexp", "TopKV2",
    # indexing
    "GatherV2", "GatherNd", "ScatterNd",
    # contractions
    "MatMul", "BatchMatMulV2", "Conv2D",
    # functional control flow (control flow v2)
    "While", "StatelessWhile", "If", "StatelessIf",
})

# Named in errors so the cause is obvious; none of these is ever allowed.
_RESOURCE_OPS = frozenset({
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp", "VariableV2",
    "Variable", "VarIsInitializedOp", "ResourceGather", "DestroyResourceOp",
})


def _nodes(graph_def: graph_pb2.GraphDef) -> Iterable[tuple[str, str]]:
  for node in graph_def.node:
    yield node.name, node.op
  for fn in graph_def.library.function:
    for node in fn.node_def:
      yield f"{fn.signature.name}/{node.name}", node.op


def disallowed_nodes(graph_def: graph_pb2.GraphDef) -> list[tuple[str, str]]:
  """(node name, op type) of every node whose op is not in ``ALLOWED_OPS``."""
  return [(name, op) for name, op in _nodes(graph_def) if op not in ALLOWED_OPS]


def check_graph_def(graph_def: graph_pb2.GraphDef) -> None:
  """Raise ``ExportError`` naming each node whose op type is not allowed."""
  bad = disallowed_nodes(graph_def)
  if not bad:
    return
  kinds = []
  for _, op in bad:
    if op.startswith("Xla"):
      kinds.append(f"{op} (XLA-only)")
    elif op in _RESOURCE_OPS:
      kinds.append(f"{op} (resource variable)")
    else:
      kinds.append(op)
  shown = ", ".join(f"{n} [{op}]" for n, op in bad[:8])
  raise ExportError(
      f"the graph contains op types that are not plain TF ops allowed for TF 2.14/TFLite: "
      f"{sorted(set(kinds))}; nodes: {shown}{' ...' if len(bad) > 8 else ''}")

"""Canonical GraphDefs: the same jaxpr lowers to the same bytes, whatever was lowered before.

TensorFlow names the functions of control flow (``while_body_510``) with a process-wide counter, so
a second export in the same process would differ. Functions are renamed by their order of first
use from the main graph (``while_body_0``, ``while_cond_1``...), every reference and every name
derived from theirs follows, and the library is sorted, before a deterministic serialization.
"""

from __future__ import annotations

import re

from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2


def _func_refs(attr_value) -> list:
  """The NameAttrList messages in one AttrValue (a function, or a list of functions)."""
  if attr_value.HasField("func"):
    return [attr_value.func]
  if attr_value.HasField("list"):
    return list(attr_value.list.func)
  return []


def canonicalize(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)
  library = {f.signature.name: f for f in out.library.function}
  new_names: dict[str, str] = {}

  def fresh(name: str) -> str:
    return f"{re.sub(r'_[0-9]+$', '', name)}_{len(new_names)}"

  def visit(nodes) -> None:
    for node in nodes:
      for key in sorted(node.attr):
        for ref in _func_refs(node.attr[key]):
          if ref.name in library and ref.name not in new_names:
            new_names[ref.name] = fresh(ref.name)
            visit(library[ref.name].node_def)

  visit(out.node)
  for name in sorted(library):  # functions nothing refers to keep a stable name too
    if name not in new_names:
      new_names[name] = fresh(name)

  # A function's name also prefixes its argument and node names (``while_cond_27___redundant_
  # placeholder0``), so every identifier token is rewritten, in one pass, on the text form.
  pattern = re.compile(
      r"\b(" + "|".join(map(re.escape, sorted(new_names, key=len, reverse=True))) + r")(?![0-9])"
  ) if new_names else None
  if pattern is not None:
    text = pattern.sub(lambda m: new_names[m.group(1)], text_format.MessageToString(out))
    out = text_format.Parse(text, graph_pb2.GraphDef())
  functions = sorted(out.library.function, key=lambda f: f.signature.name)
  del out.library.function[:]
  out.library.function.extend(functions)
  return out


def canonical_bytes(graph_def: graph_pb2.GraphDef) -> bytes:
  """Serialized canonical form, with attribute maps in sorted order."""
  return canonicalize(graph_def).SerializeToString(deterministic=True)

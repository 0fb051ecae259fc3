"""Pytrees of tensors as federated_language types, and the paths that locate their leaves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import federated_language as fl
import numpy as np

from faxbridge.form import TensorSpec


def tensor_type(spec: TensorSpec) -> fl.TensorType:
  return fl.TensorType(np.dtype(spec.dtype), list(spec.shape))


class _Node:
  """A struct under construction: ordered children, named or positional."""

  def __init__(self):
    self.children: dict[str | int, Any] = {}

  def insert(self, keys: Sequence[str | int], leaf) -> None:
    head, rest = keys[0], keys[1:]
    if not rest:
      self.children[head] = leaf
      return
    self.children.setdefault(head, _Node()).insert(rest, leaf)

  def build(self, make_leaf, make_struct):
    items = [(k, v.build(make_leaf, make_struct) if isinstance(v, _Node) else make_leaf(v))
             for k, v in self.children.items()]
    return make_struct(items)


def nest(paths: Sequence[Sequence[str | int]], leaves: Sequence, make_leaf, make_struct):
  """Build a nested structure from leaves at struct ``paths`` (``[]``: the leaf is the whole)."""
  if len(paths) == 1 and not paths[0]:
    return make_leaf(leaves[0])
  root = _Node()
  for p, leaf in zip(paths, leaves):
    root.insert(list(p), leaf)
  return root.build(make_leaf, make_struct)


def struct_items(items):
  """federated_language struct elements: named where the key is a name, positional otherwise."""
  return [(k, v) if isinstance(k, str) else (None, v) for k, v in items]


def struct_type_of(paths, specs: Sequence[TensorSpec]) -> fl.Type:
  return nest(paths, specs, tensor_type, lambda items: fl.StructType(struct_items(items)))

"""Local computations: each piece of a split becomes a compiled federated_language computation.

Two forms, both with a flat struct parameter and a flat struct result whose elements are named by
the pieces' tensor names:

* ``tensorflow`` (default): a plain-TF GraphDef from faxbridge's own jaxpr lowering, the only form
  TFF 0.87's runtime and its MapReduceForm tooling execute;
* ``xla``: the piece's HloModuleProto, for XLA-based runtimes.

Also here: pytrees of tensors as federated_language types, and the struct paths that locate their
leaves (the parameter and result types of the federated computation are built from them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import federated_language as fl
import jax
import numpy as np
from federated_language.proto import computation_pb2 as pb
from google.protobuf import any_pb2

from faxbridge.form import Piece, TensorSpec

LOCAL_FORMS = ("tensorflow", "xla")


# -- pytrees of tensors as federated_language types ----------------------------------------------
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



def flat_struct_type(specs: Sequence[TensorSpec]) -> fl.StructType:
  return fl.StructType(struct_items([(s.name, tensor_type(s)) for s in specs]))


def _function_type(piece: Piece) -> fl.FunctionType:
  param = flat_struct_type(piece.inputs) if piece.inputs else None
  return fl.FunctionType(param, flat_struct_type(piece.outputs))


# -- TensorFlow --------------------------------------------------------------------------------
def _tf_binding(tensor_names: Sequence[str]) -> pb.TensorFlow.Binding:
  return pb.TensorFlow.Binding(struct=pb.TensorFlow.StructBinding(element=[
      pb.TensorFlow.Binding(tensor=pb.TensorFlow.TensorBinding(tensor_name=n))
      for n in tensor_names
  ]))


def tensorflow_graph(piece: Piece) -> tuple[bytes, list[str], list[str]]:
  """The piece as a plain-TF GraphDef (serialized), its input and output tensor names."""
  in_names = [f"param/{s.name}" for s in piece.inputs]
  out_names = [f"result/{s.name}" for s in piece.outputs]
  graph = _graph_def_bytes(piece, in_names, out_names)
  return graph, [f"{n}:0" for n in in_names], [f"{n}:0" for n in out_names]


def _graph_def_bytes(piece: Piece, in_names, out_names) -> bytes:
  from tensorflow.core.framework import graph_pb2

  from faxbridge.converters.tf import jaxpr_to_graph_def
  from faxbridge.converters.tf.canonical import canonical_bytes

  graph = jaxpr_to_graph_def(piece.jaxpr, in_names, out_names)
  return canonical_bytes(graph_pb2.GraphDef.FromString(graph))


def tensorflow_computation(piece: Piece) -> pb.Computation:
  graph, ins, outs = tensorflow_graph(piece)
  return pb.Computation(
      type=_function_type(piece).to_proto(),
      tensorflow=pb.TensorFlow(
          graph_def=any_pb2.Any(type_url="type.googleapis.com/tensorflow.GraphDef", value=graph),
          parameter=_tf_binding(ins) if piece.inputs else None,
          result=_tf_binding(outs),
      ),
  )


# -- XLA ---------------------------------------------------------------------------------------
def _xla_binding(count: int) -> pb.Xla.Binding:
  return pb.Xla.Binding(struct=pb.Xla.StructBinding(element=[
      pb.Xla.Binding(tensor=pb.Xla.TensorBinding(index=i)) for i in range(count)
  ]))


def xla_computation(piece: Piece) -> pb.Computation:
  """The piece as an HloModuleProto taking flat parameters and returning a flat tuple."""
  fn = jax.extend.core.jaxpr_as_fun(piece.jaxpr)
  args = [jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype)) for s in piece.inputs]
  lowered = jax.jit(lambda *a: tuple(fn(*a))).lower(*args)
  hlo = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
  return pb.Computation(
      type=_function_type(piece).to_proto(),
      xla=pb.Xla(
          hlo_module=any_pb2.Any(type_url="type.googleapis.com/xla.HloModuleProto", value=hlo),
          parameter=_xla_binding(len(piece.inputs)) if piece.inputs else None,
          result=_xla_binding(len(piece.outputs)),
      ),
  )


_BUILDERS = {"tensorflow": tensorflow_computation, "xla": xla_computation}


def local_computation(piece: Piece, form: str = "tensorflow") -> fl.framework.ConcreteComputation:
  """A typed federated_language computation running ``piece`` locally."""
  return fl.framework.ConcreteComputation.from_proto(_BUILDERS[form](piece))

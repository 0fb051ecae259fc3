"""Local computations: each piece of a split becomes a compiled federated_language computation.

Two forms, both with a flat struct parameter and a flat struct result whose elements are named by
the pieces' tensor names:

* ``tensorflow`` (default): a plain-TF GraphDef from faxbridge's own jaxpr lowering, the only form
  TFF 0.87's runtime and its MapReduceForm tooling execute;
* ``xla``: the piece's HloModuleProto, for XLA-based runtimes.

Also here: pytrees of tensors as federated_language types, and the struct paths that locate their
leaves (the parameter and result types of the federated computation are built from them).

Clients with their own data sizes (``fb.ragged``, docs/ragged.md): a ragged leaf (a client's
examples; ``ragged`` below names them, the form's inputs whose ``Binding.ragged`` is set) is typed
``TensorType(dtype, [None, ...])``, a tensor whose leading dimension, the client's own number of
examples, is unknown (issue 19 allows this in place of a ``tff.SequenceType``), in the federated
parameter and in the client piece's parameter, whose placeholder is ``[None, ...]`` too: one
computation serves clients of every size. Only the ``tensorflow`` form takes it: an XLA module has
static shapes (the exporter refuses ``local="xla"`` for a ragged program).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import federated_language as fl
import jax
import numpy as np
from federated_language.proto import computation_pb2 as pb
from google.protobuf import any_pb2

from faxbridge.extend import ExportError, Piece, TensorSpec, emit

# The computation (``computation``, ``initialize``, ``next``) whose pieces are being lowered, for
# the progress events: a piece's name alone (``server_result``) is in every computation.
_computation: contextvars.ContextVar[str] = contextvars.ContextVar("tff_computation", default="")


@contextlib.contextmanager
def lowering_computation(name: str) -> Iterator[None]:
  """While inside, pieces lowered by :func:`local_computation` belong to computation ``name``."""
  token = _computation.set(name)
  try:
    yield
  finally:
    _computation.reset(token)


# -- pytrees of tensors as federated_language types ----------------------------------------------
def tensor_type(spec: TensorSpec, ragged: bool = False) -> fl.TensorType:
  """The type of ``spec``; for a ragged leaf with an unknown leading dimension (the TF lowering's
  ``rules_ragged.input_shape``, imported only then: ragged leaves go with TF local computations)."""
  if ragged:
    from faxbridge.converters.tf.rules_ragged import input_shape

    return fl.TensorType(np.dtype(spec.dtype), input_shape(spec.shape, True))
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


def struct_type_of(paths, specs: Sequence[TensorSpec], ragged: Collection[str] = ()) -> fl.Type:
  """The struct of ``specs`` at ``paths``; the leaves named in ``ragged`` with an unknown leading
  dimension."""
  return nest(paths, specs, lambda s: tensor_type(s, s.name in ragged),
              lambda items: fl.StructType(struct_items(items)))


def flat_struct_type(specs: Sequence[TensorSpec], ragged: Collection[str] = ()) -> fl.StructType:
  return fl.StructType(struct_items([(s.name, tensor_type(s, s.name in ragged)) for s in specs]))


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """How a piece's flat inputs are grouped in the parameter it receives, so a caller can pass
  structs it already holds instead of selecting every leaf and zipping them again.

  ``groups``: per element of the parameter, how many consecutive inputs it holds (0: one input, a
  tensor; k > 0: a struct of k tensors). ``type``: the parameter's type. ``whole``: the parameter
  is the single struct of ``groups[0]`` tensors itself (not wrapped in a struct of one element).
  The default layout is the flat struct of the pieces' inputs named by their tensor names.
  """

  type: fl.Type
  groups: tuple[int, ...]
  whole: bool = False


def flat_layout(piece: Piece, ragged: Collection[str] = ()) -> ParamLayout:
  return ParamLayout(flat_struct_type(piece.inputs, ragged), (0,) * len(piece.inputs))


def _function_type(piece: Piece, layout: ParamLayout | None,
                   result_names: Sequence[str] | None = None,
                   ragged: Collection[str] = ()) -> fl.FunctionType:
  param = (layout or flat_layout(piece, ragged)).type if piece.inputs else None
  result = flat_struct_type(piece.outputs) if result_names is None else fl.StructType(
      [(n, tensor_type(s)) for n, s in zip(result_names, piece.outputs)])
  return fl.FunctionType(param, result)


def _nested_binding(layout: ParamLayout | None, count: int, leaf, struct):
  """The parameter binding of ``count`` flat inputs grouped as ``layout`` says."""
  groups = (layout.groups if layout else None) or (0,) * count
  if layout is not None and layout.whole:
    return struct([leaf(i) for i in range(count)])
  elements, i = [], 0
  for g in groups:
    if g == 0:
      elements.append(leaf(i))
      i += 1
    else:
      elements.append(struct([leaf(j) for j in range(i, i + g)]))
      i += g
  return struct(elements)


# -- TensorFlow --------------------------------------------------------------------------------
def _tf_binding(tensor_names: Sequence[str],
                layout: ParamLayout | None = None) -> pb.TensorFlow.Binding:
  return _nested_binding(
      layout, len(tensor_names),
      lambda i: pb.TensorFlow.Binding(tensor=pb.TensorFlow.TensorBinding(
          tensor_name=tensor_names[i])),
      lambda items: pb.TensorFlow.Binding(struct=pb.TensorFlow.StructBinding(element=items)))


def tensorflow_graph(piece: Piece, ragged: Collection[str] = ()) -> tuple[bytes, list[str], list[str]]:
  """The piece as a plain-TF GraphDef (serialized), its input and output tensor names; the
  placeholders of the inputs named in ``ragged`` have an unknown leading dimension."""
  in_names = [f"param/{s.name}" for s in piece.inputs]
  out_names = [f"result/{s.name}" for s in piece.outputs]
  unknown = [f"param/{s.name}" for s in piece.inputs if s.name in ragged]
  graph = _graph_def_bytes(piece, in_names, out_names, unknown)
  return graph, [f"{n}:0" for n in in_names], [f"{n}:0" for n in out_names]


def _graph_def_bytes(piece: Piece, in_names, out_names, ragged: Sequence[str] = ()) -> bytes:
  from tensorflow.core.framework import graph_pb2

  from faxbridge.converters.tf import jaxpr_to_graph_def
  from faxbridge.converters.tf.canonical import canonical_bytes

  graph = jaxpr_to_graph_def(piece.jaxpr, in_names, out_names, ragged)
  return canonical_bytes(graph_pb2.GraphDef.FromString(graph))


def tensorflow_computation(piece: Piece, layout: ParamLayout | None = None,
                           result_names: Sequence[str] | None = None,
                           ragged: Collection[str] = ()) -> pb.Computation:
  graph, ins, outs = tensorflow_graph(piece, ragged)
  return pb.Computation(
      type=_function_type(piece, layout, result_names, ragged).to_proto(),
      tensorflow=pb.TensorFlow(
          graph_def=any_pb2.Any(type_url="type.googleapis.com/tensorflow.GraphDef", value=graph),
          parameter=_tf_binding(ins, layout) if piece.inputs else None,
          result=_tf_binding(outs),
      ),
  )


# -- XLA ---------------------------------------------------------------------------------------
def _xla_binding(count: int, layout: ParamLayout | None = None) -> pb.Xla.Binding:
  return _nested_binding(
      layout, count, lambda i: pb.Xla.Binding(tensor=pb.Xla.TensorBinding(index=i)),
      lambda items: pb.Xla.Binding(struct=pb.Xla.StructBinding(element=items)))


def xla_computation(piece: Piece, layout: ParamLayout | None = None,
                    result_names: Sequence[str] | None = None,
                    ragged: Collection[str] = ()) -> pb.Computation:
  """The piece as an HloModuleProto taking flat parameters and returning a flat tuple.

  Raises:
    ExportError: the piece takes a ragged input (``export_tff`` refuses such a program first):
      an HLO module's shapes are static.
  """
  taken = sorted(s.name for s in piece.inputs if s.name in ragged)
  if taken:
    raise ExportError(f"piece {piece.name}: its inputs {taken} hold each client's own number of "
                      "examples, which an XLA local computation (static shapes) cannot take")
  fn = jax.extend.core.jaxpr_as_fun(piece.jaxpr)
  args = [jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype)) for s in piece.inputs]
  lowered = jax.jit(lambda *a: tuple(fn(*a))).lower(*args)
  hlo_module = lowered.compiler_ir("hlo")
  assert hlo_module is not None  # jax.jit's lowering always has an HLO form
  hlo = hlo_module.as_serialized_hlo_module_proto()
  return pb.Computation(
      type=_function_type(piece, layout, result_names).to_proto(),
      xla=pb.Xla(
          hlo_module=any_pb2.Any(type_url="type.googleapis.com/xla.HloModuleProto", value=hlo),
          parameter=_xla_binding(len(piece.inputs), layout) if piece.inputs else None,
          result=_xla_binding(len(piece.outputs)),
      ),
  )


_BUILDERS = {"tensorflow": tensorflow_computation, "xla": xla_computation}


def local_computation(piece: Piece, form: str = "tensorflow", layout: ParamLayout | None = None,
                      result_names: Sequence[str] | None = None, ragged: Collection[str] = ()
                      ) -> fl.framework.ConcreteComputation:
  """A typed federated_language computation running ``piece`` locally, its parameter grouped as
  ``layout`` says (default: the flat struct of its inputs), its result's elements named
  ``result_names`` (default: the outputs' tensor names); its inputs named in ``ragged`` (a
  client's examples) have an unknown leading dimension."""
  if form == "tensorflow" and "tensorflow" not in sys.modules:
    # Its import takes seconds: a step of its own, not billed to the first piece's lowering.
    emit("tff.import", "importing TensorFlow")
    import tensorflow  # noqa: F401
  where = _computation.get()
  emit("tff.lower", f"{where + ': ' if where else ''}lowering {piece.name} to a "
       f"{'TF' if form == 'tensorflow' else 'XLA'} local computation", computation=where,
       piece=piece.name, form=form)
  return fl.framework.ConcreteComputation.from_proto(
      _BUILDERS[form](piece, layout, result_names, ragged))

"""Public entry points: ``to_tf`` (a concrete function) and ``lower_jaxpr`` (a TF1-style graph)."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.extend import core as jcore
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import op_def_registry

from faxbridge.extend import ExportError

from . import allowlist
from .lower import Lowering, physical, tf_dtype
from .rules_ragged import input_shape


def _key_text(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _sanitize(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "x"


def leaf_names(prefix: str, tree: Any, top_is_sequence: bool) -> list[str]:
  """Readable unique names of the leaves of ``tree``: ``arg0_w``, ``arg1_0``, ``out0``...

  With ``top_is_sequence`` the first path entry is the position (``arg0``); otherwise the whole tree
  is position 0.
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  names, seen = [], set()
  for path in paths:
    parts = [_key_text(k) for k in path]
    if not top_is_sequence:
      parts = ["0", *parts]
    name = _sanitize(prefix + "_".join(parts)) if parts else prefix + "0"
    base, k = name, 1
    while name in seen:
      name, k = f"{base}_{k}", k + 1
    seen.add(name)
    names.append(name)
  return names


def _check_x64(names: Sequence[str], avals: Sequence[Any]) -> None:
  for name, aval in zip(names, avals):
    dt = np.dtype(physical(aval)[1])
    if dt.kind == "c":
      raise ExportError(f"input {name} has complex dtype {dt}: the tf converter supports real types")
    if dt.itemsize == 8 and not jax.config.jax_enable_x64:
      raise ExportError(
          f"input {name} has 64-bit dtype {dt} but jax_enable_x64 is off, so JAX would silently "
          f"compute in 32 bits; pass {dt.kind}{'nt' if dt.kind in 'iu' else 'loat'}32 data or "
          f"enable x64 (jax.config.update('jax_enable_x64', True))")


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x) if not hasattr(x, "dtype")
                              else x.dtype)


def to_tf(fn: Callable[..., Any], *example_args: Any) -> Any:
  """A ``tf.function`` concrete function computing ``fn`` with plain TF ops only.

  ``example_args`` are arrays or ``jax.ShapeDtypeStruct`` pytrees fixing shapes and dtypes. The
  function takes the flattened argument leaves, named ``arg{i}_{path}`` (e.g. ``arg0_w``), and returns
  a dict of the flattened outputs named ``out{i}_{path}``. Its graph (function bodies included) is
  checked against ``allowlist.ALLOWED_OPS``.
  """
  for name, leaf in zip(leaf_names("arg", tuple(example_args), top_is_sequence=True),
                        jax.tree_util.tree_leaves(example_args)):
    if hasattr(leaf, "dtype"):  # before tracing: JAX would silently narrow 64-bit types
      _check_x64([name], [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)])
  specs = jax.tree_util.tree_map(_abstract, example_args)
  closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*specs)
  in_names = leaf_names("arg", tuple(specs), top_is_sequence=True)
  out_tree = out_shapes if isinstance(out_shapes, tuple | list) else (out_shapes,)
  out_names = leaf_names("out", tuple(out_tree), top_is_sequence=True)
  in_avals = [v.aval for v in closed.jaxpr.invars]
  _check_x64(in_names, in_avals)
  signature = []
  for name, aval in zip(in_names, in_avals):
    shape, dtype = physical(aval)
    signature.append(tf.TensorSpec(shape, tf_dtype(dtype), name=name))

  @tf.function(input_signature=signature, autograph=False)
  def lowered(*args):
    outs = Lowering().lower_closed(closed, list(args))
    return {n: tf.identity(t, name=n) for n, t in zip(out_names, outs)}

  concrete = lowered.get_concrete_function()
  allowlist.check_graph_def(concrete.graph.as_graph_def())
  concrete.faxbridge_input_names = in_names
  concrete.faxbridge_output_names = out_names
  return concrete


def lower_jaxpr(closed_jaxpr: jcore.ClosedJaxpr, input_names: Sequence[str],
                output_names: Sequence[str], ragged: Collection[str] = ()) -> tf.Graph:
  """A TF1-style ``tf.Graph`` computing ``closed_jaxpr``.

  Input ``i`` is a ``Placeholder`` named ``input_names[i]`` and output ``j`` an ``Identity`` named
  ``output_names[j]``, so their tensors are ``name:0``. Keys are fed as their uint32 key data.
  The inputs named in ``ragged`` (a client's own examples) get an unknown leading dimension
  (``rules_ragged.input_shape``): the graph runs on a client of any size.
  """
  jaxpr = closed_jaxpr.jaxpr
  if len(input_names) != len(jaxpr.invars) or len(output_names) != len(jaxpr.outvars):
    raise ExportError(f"lower_jaxpr: {len(jaxpr.invars)} inputs and {len(jaxpr.outvars)} outputs, "
                      f"got {len(input_names)} and {len(output_names)} names")
  names = list(input_names) + list(output_names)
  if len(set(names)) != len(names):
    raise ExportError(f"lower_jaxpr: input and output names must be unique, got {names}")
  _check_x64(input_names, [v.aval for v in jaxpr.invars])
  unknown = set(ragged) - set(input_names)
  if unknown:
    raise ExportError(f"lower_jaxpr: ragged inputs {sorted(unknown)} are not among the inputs "
                      f"{list(input_names)}")
  graph = tf.Graph()
  with graph.as_default():
    args = []
    for name, v in zip(input_names, jaxpr.invars):
      shape, dtype = physical(v.aval)
      args.append(tf.compat.v1.placeholder(tf_dtype(dtype), input_shape(shape, name in ragged),
                                           name=name))
    outs = Lowering().lower_closed(closed_jaxpr, args)
    for name, t in zip(output_names, outs):
      out = tf.identity(t, name=name)
      if out.op.name != name:
        raise ExportError(f"lower_jaxpr: output name {name!r} is taken in the graph "
                          f"(became {out.op.name!r}); pick names without a '_<n>' clash")
  return graph


def strip_default_attrs(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
  """A copy of ``graph_def`` without attributes equal to their op's default value.

  Newer TF versions add attributes with defaults; a node that does not mention them loads in older
  TF (2.14 reading a 2.21 graph), which fills in the same defaults.
  """
  out = graph_pb2.GraphDef()
  out.CopyFrom(graph_def)

  def strip(nodes):
    for node in nodes:
      op_def = op_def_registry.get(node.op)
      if op_def is None:
        continue
      for attr in op_def.attr:
        if attr.HasField("default_value") and attr.name in node.attr and \
            node.attr[attr.name] == attr.default_value:
          del node.attr[attr.name]

  strip(out.node)
  for fn in out.library.function:
    strip(fn.node_def)
  return out


def graph_def_bytes(graph: tf.Graph | graph_pb2.GraphDef) -> bytes:
  """Serialized GraphDef of ``graph`` with default-valued attrs stripped, checked against the allowlist."""
  gd = graph.as_graph_def() if isinstance(graph, tf.Graph) else graph
  gd = strip_default_attrs(gd)
  allowlist.check_graph_def(gd)
  return gd.SerializeToString()


def jaxpr_to_graph_def(closed_jaxpr: jcore.ClosedJaxpr, input_names: Sequence[str],
                       output_names: Sequence[str], ragged: Collection[str] = ()) -> bytes:
  """``graph_def_bytes(lower_jaxpr(...))``: what the TFF exporter embeds in a TensorFlow computation."""
  return graph_def_bytes(lower_jaxpr(closed_jaxpr, input_names, output_names, ragged))

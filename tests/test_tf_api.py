"""The tf converter's public surface: names, TF1 graphs, the allowlist, errors users can act on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax import lax
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import op_def_registry
from tf_programs import assert_close, mlp, mlp_params

import faxbridge.converters.tf as fbtf
from faxbridge._src.errors import ExportError, UnsupportedPrimitiveError


def test_names_are_flattened_pytree_paths():
  params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
  cf = fbtf.to_tf(lambda p, xs: ({"y": xs[0] @ p["w"] + p["b"]}, xs[1].sum()), params,
                  [np.ones((4, 2), np.float32), np.ones(5, np.int32)])
  assert cf.faxbridge_input_names == ["arg0_b", "arg0_w", "arg1_0", "arg1_1"]
  assert cf.faxbridge_output_names == ["out0_y", "out1"]
  assert [s.name for s in cf.structured_input_signature[0]] == cf.faxbridge_input_names
  assert sorted(cf.structured_outputs) == ["out0_y", "out1"]


def test_shape_dtype_struct_inputs_and_single_output():
  spec = jax.ShapeDtypeStruct((3, 6), jnp.float32)
  params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mlp_params())
  cf = fbtf.to_tf(mlp, params, spec)
  assert cf.faxbridge_output_names == ["out0"]
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  p = mlp_params()
  leaves = jax.tree_util.tree_leaves(p)
  assert_close(cf(*leaves, x)["out0"], mlp(p, x))


def test_lower_jaxpr_builds_tf1_graph_with_named_tensors():
  def f(x, k):
    return jnp.tanh(x) * 2, jax.random.uniform(k, (3,)), lax.fori_loop(0, 3, lambda i, c: c * x, x)

  x = np.linspace(-1, 1, 3, dtype=np.float32)
  key = jax.random.PRNGKey(1)
  closed = jax.make_jaxpr(f)(x, key)
  graph = fbtf.lower_jaxpr(closed, ["x", "key"], ["y", "u", "loop"])
  gd = graph_pb2.GraphDef.FromString(fbtf.graph_def_bytes(graph))
  with tf.Graph().as_default() as g2:
    tf.graph_util.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g2) as sess:
      got = sess.run(["y:0", "u:0", "loop:0"], {"x:0": x, "key:0": np.asarray(key)})
  for g, w in zip(got, f(x, key)):
    assert_close(g, w)
  ops = {n.op for n in gd.node}
  assert {"Placeholder", "Identity"} <= ops and not any(op.startswith("Xla") for op in ops)


def test_graph_def_bytes_strips_default_valued_attrs():
  closed = jax.make_jaxpr(lambda x: lax.while_loop(lambda c: c < 10.0, lambda c: c * 2, x) + 1)(1.0)
  gd = graph_pb2.GraphDef.FromString(fbtf.jaxpr_to_graph_def(closed, ["x"], ["y"]))
  nodes = list(gd.node) + [n for f in gd.library.function for n in f.node_def]
  checked = 0
  for node in nodes:
    op_def = op_def_registry.get(node.op)
    for attr in op_def.attr:
      if attr.HasField("default_value") and attr.name in node.attr:
        assert node.attr[attr.name] != attr.default_value, (node.op, attr.name)
        checked += 1
  assert any(n.op in ("While", "StatelessWhile") for n in nodes)
  # the unstripped graph does carry default-valued attrs (else this test proves nothing)
  raw = fbtf.lower_jaxpr(closed, ["x"], ["y"]).as_graph_def()
  assert any(attr.HasField("default_value") and attr.name in n.attr and
             n.attr[attr.name] == attr.default_value
             for n in raw.node for attr in op_def_registry.get(n.op).attr)


def test_allowlist_rejects_xla_and_resource_ops():
  gd = graph_pb2.GraphDef()
  gd.node.add(name="x", op="Placeholder")
  gd.node.add(name="call", op="XlaCallModule")
  gd.node.add(name="v", op="VarHandleOp")
  fn = gd.library.function.add()
  fn.signature.name = "body"
  fn.node_def.add(name="s", op="XlaSharding")
  with pytest.raises(ExportError) as err:
    fbtf.check_graph_def(gd)
  msg = str(err.value)
  assert "XlaCallModule (XLA-only)" in msg and "VarHandleOp (resource variable)" in msg
  assert "body/s" in msg and "x [" not in msg
  with pytest.raises(ExportError):
    fbtf.graph_def_bytes(gd)


def test_allowlist_accepts_every_op_the_converter_emits_for_a_real_graph():
  cf = fbtf.to_tf(lambda x: lax.scan(lambda c, a: (c + a, c), 0.0, x), np.ones(3, np.float32))
  fbtf.check_graph_def(cf.graph.as_graph_def())
  # and a graph with a variable in it is refused
  v = tf.Variable(1.0)
  bad = tf.function(lambda x: x * v).get_concrete_function(tf.TensorSpec([], tf.float32))
  with pytest.raises(ExportError, match="resource variable"):
    fbtf.check_graph_def(bad.graph.as_graph_def())


def test_unknown_primitive_names_it_and_the_user_line(assert_points_at):
  def f(x):
    return lax.population_count(x)  # popcount-line

  with pytest.raises(UnsupportedPrimitiveError) as err:
    fbtf.to_tf(f, np.ones(3, np.int32))
  assert "'population_count'" in str(err.value)
  assert_points_at(err.value, __file__, "popcount-line")


def test_rules_are_keyed_by_primitive_objects_not_names(assert_points_at):
  """A library's own primitive that happens to be called ``add`` does not get lax.add_p's rule."""
  from jax.extend import core as jcore

  from faxbridge.converters.tf import registry

  own_add = jcore.Primitive("add")
  own_add.def_abstract_eval(lambda x: x)
  assert registry.lookup(lax.add_p).name == "add" and registry.lookup(own_add) is None
  with pytest.raises(TypeError, match="Primitive objects"):
    registry.lookup("add")
  with pytest.raises(UnsupportedPrimitiveError) as err:
    fbtf.to_tf(lambda x: own_add.bind(x), np.ones(3, np.float32))  # own-add-line
  assert "'add'" in str(err.value)
  assert_points_at(err.value, __file__, "own-add-line")


def test_64_bit_inputs_fail_clearly_without_x64():
  assert not jax.config.jax_enable_x64
  with pytest.raises(ExportError, match="arg0_x has 64-bit dtype float64"):
    fbtf.to_tf(lambda d: d["x"] * 2, {"x": jax.ShapeDtypeStruct((2,), np.float64)})


def test_registry_is_the_docs_table():
  import pathlib

  from faxbridge.converters.tf import docs

  table = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tf_primitives.md"
  assert table.read_text() == docs.render(), "regenerate: python -m faxbridge.converters.tf.docs"
  for name in ("dot_general", "conv_general_dilated", "scan", "threefry2x32", "gather", "sort"):
    assert f"| `{name}` |" in table.read_text()

"""Tests of converters/tflite/export.py: named signatures with TFLITE_BUILTINS only, a client work
with a local epoch (fb.fold over its own batches) converting to a WHILE, errors that list the
unsupported operations, determinism, and the measured reason the plain-TF lowering is the default."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from jax import lax
from jax.extend import core as jcore
from tf_programs import assert_close

import faxbridge as fb
from examples import fedavg, two_stage
from faxbridge._src.errors import ExportError
from faxbridge._src.export import read_manifest
from faxbridge.converters.tflite import export as tx
from faxbridge.extend import fold_p

# Op names the LiteRT runtime exposes for kernels outside the builtin set.
NON_BUILTIN = ("FLEX", "CUSTOM", "DELEGATE")


def _random_args(piece, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s.shape).astype(s.dtype) if s.dtype.startswith("float")
          else rng.integers(0, 4, size=s.shape).astype(s.dtype) for s in piece.inputs]


def _run(model: bytes, piece, args):
  runner = Interpreter(model_content=model).get_signature_runner(piece.name)
  out = runner(**{s.name: a for s, a in zip(piece.inputs, args)})
  return [out[s.name] for s in piece.outputs]


def test_piece_has_a_named_builtin_only_signature():
  form = fb.split(two_stage.computation, *two_stage.example_inputs())
  piece = form.stages[1].client_work
  model = tx.convert_piece(piece)
  signatures = Interpreter(model_content=model).get_signature_list()
  assert signatures == {piece.name: {"inputs": sorted(s.name for s in piece.inputs),
                                     "outputs": sorted(s.name for s in piece.outputs)}}
  ops = tx.model_ops(model)
  assert ops and not [op for op in ops if op.startswith(NON_BUILTIN)], ops
  args = _random_args(piece)
  want = jcore.jaxpr_as_fun(piece.jaxpr)(*args)
  for got, w in zip(_run(model, piece, args), want):
    np.testing.assert_allclose(got, np.asarray(w), rtol=1e-5, atol=1e-6)


def test_unsupported_primitives_are_listed_with_their_lines(assert_points_at):
  def client(x):
    a = jnp.sinh(x)  # sinh-line
    b = jnp.real(jnp.fft.fft(x))  # fft-line
    return a + b

  @fb.computation(in_placements=(fb.CLIENTS,))
  def program(x):
    return fb.sum(fb.map(client, x))

  form = fb.split(program, np.zeros((3, 4), np.float32))
  with pytest.raises(ExportError) as info:
    tx.convert_piece(form.stages[0].client_work)
  message = str(info.value)
  assert "sinh (its TF ops have no TFLite builtin)" in message
  assert "fft (no tf rule)" in message
  assert_points_at(info.value, __file__, "sinh-line")
  assert_points_at(info.value, __file__, "fft-line")


@pytest.mark.slow  # a real TFLite conversion that fails: 2-3 s
def test_converter_failure_names_the_primitive_and_line_first(assert_points_at):
  """An int32 matmul passes the table's check (dot_general is 'partial': float32 is builtin) but
  has no TFLITE_BUILTINS kernel: the converter's own failure must lead with the JAX primitive and
  the user's line, not with its MLIR dump."""
  def client(x):
    i = (x * 10).astype(jnp.int32)
    # inside a loop: the diagnostics also name the loop's op; the innermost equation is reported
    total, _ = lax.scan(lambda c, row: (c + jnp.sum(row[None] @ i.T), None), 0, i)  # int-matmul-line
    return total.astype(jnp.float32) + jnp.sin(x).sum()

  @fb.computation(in_placements=(fb.CLIENTS,))
  def program(x):
    return fb.sum(fb.map(client, x))

  form = fb.split(program, np.zeros((3, 4, 4), np.float32))
  with pytest.raises(ExportError) as info:
    tx.convert_piece(form.stages[0].client_work)
  first, rest = str(info.value).split("\n", 1)
  assert "JAX primitive 'dot_general'" in first and "did not convert to TFLite builtins" in first
  assert "loc(" not in first and "'sin'" not in first and "'scan'" not in first, first
  assert_points_at(first, __file__, "int-matmul-line")
  assert "MatMul" in rest  # the converter's own diagnostics follow


def test_vector_products_and_bool_arithmetic_convert_and_run():
  """A vector @ matrix product (the gradient of x @ w for a vector w) and integer arithmetic on a
  cast bool used to fail in the converter; both are builtins now and LiteRT equals JAX."""
  def client(x, w):
    g = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w)  # vector @ matrix in the backward pass
    parity = (x > 0).astype(jnp.int32) % 2 + (x < 0).astype(jnp.int32) // 2
    return g + jnp.sum(parity, axis=0).astype(jnp.float32), w @ w, x[:, 0] @ x

  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def program(x, w):
    g, n, v = fb.map(client, x, w)
    return fb.sum(g), fb.sum(n), fb.sum(v)

  r = np.random.default_rng(4)
  form = fb.split(program, r.normal(size=(2, 3, 4)).astype(np.float32),
                  r.normal(size=(2, 4)).astype(np.float32))
  piece = form.stages[0].client_work
  model = tx.convert_piece(piece)
  ops = tx.model_ops(model)
  assert not [op for op in ops if op.startswith(NON_BUILTIN)], ops
  args = _random_args(piece, seed=5)
  want = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr))(*args)
  for got, w in zip(_run(model, piece, args), want, strict=True):
    assert_close(got, np.asarray(w), what="LiteRT vs jax")


def test_converter_error_ops_are_extracted():
  message = ("Some ops are not supported by the native TFLite runtime\nTF Select ops: Sinh, Cosh\n"
             "Details:\n\ttf.Sinh(tensor<4xf32>) -> (tensor<4xf32>) : {device = \"\"}\n")
  assert tx._converter_ops(message) == ["Cosh", "Sinh"]


def test_options_are_checked(tmp_path):
  args = two_stage.example_inputs()
  with pytest.raises(ExportError, match="option lowering='x' of target 'tflite' must be one of"):
    fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "a", lowering="x")
  with pytest.raises(ExportError, match="target 'tflite' has no option 'stablehlo_version'"):
    fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "b",
              stablehlo_version="week_12")
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_local_epochs_convert_to_a_while_loop():
  """FedAvg's local epoch, an fb.fold over the client's own batches, becomes a TFLite WHILE in a
  model whose examples' leading dimension is dynamic (as the export converts it). On one client's
  own 37 rows (two whole batches of 16 and a partial one) it equals the piece run by JAX on the
  same rows padded to the traced length with NaN, which the fold never reads."""
  form = fb.split(fedavg.computation, *fedavg.example_inputs())
  piece = form.stages[0].client_work
  assert any(e.primitive is fold_p for e in piece.jaxpr.jaxpr.eqns)
  ragged = {b.name for b in form.inputs if b.ragged}
  assert ragged == {"data_examples_x", "data_examples_y"}
  model = tx.convert_piece(piece, ragged=ragged)
  assert "WHILE" in tx.model_ops(model)
  own = 37
  padded = [np.asarray(own, s.dtype) if s.name == "data_count" else a
            for s, a in zip(piece.inputs, _random_args(piece, seed=3))]
  padded = [np.concatenate([a[:own], np.full_like(a[own:], np.nan)]) if s.name == "data_examples_x"
            else a for s, a in zip(piece.inputs, padded)]
  want = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr))(*padded)
  rows = [a[:own] if s.name in ragged else a for s, a in zip(piece.inputs, padded)]
  for got, w in zip(_run(model, piece, rows), want, strict=True):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_jax2tf_lowering_cannot_run_client_training():
  """The measurement behind the default (docs/targets.md): jax2tf's StableHLO legalizes the
  gradient of take_along_axis to STABLEHLO_SCATTER, which LiteRT cannot prepare."""
  form = fb.split(fedavg.computation, *fedavg.example_inputs())
  piece = form.stages[0].client_work
  with pytest.raises(ExportError, match="STABLEHLO_SCATTER"):
    tx.convert_piece(piece, lowering="jax2tf")
  # The server pieces, which have no such op, convert both ways to the same ops.
  server = form.server_result
  assert tx.model_ops(tx.convert_piece(server, "jax2tf")) == tx.model_ops(tx.convert_piece(server))


@pytest.mark.slow
def test_export_is_deterministic_and_lists_ops(example_export, tmp_path):
  args = two_stage.example_inputs()
  a, _ = example_export("two_stage", "computation", "tflite")  # made by conftest, elsewhere
  b = fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "b")
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  assert len([f for f in files if f.suffix == ".tflite"]) == 5
  root = str(pathlib.Path(fb.__file__).resolve().parent.parent).encode()
  for rel in files:
    data = (a / rel).read_bytes()
    assert data == (b / rel).read_bytes(), rel
    assert root not in data and b"test_tflite_export" not in data, rel
  manifest = read_manifest(a)
  assert manifest["tflite"]["lowering"] == "tf"
  assert set(manifest["tflite"]["ops"]) == {str(f) for f in files if f.suffix == ".tflite"}


# --- 8 and 16-bit integers -------------------------------------------------------------------------

SMALL_INTS = ("int8", "uint8", "int16")  # the types federated programs use (tests/federated_programs.py)


def _full_range(dtype, shape, rng):
  """Values over the whole range of ``dtype``, with both extremes and zero."""
  info = np.iinfo(dtype)
  x = rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
  x.flat[:3] = info.min, info.max, 0
  return x


def _small_int_client(x, y):
  pred = jnp.reshape(y, (-1,))[0] > x[0, 0]  # a comparison on the small type feeding lax.cond
  picked = lax.cond(pred, lambda a: a[1:3] + a[:2], lambda a: a[::-1][:2] - a[2:], x)
  return (jnp.maximum(x, y), jnp.minimum(x, y), jnp.clip(x, 3, 100), picked, x[1:, :2], x[::2],
          lax.dynamic_slice(x, (1, 1), (2, 3)), x * y, (x >= y).astype(x.dtype))


# int8 in the quick suite (2 s per conversion); uint8 and int16 in the slow one.
@pytest.mark.parametrize("dtype", [d if d == "int8" else pytest.param(d, marks=pytest.mark.slow)
                                   for d in SMALL_INTS])
def test_small_int_pieces_are_builtins_and_equal_jax(dtype):
  """Max, min, clip, a comparison feeding lax.cond and slices of int8/uint8/int16 used to fail the
  export (no TFLite kernel for MAXIMUM, GREATER, SLICE... on them); they are computed in int32 and
  narrowed back, bit-exact, wrapping products included."""
  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def program(x, y):
    return tuple(fb.max(o) for o in fb.map(_small_int_client, x, y))

  rng = np.random.default_rng(7)
  form = fb.split(program, _full_range(dtype, (3, 4, 5), rng), _full_range(dtype, (3, 4, 5), rng))
  piece = form.stages[0].client_work
  model = tx.convert_piece(piece)
  ops = tx.model_ops(model)
  assert not [op for op in ops if op.startswith(NON_BUILTIN)], ops
  assert {"MAXIMUM", "MINIMUM", "GREATER", "IF"} <= set(ops), ops
  for seed in range(3):
    rng = np.random.default_rng(seed)
    args = [_full_range(s.dtype, s.shape, rng) for s in piece.inputs]
    want = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr))(*args)
    for got, w in zip(_run(model, piece, args), want, strict=True):
      assert got.dtype == np.asarray(w).dtype
      np.testing.assert_array_equal(got, np.asarray(w))


def _graph_ops(fn, *args) -> list[tuple[str, str]]:
  """(op type, dtype attr T) of each node of ``fn``'s lowered TF graph, function bodies included."""
  import faxbridge.converters.tf as fbtf

  graph = fbtf.to_tf(fn, *args).graph.as_graph_def()
  nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
  return [(n.op, tf_dtype_name(n.attr["T"].type) if "T" in n.attr else "") for n in nodes]


def tf_dtype_name(enum: int) -> str:
  import tensorflow as tf

  return tf.dtypes.as_dtype(enum).name


def test_small_ints_are_widened_only_where_tflite_lacks_the_kernel():
  """TF graphs (TFF's) keep their ops where TFLite has a kernel for the type: int16 == and <,
  int8 slices and every int32 op stay as they are; int8 max and int16 slices go through int32."""
  i8, i16, i32 = (np.arange(-3, 3, dtype=d).reshape(2, 3) for d in (np.int8, np.int16, np.int32))
  kept = _graph_ops(lambda a, b, c: (a == a[::-1], a < a[::-1], b[:1], jnp.maximum(c, c[::-1])),
                    i16, i8, i32)
  assert ("Equal", "int16") in kept and ("Less", "int16") in kept and ("Maximum", "int32") in kept
  assert not [op for op, _ in kept if op == "Cast"], kept
  widened = _graph_ops(lambda a, b: (jnp.maximum(a, -a), lax.dynamic_slice(b, (1, 0), (1, 2))),
                       i8, i16)
  assert ("Maximum", "int32") in widened and ("Maximum", "int8") not in widened, widened
  assert ("Slice", "int32") in widened and ("Slice", "int16") not in widened, widened
  # int8 -a: its operand in and its result out (2); the max: two operands in, one result out (3);
  # the int16 slice: one in, one out (2)
  assert [op for op, _ in widened].count("Cast") == 7, widened


def _one_op(op: str, dtype: str):
  """A tf.function applying TF op ``op`` to (4, 3) tensors of ``dtype`` (as the lowering emits it)."""
  import tensorflow as tf

  t = tf.as_dtype(dtype)
  two = lambda f: ([t, t], f)
  one = lambda f: ([t], f)
  table = {
      "AddV2": two(tf.add), "Sub": two(tf.subtract), "Mul": two(tf.multiply),
      "FloorDiv": one(lambda x: tf.math.floordiv(x, tf.constant(3, t))),
      "FloorMod": one(lambda x: tf.math.floormod(x, tf.constant(3, t))),
      "Neg": one(tf.negative), "Abs": one(tf.abs), "Sign": one(tf.sign),
      "Maximum": two(tf.maximum), "Minimum": two(tf.minimum), "Equal": two(tf.equal),
      "NotEqual": two(tf.not_equal), "Less": two(tf.less), "LessEqual": two(tf.less_equal),
      "Greater": two(tf.greater), "GreaterEqual": two(tf.greater_equal),
      "SelectV2": ([tf.bool, t, t], tf.where),
      "BroadcastTo": one(lambda x: tf.broadcast_to(tf.reshape(x, [4, 3, 1]), [4, 3, 2])),
      "Transpose": one(tf.transpose), "ConcatV2": two(lambda x, y: tf.concat([x, y], 0)),
      "Pack": two(lambda x, y: tf.stack([x, y])), "Split": one(lambda x: tf.split(x, 2)),
      "SplitV": one(lambda x: tf.split(x, [1, 3])),
      "StridedSlice": one(lambda x: x[1:4:2, ::-1]), "Slice": one(lambda x: tf.slice(x, [1, 0], [2, 2])),
      "ReverseV2": one(lambda x: tf.reverse(x, [1])),
      "PadV2": one(lambda x: tf.pad(x, [[1, 0], [0, 2]], constant_values=tf.constant(5, t))),
      "Pad": one(lambda x: tf.pad(x, [[1, 0], [0, 2]])),
      "Fill": one(lambda x: tf.fill([100, 2], tf.reshape(x, [-1])[0])),
      "Sum": one(lambda x: tf.reduce_sum(x, 1)), "Max": one(lambda x: tf.reduce_max(x, 1)),
      "Min": one(lambda x: tf.reduce_min(x, 1)), "Prod": one(lambda x: tf.reduce_prod(x, 1)),
      "ArgMax": one(lambda x: tf.argmax(x, 1, output_type=tf.int32)),
      "ArgMin": one(lambda x: tf.argmin(x, 1, output_type=tf.int32)),
      "Cumsum": one(lambda x: tf.cumsum(x, 1)), "TopKV2": one(lambda x: tf.math.top_k(x, 2)[0]),
      "GatherV2": one(lambda x: tf.gather(x, [2, 0])),
      "GatherNd": one(lambda x: tf.gather_nd(x, [[1, 2], [3, 0]])),
      "ScatterNd": one(lambda x: tf.scatter_nd([[1], [3], [0], [2]], x, [5, 3])),
  }
  types, f = table[op]
  specs = [tf.TensorSpec([4, 3], d, name=f"in{i}") for i, d in enumerate(types)]
  return tf.function(f, input_signature=specs, autograph=False)


# Converts, but LiteRT crashes the process running it: only the conversion is checked.
_CRASHES_LITERT = {("Equal", "uint8")}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_no_tflite_kernel_table_is_as_measured(dtype):
  """``NO_TFLITE_KERNEL`` is a measurement: each listed (op, type) fails to convert with
  TFLITE_BUILTINS only, and each op it lists runs on LiteRT, equal to TF, for the types it does not
  list. A converter or LiteRT that gains or loses a kernel fails here, so the table is redone."""
  import tensorflow as tf

  from faxbridge.converters.tf._util import NO_TFLITE_KERNEL

  wrong = []
  rng = np.random.default_rng(0)
  for op, missing in sorted(NO_TFLITE_KERNEL.items()):
    fn = _one_op(op, dtype)
    try:
      concrete = fn.get_concrete_function()
    except TypeError:  # no TF kernel either (Neg, Abs, Sign of unsigned): never emitted
      if dtype in missing:
        wrong.append(f"{op} on {dtype} is listed but TF has no such op")
      continue
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
      model = converter.convert()
    except Exception:
      if dtype not in missing:
        wrong.append(f"{op} on {dtype} does not convert but is not listed")
      continue
    if (op, dtype) in _CRASHES_LITERT:
      continue
    if dtype in missing:
      wrong.append(f"{op} on {dtype} converts but is listed")
      continue
    args = [rng.integers(0, 2, (4, 3)).astype(bool) if s.dtype == tf.bool
            else _full_range(dtype, (4, 3), rng) for s in fn.input_signature]
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    for d in interpreter.get_input_details():
      interpreter.set_tensor(d["index"], args[int(re.search(r"in(\d+)", d["name"]).group(1))])
    interpreter.invoke()
    got = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    want = [np.asarray(w) for w in tf.nest.flatten(fn(*args))]
    # the outputs' order is the converter's (Split's two pieces): compared as a multiset
    key = lambda a: (str(a.dtype), a.shape, a.tobytes())
    if sorted(map(key, got)) != sorted(map(key, want)):
      wrong.append(f"{op} on {dtype}: LiteRT differs from TF")
  assert not wrong, wrong

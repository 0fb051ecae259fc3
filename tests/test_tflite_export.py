"""Tests of converters/tflite/export.py: named signatures with TFLITE_BUILTINS only, a client work
with local epochs (lax.scan) converting to a WHILE, errors that list the unsupported operations,
determinism, and the measured reason the plain-TF lowering is the default."""

from __future__ import annotations

import pathlib

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
from faxbridge.converters.tflite import export as tx
from faxbridge.errors import ExportError
from faxbridge.export import read_manifest

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
  with pytest.raises(ExportError, match="--lowering must be one of"):
    fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "a", lowering="x")
  with pytest.raises(ExportError, match="takes only lowering"):
    fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "b",
              stablehlo_version="week_12")
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_local_epochs_convert_to_a_while_loop():
  form = fb.split(fedavg.computation, *fedavg.example_inputs())
  piece = form.stages[0].client_work
  assert any(e.primitive.name == "scan" for e in piece.jaxpr.jaxpr.eqns)
  model = tx.convert_piece(piece)
  assert "WHILE" in tx.model_ops(model)
  args = _random_args(piece, seed=3)
  args = [np.abs(a) + 1 if s.name == "data_num_examples" else a for s, a in zip(piece.inputs, args)]
  want = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr))(*args)
  for got, w in zip(_run(model, piece, args), want):
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
def test_export_is_deterministic_and_lists_ops(tmp_path):
  args = two_stage.example_inputs()
  a = fb.export(two_stage.computation, *args, target="tflite", out_dir=tmp_path / "a")
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

"""``--target=tflite``: every piece of the split as a ``.tflite`` model, plus the runtime-neutral plan.

Per piece, ``pieces/<computation>/<piece>.tflite`` holds one signature whose key is the piece's
name and whose inputs and outputs carry the plan's tensor names; only ``TFLITE_BUILTINS`` ops are
allowed (no TF Select, no custom ops), so LiteRT runs it with its builtin kernels.

How a piece becomes TFLite (``lowering``, ``--lowering``; measured in ``docs/targets.md``):

* ``"tf"`` (default): faxbridge's own jaxpr -> plain TF ops lowering
  (``faxbridge.converters.tf``), then TF's TFLiteConverter. ``lax.scan`` becomes a TF while loop and
  a TFLite ``WHILE``; every example converts and runs.
* ``"jax2tf"``: ``jax2tf`` (an ``XlaCallModule`` holding StableHLO), then the converter's StableHLO
  legalization. Kept for comparison: it emits ``STABLEHLO_SCATTER`` for the gradient of an indexing
  op (``take_along_axis`` in a softmax cross-entropy), which LiteRT fails to prepare, so client
  training does not run.

After converting, the export runs each model once on zeros: an op that converts but that LiteRT's
kernels cannot prepare fails the export, not a device.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge._source import describe
from faxbridge.converters import plan as fplan
from faxbridge.errors import ExportError, FaxbridgeError

LOWERINGS = ("tf", "jax2tf")


def _unsupported_primitives(closed) -> list[str]:
  """Primitives of ``closed`` (sub-jaxprs included) the plain-TF lowering cannot take to TFLite
  builtins: no rule at all, or a rule whose ops have no builtin (``tflite="tf-only"``)."""
  from jax.extend import core as jcore

  from faxbridge.converters.tf import registry

  found: dict[Any, str] = {}  # keyed by the Primitive object, as the rule table

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      info = registry.lookup(eqn.primitive)
      if info is None or info.tflite == "tf-only":
        why = "no tf rule" if info is None else "its TF ops have no TFLite builtin"
        found.setdefault(eqn.primitive, f"{eqn.primitive.name} ({why}){describe(eqn.source_info)}")
      for sub in jcore.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed.jaxpr)
  return list(found.values())


def _tf_function(piece, lowering: str):
  """A ``tf.function`` of the piece over named inputs, returning a dict of named outputs."""
  import tensorflow as tf

  signature = [tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in piece.inputs]
  if lowering == "tf":
    from faxbridge.converters.tf import Lowering

    body = lambda *args: Lowering().lower_closed(piece.jaxpr, list(args))
  else:
    from jax.experimental import jax2tf
    from jax.extend import core as jcore

    body = jax2tf.convert(jcore.jaxpr_as_fun(piece.jaxpr), with_gradient=False)

  @tf.function(input_signature=signature, autograph=False)
  def fn(*args):
    return {s.name: tf.identity(t) for s, t in zip(piece.outputs, body(*args))}

  return fn


def _converter_ops(message: str) -> list[str]:
  """The TF op names a TFLiteConverter error mentions (``tf.Foo`` and 'TF Select ops: A, B')."""
  ops = set(re.findall(r"\btf\.([A-Z][A-Za-z0-9_]*)", message))
  for line in re.findall(r"(?:TF Select ops|Flex ops|custom ops):\s*([^\n]*)", message):
    ops.update(o.strip() for o in line.split(",") if o.strip())
  return sorted(ops)


def convert_piece(piece, lowering: str = "tf") -> bytes:
  """The ``.tflite`` bytes of one piece: signature ``piece.name``, TFLITE_BUILTINS only.

  Raises:
    ExportError: listing the primitives (with the user's file:line) or TF ops that have no
      TFLite builtin, or the ops LiteRT could not prepare.
  """
  import tensorflow as tf

  if lowering not in LOWERINGS:
    raise ExportError(f"--lowering must be one of {LOWERINGS}, got {lowering!r}")
  where = f"piece {piece.name}"
  if lowering == "tf":
    bad = _unsupported_primitives(piece.jaxpr)
    if bad:
      raise ExportError(f"{where} cannot become TFLite builtins; unsupported JAX primitives:\n  "
                        + "\n  ".join(bad))
  try:
    fn = _tf_function(piece, lowering)
    concrete = fn.get_concrete_function()
  except FaxbridgeError as e:
    raise ExportError(f"{where}: lowering to TensorFlow failed: {e}") from e
  with tempfile.TemporaryDirectory(prefix="faxbridge-tflite-") as tmp:
    # A SavedModel signature is what gives the .tflite its named signature (key, input and
    # output names); from_concrete_functions leaves the model without one.
    module = tf.Module()
    module.fn = fn
    tf.saved_model.save(module, tmp, signatures={piece.name: concrete})
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[piece.name])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.allow_custom_ops = False
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = converter.convert()
    except Exception as e:  # ConverterError: the MLIR diagnostics name the ops
      ops = _converter_ops(str(e))
      listed = f"; ops without a TFLITE_BUILTINS kernel: {', '.join(ops)}" if ops else ""
      raise ExportError(f"{where}: the TFLite converter (TFLITE_BUILTINS only) failed{listed}\n"
                        f"{str(e)[-3000:]}") from e
  _smoke_run(model, piece, where)
  return model


def model_ops(model: bytes) -> list[str]:
  """The distinct op names of a ``.tflite`` model (its subgraphs included)."""
  from ai_edge_litert.interpreter import Interpreter

  interpreter = Interpreter(model_content=model)
  return sorted({d["op_name"] for d in interpreter._get_ops_details()})


def _smoke_run(model: bytes, piece, where: str) -> None:
  from ai_edge_litert.interpreter import Interpreter

  try:
    runner = Interpreter(model_content=model).get_signature_runner(piece.name)
    runner(**{s.name: np.zeros(s.shape, s.dtype) for s in piece.inputs})
  except Exception as e:  # LiteRT's "Node number N (OP) failed to prepare"
    named = sorted(set(re.findall(r"\(([A-Z][A-Z0-9_]+)\) failed to prepare", str(e))))
    ops = ", ".join(named or model_ops(model))
    raise ExportError(f"{where}: converted, but LiteRT cannot run it (ops: {ops}): {e}") from e


def export_tflite(split, out: Path, lowering: str = "tf", **options: Any) -> dict:
  """Write every piece's ``.tflite`` and ``plan.json`` into ``out``; return the manifest part
  (plan file, lowering, ops per piece, verify blocks).

  Raises:
    ExportError: unknown options, a piece that does not convert (naming the ops), or a program
      that cannot be split.
  """
  if options:
    raise ExportError(f"the tflite target takes only lowering, not {sorted(options)}")
  if lowering not in LOWERINGS:
    raise ExportError(f"--lowering must be one of {LOWERINGS}, got {lowering!r}")
  ops: dict[str, list[str]] = {}

  def write(comp_name: str, piece) -> dict[str, str]:
    rel = f"pieces/{comp_name}/{piece.name}.tflite"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    model = convert_piece(piece, lowering)
    (out / rel).write_bytes(model)
    ops[rel] = model_ops(model)
    return {"tflite": rel}

  plan = fplan.build_plan(split, write)
  fplan.write_plan(plan, out)
  return {"plan": fplan.PLAN_FILE,
          "tflite": {"lowering": lowering, "ops_set": "TFLITE_BUILTINS", "ops": ops}}

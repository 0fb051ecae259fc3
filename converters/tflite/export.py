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

Clients with their own data sizes (``fb.ragged``, docs/ragged.md): a client piece's ragged inputs
(a client's examples) have an unknown leading dimension in the model (shape signature
``[-1, ...]``, from ``rules_ragged.input_shape``), a TFLite dynamic dimension: LiteRT resizes the
input to each client's own rows (``converters/runtimes/litert.py``), so ONE ``.tflite`` file serves
clients of every size; the count stays an ordinary int32 input. The fold is a TFLite ``WHILE`` of
``count`` steps. The smoke run then also runs an empty client (zero rows).
"""

from __future__ import annotations

import re
import sys
import tempfile
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.converters import plan as fplan
from faxbridge.converters.tflite import LOWERINGS
from faxbridge.extend import ExportError, FaxbridgeError, describe, emit, user_name

# Dtypes TFLite's builtin kernels (TFLITE_BUILTINS) do not compute: the converter would fail on the
# first op holding one, with a dump of TF ops ('tf.Mul' op is neither a custom op nor a flex op).
NO_BUILTIN_DTYPES = ("float64",)


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


def _values_without_kernels(split) -> list[str]:
  """The values of ``split`` whose dtype TFLite's builtins lack (:data:`NO_BUILTIN_DTYPES`), named
  as the user knows them: each computation's input and output leaves by pytree path
  (``step's input params['w1']``); when no leaf is one, the equations inside the pieces that make
  one, with the user's file:line (a cast to float64 in a float32 program)."""
  from jax.extend import core as jcore

  leaves: list[str] = []
  inside: dict[tuple[Any, str], str] = {}  # keyed by (Primitive, dtype): one line per primitive
  for comp_name, form in split.forms.items():
    where = split.name if comp_name == "computation" else f"{split.name}.{comp_name}"
    for kind, bindings in (("input", form.inputs), ("output", form.outputs)):
      for b in bindings:
        if b.spec.dtype in NO_BUILTIN_DTYPES:
          shape = ",".join(map(str, b.spec.shape))
          leaves.append(f"{where}'s {kind} {user_name(b, form.arg_names, kind == 'output')} "
                        f"({b.spec.dtype}[{shape}], {b.placement.value})")

    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        for v in eqn.outvars:
          dtype = str(getattr(v.aval, "dtype", ""))
          if dtype in NO_BUILTIN_DTYPES:
            inside.setdefault((eqn.primitive, dtype),
                              f"a {dtype} value made by '{eqn.primitive.name}'"
                              f"{describe(eqn.source_info)}")
        for sub in jcore.jaxprs_in_params(eqn.params):
          walk(sub)

    for piece in form.pieces():
      if piece.jaxpr is not None:
        walk(piece.jaxpr.jaxpr)
  return leaves or list(inside.values())


def check_dtypes(split) -> None:
  """Refuse, before anything is converted, a program holding a value TFLite's builtins cannot
  compute (float64): one ExportError naming the first such value (its pytree path, or the user's
  line that makes it), listing all, and saying what to do instead."""
  found = _values_without_kernels(split)
  if not found:
    return
  more = f" (and {len(found) - 1} more, listed below)" if len(found) > 1 else ""
  raise ExportError(
      f"the tflite target cannot export {found[0]}{more}: TFLite's builtin kernels "
      f"(TFLITE_BUILTINS) have no {'/'.join(NO_BUILTIN_DTYPES)} kernels. Cast to float32 (the "
      "example inputs with x.astype(np.float32), values inside the computation with "
      ".astype(jnp.float32)), or export to target stablehlo or tff, which run float64:\n  "
      + "\n  ".join(found))


def _tf_function(piece, lowering: str, scoped=None, ragged: frozenset[str] = frozenset()):
  """A ``tf.function`` of the piece over named inputs, returning a dict of named outputs.

  ``scoped`` (a ``Lowering(name_scopes=True)``, ``"tf"`` lowering only) lowers the piece with each
  equation's ops under its own name scope, to find which equation a converter error is about.
  The inputs named in ``ragged`` (a client's own examples) get an unknown leading dimension.
  """
  import tensorflow as tf

  from faxbridge.converters.tf.rules_ragged import input_shape

  signature = [tf.TensorSpec(input_shape(s.shape, s.name in ragged), tf.as_dtype(s.dtype),
                             name=s.name) for s in piece.inputs]
  if lowering == "tf":
    from faxbridge.converters.tf import Lowering

    body = lambda *args: (scoped or Lowering()).lower_closed(piece.jaxpr, list(args))
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


def convert_piece(piece, lowering: str = "tf", ragged: Collection[str] = ()) -> bytes:
  """The ``.tflite`` bytes of one piece: signature ``piece.name``, TFLITE_BUILTINS only.

  ``ragged``: names of the piece's inputs that hold a client's own examples (``fb.ragged``): their
  leading dimension is dynamic in the model (any number of rows, zero included).

  Raises:
    ExportError: listing the primitives (with the user's file:line) or TF ops that have no
      TFLite builtin, or the ops LiteRT could not prepare. When the converter itself fails, the
      first line names the JAX primitive and the user's file:line it failed on. A ragged input
      with ``lowering="jax2tf"`` (which exports the traced, padded shapes only).
  """
  if lowering not in LOWERINGS:
    raise ExportError(f"--lowering must be one of {LOWERINGS}, got {lowering!r}")
  where = f"piece {piece.name}"
  ragged = frozenset(ragged) & {s.name for s in piece.inputs}
  if ragged and lowering != "tf":
    raise ExportError(
        f"{where}: its inputs {sorted(ragged)} hold each client's own number of examples "
        f"(fb.ragged), which only lowering='tf' exports (an unknown leading dimension); "
        f"lowering={lowering!r} fixes the padded shape it was traced with. Export with "
        "lowering='tf' (the default).")
  if lowering == "tf":
    bad = _unsupported_primitives(piece.jaxpr)
    if bad:  # the first line names the first one, with its line; all are listed below it
      more = f" (and {len(bad) - 1} more, listed below)" if len(bad) > 1 else ""
      raise ExportError(f"{where} cannot become TFLite builtins: JAX primitive {bad[0]}{more}; "
                        "unsupported JAX primitives:\n  " + "\n  ".join(bad))
  try:
    fn = _tf_function(piece, lowering, ragged=ragged)
    concrete = fn.get_concrete_function()
  except FaxbridgeError as e:
    raise ExportError(f"{where}: lowering to TensorFlow failed: {e}") from e
  try:
    model = _convert(fn, concrete, piece.name)
  except Exception as e:  # ConverterError: MLIR diagnostics, naming TF ops, not the user's code
    raise _converter_error(piece, lowering, where, str(e), ragged) from e
  _smoke_run(model, piece, where, ragged)
  return model


def _convert(fn, concrete, name: str) -> bytes:
  """TFLiteConverter (TFLITE_BUILTINS only) on ``fn``, whose signature ``name`` is ``concrete``."""
  import tensorflow as tf

  with tempfile.TemporaryDirectory(prefix="faxbridge-tflite-") as tmp:
    # A SavedModel signature is what gives the .tflite its named signature (key, input and
    # output names); from_concrete_functions leaves the model without one.
    module = tf.Module()
    module.fn = fn
    tf.saved_model.save(module, tmp, signatures={name: concrete})
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[name])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.allow_custom_ops = False
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return converter.convert()


def _error_lines(message: str) -> str:
  """The MLIR diagnostics of severity error (each line holds its location), not the notes."""
  return "\n".join(line for line in message.splitlines() if ": error:" in line)


def _culprits(piece, ragged: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
  """(primitive name, " at file:line (fn)") of the equations whose TF ops the converter rejects.

  The failed conversion is repeated on a lowering that puts each equation's ops under its own name
  scope (not done for the export itself: scopes rename ops, and so the exported bytes); the
  converter's error locations then name the scopes. Empty when no scoped op is named.
  """
  from faxbridge.converters.tf import Lowering

  scoped = Lowering(name_scopes=True)
  fn = _tf_function(piece, "tf", scoped, ragged)
  try:
    _convert(fn, fn.get_concrete_function(), piece.name)
  except Exception as e:
    return scoped.equations_named(_error_lines(str(e))) or scoped.equations_named(str(e))
  return []


def _converter_error(piece, lowering: str, where: str, message: str,
                     ragged: frozenset[str] = frozenset()) -> ExportError:
  """An error whose first line names the JAX primitive(s) and the user's line(s) the converter
  failed on (when the ``"tf"`` lowering lets them be found), then the TF ops, then the MLIR dump."""
  ops = _converter_ops(message)
  listed = f"ops without a TFLITE_BUILTINS kernel: {', '.join(ops)}" if ops else ""
  found = re.search(r"error: ([^\n]*)", message)
  # the diagnostic's own text, without the MLIR location that leads it
  reason = re.sub(r"^loc\(.*\):\s*", "", found.group(1).strip())[:300] if found else "conversion failed"
  culprits = _culprits(piece, ragged) if lowering == "tf" else []
  if culprits:
    kind = "primitive" if len(culprits) == 1 else "primitives"
    named = ", ".join(f"'{name}'{at}" for name, at in culprits)
    first = f"{where}: JAX {kind} {named} did not convert to TFLite builtins: {reason}"
  else:
    first = f"{where}: the TFLite converter (TFLITE_BUILTINS only) failed: {reason}"
  return ExportError("\n".join([first, *([listed] if listed else []), message[-3000:]]))


def model_ops(model: bytes) -> list[str]:
  """The distinct op names of a ``.tflite`` model (its subgraphs included)."""
  from ai_edge_litert.interpreter import Interpreter

  interpreter = Interpreter(model_content=model)
  return sorted({d["op_name"] for d in interpreter._get_ops_details()})


def _smoke_run(model: bytes, piece, where: str, ragged: frozenset[str] = frozenset()) -> None:
  """Run the model on zeros at the traced shapes, and with ragged inputs also at zero rows (an
  empty client: the dynamic dimension resized)."""
  from ai_edge_litert.interpreter import Interpreter

  rows = [None, 0] if ragged else [None]
  try:
    runner = Interpreter(model_content=model).get_signature_runner(piece.name)
    for m in rows:
      runner(**{s.name: np.zeros((m, *s.shape[1:]) if m is not None and s.name in ragged
                                 else s.shape, s.dtype) for s in piece.inputs})
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
  check_dtypes(split)  # before TensorFlow is imported: the converter's own error names only TF ops
  ops: dict[str, list[str]] = {}
  if "tensorflow" not in sys.modules:
    # Its import takes seconds: a step of its own, not billed to the first piece's conversion.
    emit("tflite.import", "importing TensorFlow")
    import tensorflow  # noqa: F401

  def write(comp_name: str, piece) -> dict[str, str]:
    emit("tflite.convert", f"{comp_name}: converting {piece.name} to TFLite",
         computation=comp_name, piece=piece.name)
    rel = f"pieces/{comp_name}/{piece.name}.tflite"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    # Piece input names are the form's input names: its ragged leaves are the client's examples.
    ragged = {b.name for b in split.forms[comp_name].ragged_inputs}
    model = convert_piece(piece, lowering, ragged)
    (out / rel).write_bytes(model)
    ops[rel] = model_ops(model)
    return {"tflite": rel}

  plan = fplan.build_plan(split, write)
  fplan.write_plan(plan, out)
  return {"plan": fplan.PLAN_FILE,
          "tflite": {"lowering": lowering, "ops_set": "TFLITE_BUILTINS", "ops": ops}}

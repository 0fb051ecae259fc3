"""Small helpers shared by the rule modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
from jax.extend import core as jcore

from .lower import physical, tf_dtype


def out_dtype(eqn: Any, i: int = 0) -> np.dtype:
  """numpy dtype of output ``i`` of ``eqn`` (keys: uint32)."""
  return physical(eqn.outvars[i].aval)[1]


def out_shape(eqn: Any, i: int = 0) -> tuple[int, ...]:
  return physical(eqn.outvars[i].aval)[0]


def in_dtype(eqn: Any, i: int = 0) -> np.dtype:
  return physical(eqn.invars[i].aval)[1]


def literal_value(atom: Any) -> np.ndarray | None:
  """The value of ``atom`` when it is known when lowering (a jaxpr literal), else None."""
  if isinstance(atom, jcore.Literal):
    return np.asarray(atom.val)
  return None


# TFLite has no builtin kernel for these TF ops on these small integer types: with TFLITE_BUILTINS
# only, the converter refuses the op ("neither a custom op nor a flex op"), or (``Equal`` on uint8)
# converts it to a kernel that crashes LiteRT when run. Measured (TF 2.21's converter, ai_edge_litert)
# by converting a one-op ``tf.function`` per (op, dtype) and running it against TF; the table and how
# to measure it again are in docs/tf_primitives.md. Ops not listed (``Cast``, ``BitwiseXor``,
# ``Reshape``, ``ExpandDims``, ``Squeeze``, ``While``, ``If``...) run on all four types; ``BitwiseAnd``,
# ``BitwiseOr``, ``Cumprod`` and ``BatchMatMulV2`` have no kernel for int32 either, so widening would
# not help (their rules say ``tf-only``/``partial``).
# ``tflite_int32`` computes such an op in int32: exact for these types (every value fits) and the
# narrowing ``Cast`` wraps modulo 2**bits in TFLite as in TF, so a sum or product wraps as in JAX.
NO_TFLITE_KERNEL: dict[str, frozenset[str]] = {op: frozenset(dts.split()) for op, dts in {
    "AddV2": "int8 uint8 uint16", "Sub": "int8 uint8 int16 uint16", "Mul": "int8 uint8 uint16",
    "FloorDiv": "uint8 uint16", "FloorMod": "uint8 uint16", "Neg": "int8 int16", "Abs": "int8",
    "Sign": "int8 int16", "Maximum": "int8 uint8 int16 uint16", "Minimum": "int8 uint8 int16 uint16",
    "Equal": "int8 uint8 uint16", "NotEqual": "int8 uint8 int16 uint16", "Less": "int8 uint8 uint16",
    "LessEqual": "int8 uint8 int16 uint16", "Greater": "int8 uint8 int16 uint16",
    "GreaterEqual": "int8 uint8 uint16", "SelectV2": "uint8 uint16",
    "BroadcastTo": "uint16", "Transpose": "int16 uint16", "ConcatV2": "uint16", "Pack": "uint16",
    # StridedSlice: strides other than 1 (the converter makes a unit-stride one a SLICE)
    "Split": "uint16", "SplitV": "uint16", "StridedSlice": "uint16", "Slice": "int16 uint16",
    "ReverseV2": "int8 uint16", "PadV2": "int8 int16 uint16", "Pad": "int8 uint8 int16 uint16",
    "Fill": "uint16", "Sum": "int8 uint8 int16 uint16", "Max": "int8 uint8 int16 uint16",
    "Min": "int8 uint8 int16 uint16", "Prod": "int8 uint8 int16 uint16", "ArgMax": "int16 uint16",
    "ArgMin": "int16 uint16", "Cumsum": "int8 uint8 int16 uint16",
    "TopKV2": "uint16", "GatherV2": "uint16", "GatherNd": "uint16", "ScatterNd": "int16 uint16",
}.items()}
_SMALL_INTS = (tf.int8, tf.uint8, tf.int16, tf.uint16)


def tflite_int32(ops: str | tuple[str, ...], fn: Callable[..., Any], *xs: tf.Tensor,
                 narrow: bool = True) -> Any:
  """``fn(*xs)``, computed in int32 when TFLite has no builtin kernel for one of the TF ``ops`` that
  ``fn`` emits on the small integer type of ``xs`` (``NO_TFLITE_KERNEL``); else exactly ``fn(*xs)``,
  so TF graphs keep their ops wherever TFLite has them.

  Widened, every operand of that type is cast to int32 (others, a bool predicate or int32 indices,
  pass as they are) and, with ``narrow``, every int32 result is cast back: exact for order, selection
  and data movement, and modular (as JAX) for ``+ - *``. ``narrow=False`` where an int32 result is
  not a value of that type (an index from ``ArgMax``).
  """
  ops = (ops,) if isinstance(ops, str) else ops
  dt = next((x.dtype for x in xs if x.dtype in _SMALL_INTS), None)
  if dt is None or not any(dt.name in NO_TFLITE_KERNEL.get(op, ()) for op in ops):
    return fn(*xs)
  out = fn(*(tf.cast(x, tf.int32) if x.dtype == dt else x for x in xs))
  if not narrow:
    return out
  return tf.nest.map_structure(lambda t: tf.cast(t, dt) if t.dtype == tf.int32 else t, out)


def cast(x: tf.Tensor, dtype: Any) -> tf.Tensor:
  """``x`` as ``dtype``; a bool becomes 1/0 through ``from_bool``, never a ``Cast`` (see there)."""
  dt = tf_dtype(dtype)
  if x.dtype == dt:
    return x
  if x.dtype == tf.bool:
    return from_bool(x, dt)
  return tf.cast(x, dt)


def from_bool(b: tf.Tensor, dtype: Any) -> tf.Tensor:
  """1 where ``b`` else 0, as ``SelectV2(b, 1, 0)``.

  Not ``Cast``: the TFLite converter folds a comparison of a cast bool that it can decide
  (``Cast(b) < 0``, as the sign fix-up of integer ``%`` and ``//`` does) into ``zeros_like(b)``,
  an op with no builtin for bool (``tfl.zeros_like`` takes i32/i64/f32), and the conversion fails.
  """
  dt = tf_dtype(dtype)
  if dt.name in NO_TFLITE_KERNEL["SelectV2"]:  # uint8/uint16: selected in int32, then cast
    return tf.cast(tf.where(b, tf.ones([], tf.int32), tf.zeros([], tf.int32)), dt)
  return tf.where(b, tf.ones([], dt), tf.zeros([], dt))


def full(shape: Any, value: Any, dtype: Any) -> tf.Tensor:
  """A constant filled with ``value``: a ``Fill`` (FILL builtin) for big shapes, a ``Const`` otherwise."""
  shape = tuple(int(d) for d in shape)
  if int(np.prod(shape, dtype=np.int64)) <= 64:
    return tf.constant(np.full(shape, value, dtype=np.dtype(dtype)))
  return tflite_int32("Fill", lambda v: tf.fill(shape, v),
                      tf.constant(np.asarray(value, dtype=np.dtype(dtype))))


def is_float(dtype: Any) -> bool:
  return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def is_signed(dtype: Any) -> bool:
  return np.dtype(dtype).kind == "i"


def is_unsigned(dtype: Any) -> bool:
  return np.dtype(dtype).kind == "u"


def is_bool(dtype: Any) -> bool:
  return np.dtype(dtype) == np.bool_


def upcast16(x: tf.Tensor) -> tuple[tf.Tensor, tf.DType]:
  """float16/bfloat16 -> float32 for the polynomial approximations (as XLA does); returns the old dtype."""
  if x.dtype in (tf.float16, tf.bfloat16):
    return tf.cast(x, tf.float32), x.dtype
  return x, x.dtype

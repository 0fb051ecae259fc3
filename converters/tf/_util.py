"""Small helpers shared by the rule modules."""

from __future__ import annotations

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
  return tf.where(b, tf.ones([], dt), tf.zeros([], dt))


def full(shape: Any, value: Any, dtype: Any) -> tf.Tensor:
  """A constant filled with ``value``: a ``Fill`` (FILL builtin) for big shapes, a ``Const`` otherwise."""
  shape = tuple(int(d) for d in shape)
  if int(np.prod(shape, dtype=np.int64)) <= 64:
    return tf.constant(np.full(shape, value, dtype=np.dtype(dtype)))
  return tf.fill(shape, tf.constant(np.asarray(value, dtype=np.dtype(dtype))))


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

"""``jax.random`` on threefry keys, bit for bit.

Key arrays are carried as their uint32 data. ``random_seed``, ``random_split``, ``random_fold_in`` and
``random_bits`` are expanded by tracing JAX's own implementation of the key type on that data (the
same functions JAX lowers to XLA), and the expansion is lowered like any jaxpr; what remains is
``threefry2x32`` and ``iota_2x32_shape``, written here from the Threefry-2x32 definition
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.extend.core import primitives as jprims

from faxbridge.extend import jax_internals

from . import _util as u
from .lower import physical
from .registry import register
from .rules_structural import iota

_jprng = jax_internals.prng  # the key types' implementations (private JAX: no public API)

_F = "random"


@functools.lru_cache(maxsize=256)
def _expansion(kind: str, impl_name: str, in_specs: tuple, params: tuple) -> jax.extend.core.ClosedJaxpr:
  impl = _jprng.prngs[impl_name]
  kw = dict(params)
  specs = [jax.ShapeDtypeStruct(s, d) for s, d in in_specs]
  fn: Callable[..., Any]
  if kind == "seed":
    fn = lambda seeds: _jprng.random_seed_impl_base(seeds, impl=impl)
  elif kind == "split":
    fn = lambda base: _jprng.random_split_impl_base(impl, base, kw["keys_ndim"], shape=kw["shape"])
  elif kind == "fold_in":
    fn = lambda base, msgs: _jprng.random_fold_in_impl_base(impl, base, msgs, kw["keys_shape"])
  else:
    fn = lambda base: _jprng.random_bits_impl_base(impl, base, kw["keys_ndim"],
                                                   bit_width=kw["bit_width"], shape=kw["shape"])
  return jax.make_jaxpr(fn)(*specs)


def _spec(atom) -> tuple:
  shape, dtype = physical(atom.aval)
  return (shape, np.dtype(dtype).name)


def _impl_name(aval) -> str:
  return aval.dtype._impl.name


def _expand(ctx, eqn, kind, impl_name, params, args):
  closed = _expansion(kind, impl_name, tuple(_spec(a) for a in eqn.invars), tuple(params))
  outs = ctx.lower_closed(closed, list(args))
  return outs[0]


@register(jprims.random_seed_p, family=_F)
def _random_seed(ctx, eqn, seeds):
  return _expand(ctx, eqn, "seed", _impl_name(eqn.outvars[0].aval), (), [seeds])


@register(jprims.random_split_p, family=_F)
def _random_split(ctx, eqn, keys):
  aval = eqn.invars[0].aval
  params = (("keys_ndim", len(aval.shape)), ("shape", tuple(eqn.params["shape"])))
  return _expand(ctx, eqn, "split", _impl_name(aval), params, [keys])


@register(jprims.random_fold_in_p, family=_F)
def _random_fold_in(ctx, eqn, keys, msgs):
  aval = eqn.invars[0].aval
  return _expand(ctx, eqn, "fold_in", _impl_name(aval), (("keys_shape", tuple(aval.shape)),),
                 [keys, msgs])


@register(jprims.random_bits_p, family=_F)
def _random_bits(ctx, eqn, keys):
  aval = eqn.invars[0].aval
  params = (("keys_ndim", len(aval.shape)), ("bit_width", int(eqn.params["bit_width"])),
            ("shape", tuple(eqn.params["shape"])))
  return _expand(ctx, eqn, "bits", _impl_name(aval), params, [keys])


@register(_jprng.random_wrap_p, _jprng.random_unwrap_p, family=_F, note="keys are their uint32 data: no-ops")
def _random_wrap(ctx, eqn, x):
  if eqn.primitive is _jprng.random_wrap_p and _impl_name(eqn.outvars[0].aval) != "threefry2x32":
    raise NotImplementedError(f"PRNG implementation {_impl_name(eqn.outvars[0].aval)}")
  return x


@register(_jprng.iota_2x32_shape_p, family=_F)
def _iota_2x32_shape(ctx, eqn):
  """The row-major linear index of each element as (high, low) 32-bit words."""
  shape = [int(d) for d in eqn.params["shape"]]
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**31:
    raise NotImplementedError("random arrays with 2**31 or more elements")
  lo = tf.reshape(iota(np.uint32, [size], 0), shape)
  return [tf.zeros(shape, tf.uint32), lo]


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA  # the key-schedule constant of Threefry


def _rotl(x: tf.Tensor, r: int) -> tf.Tensor:
  """32-bit rotate left as ``x * 2**r + (x >> (32 - r))``: the halves are disjoint, so + is |."""
  return x * tf.constant(1 << r, tf.uint32) + tf.bitwise.right_shift(x, tf.constant(32 - r, tf.uint32))


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 with 20 rounds: the block cipher keyed by (k0, k1) applied to counters (x0, x1)."""
  ks = [k0, k1, tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(k0, k1), tf.constant(_PARITY, tf.uint32))]
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = tf.bitwise.bitwise_xor(_rotl(x1, r), x0)
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + tf.constant(i + 1, tf.uint32)
  return x0, x1


@register(jprims.threefry2x32_p, family=_F, note="rotations as multiply + shift + add: TFLite builtins")
def _threefry2x32(ctx, eqn, k0, k1, x0, x1):
  shape = u.out_shape(eqn)
  k0, k1, x0, x1 = (tf.broadcast_to(t, shape) if t.shape.as_list() != list(shape) else t
                    for t in (k0, k1, x0, x1))
  return list(threefry2x32(k0, k1, x0, x1))

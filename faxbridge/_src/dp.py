"""Differentially private aggregation: clipped, Gaussian-noised means and their privacy accounting.

Built from the federated operations only (``fb.map``, ``fb.broadcast``, ``fb.sum``) and
``jax.random`` on the server, so every interpreter, the split and every exporter handle it with no
new primitive. The split puts the clipping in client work (inside ``fb.map``) and the noise in a
server piece: noise never leaves the server. The noise is computed from a SERVER-placed PRNG key by
threefry, which every target runs bit-exactly, so an export replays the very same noise.

The math (one round, ``n`` clients, update ``x_i`` = all leaves of client ``i`` together):

    clip(x_i, C) = x_i * min(1, C / ||x_i||_2)
    dp_mean      = (sum_i clip(x_i, C) + N(0, (z C)^2 I)) / n

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021) keeps ``C`` as server state and moves it towards the ``gamma`` quantile of the
update norms:

    b_i  = 1[||x_i|| <= C]                         (per client)
    b    = (sum_i b_i + N(0, sigma_b^2)) / n       (noised fraction under the clip)
    C'   = C * exp(-eta_C (b - gamma))             (geometric update)

and noises the update sum with ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (the paper's
Theorem 1), so that the two releases together are as private as one Gaussian mechanism with noise
multiplier ``z``: :func:`dp_epsilon` with ``z`` accounts for both.

Every mechanism's server-side noise runs under a ``jax.named_scope`` whose name records the
mechanism and its parameters (:data:`SCOPE`); ``faxbridge inspect`` reads it back from the traced
program (:func:`mechanisms`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from faxbridge._src import api

PyTree = Any

SCOPE = "faxbridge_dp"
"""Prefix of the named scope around each mechanism's server-side noise (see :func:`mechanisms`)."""

_TINY = 1e-12  # a zero update is left as is, not divided by zero


# --------------------------------------------------------------------------------------------------
# Clipping (client work) and noise (server work).
# --------------------------------------------------------------------------------------------------
def _is_static(v) -> bool:
  return not isinstance(v, jax.core.Tracer)


def _global_norm(tree: PyTree) -> jax.Array:
  """``||x||_2`` over all leaves together (one client's whole update), in float32 at least."""
  leaves = jax.tree.leaves(tree)
  dtype = jnp.result_type(jnp.float32, *leaves)
  return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(dtype))) for v in leaves))


def _clip_one(update: PyTree, clip: jax.Array | float) -> tuple[PyTree, jax.Array]:
  """One client's update scaled to norm ``<= clip``, and its norm before clipping."""
  norm = _global_norm(update)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, _TINY))
  return jax.tree.map(lambda v: (v * scale).astype(v.dtype), update), norm


def _clip_clients(x: PyTree, clip_norm) -> tuple[PyTree, jax.Array]:
  """Per client (``fb.map``): the clipped update and the indicator ``||x_i|| <= C`` as float32."""

  def client(update, clip):
    with jax.named_scope(f"{SCOPE}_clip"):
      clipped, norm = _clip_one(update, clip)
      return clipped, (norm <= clip).astype(jnp.float32)

  if _is_static(clip_norm):
    c = float(clip_norm)
    return api.map(lambda u: client(u, c), x)
  return api.map(client, x, api.broadcast(jnp.asarray(clip_norm, jnp.float32)))


def _raw_key(key) -> jax.Array:
  """``uint32[2]`` key data: typed keys (``jax.random.key``) are unwrapped, raw keys pass."""
  if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    return jax.random.key_data(key)
  key = jnp.asarray(key)
  if key.dtype != jnp.uint32 or key.shape != (2,):
    raise TypeError(f"dp: key must be a PRNG key, uint32[2] key data or jax.random.key(...); got "
                    f"{key.dtype}{list(key.shape)}")
  return key


def _gaussian(key: jax.Array, tree: PyTree, stddev) -> PyTree:
  """``N(0, stddev^2)`` noise shaped like ``tree``: one key of ``split(key, leaves)`` per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [(stddev * jax.random.normal(keys[i], jnp.shape(v), jnp.result_type(v))).astype(
      jnp.result_type(v)) for i, v in enumerate(leaves)]
  return jax.tree.unflatten(treedef, noise)


def _scope_name(mechanism: str, **params) -> str:
  """``faxbridge_dp(gaussian,clip_norm=1.0,noise_multiplier=0.5)``: static values as numbers,
  traced ones as ``server_state``."""
  def text(v):
    return f"{float(v):.6g}" if _is_static(v) else "server_state"
  return f"{SCOPE}({','.join([mechanism, *(f'{k}={text(v)}' for k, v in params.items())])})"


def _clients(x: PyTree) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError("dp: the update has no leaves")
  return int(jnp.shape(leaves[0])[0])


# --------------------------------------------------------------------------------------------------
# The mechanisms.
# --------------------------------------------------------------------------------------------------
def dp_mean(x: PyTree, *, clip_norm: float | jax.Array, noise_multiplier: float | jax.Array,
            key: jax.Array) -> PyTree:
  """CLIENTS -> SERVER: the clipped mean of the clients' updates with Gaussian noise on the sum.

  ``dp_mean(x) = (sum_i x_i * min(1, C / ||x_i||) + N(0, (z C)^2 I)) / n``, where ``||x_i||`` is
  the L2 norm of client ``i``'s whole update (all leaves together), ``C = clip_norm`` and
  ``z = noise_multiplier``. Clipping is client work (in ``fb.map``); the noise is drawn on the
  server from ``key`` (a SERVER-placed ``uint32[2]`` key, or a typed ``jax.random.key``), one
  ``jax.random.split`` key per leaf. ``noise_multiplier=0`` (a Python number) is the exact clipped
  mean. ``clip_norm`` and ``noise_multiplier`` are Python numbers (static) or SERVER scalars.

  Example:
    >>> @fb.computation(in_placements=(fb.CLIENTS, fb.SERVER))
    ... def private_mean(x, key):
    ...   return fb.dp_mean(x, clip_norm=1.0, noise_multiplier=0.0, key=key)
    >>> mean = private_mean(np.array([[3.0, 4.0], [0.3, 0.4]], np.float32),  # norms 5 and 0.5
    ...                     np.zeros(2, np.uint32))
    >>> [round(float(v), 4) for v in mean]  # ([0.6, 0.8] + [0.3, 0.4]) / 2
    [0.45, 0.6]
  """
  n = _clients(x)
  key = _raw_key(key)
  clipped, _ = _clip_clients(x, clip_norm)
  total = api.sum(clipped)
  with jax.named_scope(_scope_name("gaussian", clip_norm=clip_norm,
                                   noise_multiplier=noise_multiplier)):
    if not (_is_static(noise_multiplier) and float(noise_multiplier) == 0.0):
      noise = _gaussian(key, total, noise_multiplier * clip_norm)
      total = jax.tree.map(jnp.add, total, noise)
    return jax.tree.map(lambda v: v / jnp.asarray(n, v.dtype), total)


def dp_adaptive_init(clip_norm: float = 0.1) -> dict:
  """The server state of :func:`dp_adaptive_mean`: ``{"clip_norm": float32[]}``, the initial
  clip norm (Andrew et al. start from 0.1 and let it adapt)."""
  return {"clip_norm": np.asarray(clip_norm, np.float32)}


def adaptive_noise_multipliers(noise_multiplier: float, clipped_count_stddev: float
                               ) -> float:
  """The update sum's noise multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` that makes the
  update sum (noise ``z_delta C``) and the clipped count (noise ``sigma_b``, sensitivity 1/2 as the
  paper centres the indicators) together a Gaussian mechanism of multiplier ``z``.

  Raises ValueError unless ``2 sigma_b > z`` (the count's noise alone would spend the budget).
  """
  z, sb = float(noise_multiplier), float(clipped_count_stddev)
  if z == 0.0:
    return 0.0
  if 2.0 * sb <= z:
    raise ValueError(f"dp_adaptive_mean: clipped_count_stddev={sb} is too small for "
                     f"noise_multiplier={z}: adaptive clipping needs 2 * clipped_count_stddev > "
                     "noise_multiplier (the paper suggests clients per round / 20)")
  return (z ** -2 - (2.0 * sb) ** -2) ** -0.5


def dp_adaptive_mean(x: PyTree, state: dict, *, key: jax.Array, noise_multiplier: float,
                     target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                     clipped_count_stddev: float | None = None) -> tuple[PyTree, dict]:
  """CLIENTS -> SERVER: :func:`dp_mean` with the clip norm as server state, adapted each round.

  With ``C = state["clip_norm"]``, ``z = noise_multiplier``, ``gamma = target_quantile``,
  ``eta = clip_learning_rate`` and ``sigma_b = clipped_count_stddev`` (default ``n / 20``, the
  paper's choice, ``n`` the clients per round):

      mean = (sum_i clip(x_i, C) + N(0, (z_delta C)^2 I)) / n,  z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
      b    = (sum_i 1[||x_i|| <= C] + N(0, sigma_b^2)) / n
      C'   = C * exp(-eta (b - gamma))

  (Andrew et al. 2021, Algorithm 1 with the geometric update, Theorem 1 for ``z_delta``.) The
  pair is as private as one Gaussian mechanism of multiplier ``z`` on the clipped update: account
  for it with :func:`dp_epsilon` and ``z``. ``z = 0`` adds no noise at all (the count too, unless
  ``clipped_count_stddev`` is given). ``key`` is split in two: update noise, count noise.

  Returns ``(mean, new_state)``; ``new_state`` has the structure of :func:`dp_adaptive_init`.

  Example:
    >>> @fb.computation(in_placements=(fb.CLIENTS, fb.SERVER, fb.SERVER))
    ... def private_round(x, state, key):
    ...   return fb.dp_adaptive_mean(x, state, key=key, noise_multiplier=0.0, target_quantile=0.9)
    >>> x = np.array([[3.0, 4.0], [0.3, 0.4]], np.float32)  # norms 5 and 0.5: half under C = 1
    >>> mean, state = private_round(x, fb.dp_adaptive_init(1.0), np.zeros(2, np.uint32))
    >>> round(float(state["clip_norm"]), 4)  # 1 * exp(-0.2 * (0.5 - 0.9)): C grows
    1.0833
  """
  n = _clients(x)
  key = _raw_key(key)
  z = float(noise_multiplier)
  sigma_b = (n / 20.0 if z else 0.0) if clipped_count_stddev is None else float(clipped_count_stddev)
  z_delta = adaptive_noise_multipliers(z, sigma_b) if z else 0.0
  clip = jnp.asarray(state["clip_norm"], jnp.float32)
  clipped, under = _clip_clients(x, clip)
  total, count = api.sum(clipped), api.sum(under)
  with jax.named_scope(_scope_name("adaptive_gaussian", clip_norm=clip, noise_multiplier=z,
                                   update_noise_multiplier=z_delta, clipped_count_stddev=sigma_b,
                                   target_quantile=target_quantile,
                                   clip_learning_rate=clip_learning_rate)):
    update_key, count_key = jax.random.split(key)
    if z_delta:
      noise = _gaussian(update_key, total, z_delta * clip)
      total = jax.tree.map(jnp.add, total, noise)
    if sigma_b:
      count = count + sigma_b * jax.random.normal(count_key, (), jnp.float32)
    mean = jax.tree.map(lambda v: v / jnp.asarray(n, v.dtype), total)
    fraction = count / n
    new_clip = clip * jnp.exp(-clip_learning_rate * (fraction - target_quantile))
  return mean, {"clip_norm": new_clip.astype(jnp.float32)}


# --------------------------------------------------------------------------------------------------
# Accounting.
# --------------------------------------------------------------------------------------------------
def dp_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
               accountant: str = "rdp") -> float:
  """The epsilon of ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism at ``delta``.

  Each round samples every client with probability ``sampling_rate`` (clients per round / total
  clients) and releases the clipped sum with Gaussian noise of multiplier ``noise_multiplier``
  (its standard deviation over the clip norm). Computed by dp-accounting (Google's library):
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)`` with the Rényi
  DP accountant (``accountant="rdp"``, ``dp_accounting.rdp.RdpAccountant``, an upper bound) or the
  privacy loss distribution accountant (``"pld"``, ``dp_accounting.pld.PLDAccountant``, tighter).
  ``noise_multiplier=0`` is ``inf``.

  Example:
    >>> round(fb.dp_epsilon(noise_multiplier=1.0, sampling_rate=0.01, rounds=1000, delta=1e-5), 2)
    2.1
  """
  import dp_accounting

  if not 0.0 <= sampling_rate <= 1.0:
    raise ValueError(f"dp_epsilon: sampling_rate must be in [0, 1], got {sampling_rate}")
  if noise_multiplier == 0:
    return math.inf
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(rounds))
  if accountant == "rdp":
    acc = dp_accounting.rdp.RdpAccountant()
  elif accountant == "pld":
    acc = dp_accounting.pld.PLDAccountant()
  else:
    raise ValueError(f"dp_epsilon: accountant must be 'rdp' or 'pld', got {accountant!r}")
  return float(acc.compose(event).get_epsilon(delta))


# --------------------------------------------------------------------------------------------------
# Reading the mechanisms back from a traced program (for ``faxbridge inspect``).
# --------------------------------------------------------------------------------------------------
_SCOPE_RE = re.compile(re.escape(SCOPE) + r"\(([^()]*)\)")


def _parse(scope: str) -> dict | None:
  m = _SCOPE_RE.search(scope)
  if not m:
    return None
  mechanism, *params = m.group(1).split(",")
  return {"mechanism": mechanism, **dict(p.split("=", 1) for p in params)}


def _subjaxprs(value) -> Iterable:
  if isinstance(value, jcore.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jcore.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _eqns(jaxpr) -> Iterable:
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _eqns(sub)


def mechanisms(jaxpr) -> list[dict]:
  """The DP mechanisms whose noise a (closed) jaxpr computes, in order, each once: ``mechanism``
  and its parameters as text (``clip_norm``: a number or ``server_state``)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found: list[dict] = []
  for eqn in _eqns(jaxpr):
    d = _parse(str(eqn.source_info.name_stack))
    if d and d not in found:
      found.append(d)
  return found


def _in_scope(jaxpr, match) -> bool:
  return jaxpr is not None and any(match(str(e.source_info.name_stack))
                                   for e in _eqns(getattr(jaxpr, "jaxpr", jaxpr)))


def form_mechanisms(form) -> list[dict]:
  """The DP mechanisms of a federated form (:func:`mechanisms` over its pieces), each with
  ``noise_in`` (the server pieces that draw or add its noise) and ``clipping_in`` (the client
  pieces that clip). Empty for a form without DP or one read back from JSON (no jaxprs)."""
  pieces = [(s.server_prepare, "server") for s in form.stages]
  pieces += [(s.client_work, "clients") for s in form.stages] + [(form.server_result, "server")]
  found: list[dict] = []
  for piece, _ in pieces:
    for d in mechanisms(piece.jaxpr) if piece.jaxpr is not None else []:
      if d not in found:
        found.append(d)
  clip = [p.name for p, _ in pieces if _in_scope(p.jaxpr, lambda n: f"{SCOPE}_clip" in n)]
  out = []
  for d in found:
    noise = [p.name for p, _ in pieces if _in_scope(p.jaxpr, lambda n, d=d: _parse(n) == d)]
    out.append({**d, "noise_in": noise, "clipping_in": clip})
  return out


__all__ = ["SCOPE", "adaptive_noise_multipliers", "dp_adaptive_init", "dp_adaptive_mean",
           "dp_epsilon", "dp_mean", "form_mechanisms", "mechanisms"]

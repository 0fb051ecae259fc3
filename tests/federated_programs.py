"""Random valid federated programs, each with an independent plain-JAX/numpy reference.

A program is first drawn as a *recipe* (``generate(seed)``, deterministic per seed): a list of
statements over named values (server ops, broadcasts, per-client maps, aggregations, outputs).
Two interpreters read the same recipe:

* :func:`build` emits a ``fb.computation`` written with the public faxbridge API only;
* :func:`reference` computes the expected outputs without faxbridge and without JAX: a Python loop
  over clients for per-client work, numpy folds in the value's own dtype for aggregations, and each
  local op written again in numpy (:func:`np_op`, beside the ``jnp`` version :func:`apply_op`).

So the comparison tests the federated semantics (placements, broadcast, map, every aggregation,
stages, output structure) and, for exports, the translation of both the federated and the local
parts (jnp.maximum, lax.scan, lax.cond, softmax... as each target lowers them).

Values are kept small and bounded on purpose: every float op rescales its result into [-1, 1] by
constants computed from tracked bounds, so float32 rounding differences between kernels stay far
below the tolerance (1e-6 + 1e-5 * |ref|) even where values cancel. Discontinuous decisions
(``lax.cond`` predicates, float -> int) read only *exact* values (inputs and values derived from
them by exact ops), so no implementation can flip them by rounding differently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import faxbridge as fb

PyTree = Any
Tree = Any  # a pytree (dicts, tuples) whose leaves are value names (str)

SERVER, CLIENTS = "SERVER", "CLIENTS"
SMALL_INTS = ("int8", "int16", "uint8")
INT_DTYPES = ("int32", *SMALL_INTS)
VEC, MAT = (3,), (3, 2)
SHAPES = ((), (3,), (2,), (3, 2), (2, 3))


@dataclasses.dataclass(frozen=True)
class Val:
  """A named value: its placement, one client's shape (or the server's), dtype and value bounds."""

  name: str
  place: str
  shape: tuple[int, ...]
  dtype: str
  lo: float
  hi: float
  exact: bool  # bit-identical in every correct implementation (so it may drive a branch)
  depth: int  # how many aggregations it depends on, in sequence
  # A ragged input's examples (shape: one client's padded [L, ...]): the name of its count leaf, and
  # its batch size (0: none). Only a fold may read it: its padding is no value of the program.
  ragged: str | None = None
  batch: int = 0

  @property
  def is_float(self) -> bool:
    return self.dtype == "float32"

  @property
  def bound(self) -> float:
    return max(abs(self.lo), abs(self.hi), 1e-3)

  def __str__(self) -> str:
    short = {"float32": "f32", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8"}
    rng = f"[{self.lo:.3g},{self.hi:.3g}]"
    return f"{self.name}:{short[self.dtype]}{list(self.shape)}{rng}"


@dataclasses.dataclass(frozen=True)
class Op:
  """``out = kind(*args; params)``, a local op evaluated by :func:`apply_op`."""

  out: str
  kind: str
  args: tuple[str, ...]
  params: tuple[tuple[str, Any], ...] = ()

  def __str__(self) -> str:
    params = "".join(f", {k}={v!r}" for k, v in self.params)
    return f"{self.out} = {self.kind}({', '.join(self.args)}{params})"


@dataclasses.dataclass(frozen=True)
class Broadcast:
  value: Tree  # server names
  out: Tree  # the CLIENTS copies' names, same structure

  def __str__(self) -> str:
    return f"{_tree_str(self.out)} = fb.broadcast({_tree_str(self.value)})"


@dataclasses.dataclass(frozen=True)
class Map:
  args: tuple[Tree, ...]  # CLIENTS names
  ops: tuple[Op, ...]
  out: Tree  # names defined by ops

  def __str__(self) -> str:
    body = "".join(f"\n      {op}" for op in self.ops)
    return (f"{_tree_str(self.out)} = fb.map(fn, {', '.join(map(_tree_str, self.args))})"
            f"  # fn, per client:{body}")


@dataclasses.dataclass(frozen=True)
class Agg:
  kind: str
  value: Tree  # CLIENTS names
  out: Tree  # SERVER names, same structure
  weight: str | None = None
  bitwidth: int | None = None

  def __str__(self) -> str:
    extra = f", {self.weight}" if self.weight else ""
    extra += f", bitwidth={self.bitwidth}" if self.bitwidth else ""
    return f"{_tree_str(self.out)} = fb.{self.kind}({_tree_str(self.value)}{extra})"


Statement = Op | Broadcast | Map | Agg


@dataclasses.dataclass
class Recipe:
  seed: int
  clients: int
  pass_clients: bool  # give fb.computation clients=n (required when no CLIENTS argument)
  placements: tuple[str, ...]  # of the positional arguments
  args: tuple[Tree, ...]  # each argument's structure of input names
  body: list[Statement]
  result: Tree
  vals: dict[str, Val]
  features: set[str] = dataclasses.field(default_factory=set)

  def describe(self) -> str:
    """The program as readable pseudo-code, with every value's dtype, shape and bounds."""
    lines = [f"# seed {self.seed}: clients={self.clients}"
             f"{' (passed as clients=)' if self.pass_clients else ''}; features: "
             f"{', '.join(sorted(self.features))}",
             f"@fb.computation(in_placements=({', '.join(self.placements)}))",
             f"def program({', '.join(f'arg{i}' for i in range(len(self.args)))}):"]
    for i, tree in enumerate(self.args):
      lines.append(f"  arg{i} = {_tree_str(tree)}  # {self.placements[i]}")
    for st in self.body:
      lines.append(f"  {st}")
    lines.append(f"  return {_tree_str(self.result)}")
    lines.append("  # values: " + ", ".join(str(v) for v in self.vals.values()))
    return "\n".join(lines)


def _tree_str(tree: Tree) -> str:
  if isinstance(tree, dict):
    return "{" + ", ".join(f"{k!r}: {_tree_str(v)}" for k, v in tree.items()) + "}"
  if isinstance(tree, tuple):
    return "(" + ", ".join(_tree_str(v) for v in tree) + ("," if len(tree) == 1 else "") + ")"
  return str(tree)


def names(tree: Tree) -> list[str]:
  """Leaf names in jax.tree.leaves order (dict keys sorted, as JAX flattens)."""
  return jax.tree.leaves(tree)


# ------------------------------------------------------------------------------------------------
# Local ops: plain jnp for the faxbridge program (numpy twins for the reference below).
# ------------------------------------------------------------------------------------------------
def _scan_step(h, x):
  h = 0.5 * h + 0.5 * jnp.tanh(x)
  return h, h


def _cond_true(x):
  return jax.nn.relu(x)


def _cond_false(x):
  return -0.5 * x


def apply_op(kind: str, params: dict, *xs) -> jax.Array:
  """One local op on arrays (a client's slice inside fb.map, or a server value)."""
  p = params
  a = xs[0] if xs else None
  if kind == "relu":
    return jax.nn.relu(a)
  if kind == "maximum":
    return jnp.maximum(a, xs[1])
  if kind == "minimum":
    return jnp.minimum(a, xs[1])
  if kind == "clip":
    return jnp.clip(a, p["lo"], p["hi"])
  if kind == "leaky":
    return jnp.where(a > 0, a, 0.25 * a)
  if kind == "avg":
    return (a + xs[1]) * p["scale"]
  if kind == "mul":
    return a * xs[1] * p["scale"]
  if kind == "tanh":
    return jnp.tanh(a)
  if kind == "matvec":
    return jnp.matmul(a, xs[1]) * p["scale"]
  if kind == "softmax":
    return jax.nn.softmax(a, axis=-1)
  if kind == "logsumexp":
    return jax.nn.logsumexp(a) * p["scale"]
  if kind == "scan":
    _, ys = lax.scan(_scan_step, jnp.zeros(a.shape[1:], a.dtype), a)
    return ys
  if kind == "cond":
    pred = jnp.reshape(xs[1], (-1,))[0] > 0
    return lax.cond(pred, _cond_true, _cond_false, a)
  if kind == "mean_last":
    return jnp.mean(a, axis=-1)
  if kind == "to_float":
    return a.astype(jnp.float32) * p["scale"]
  if kind == "weight":  # a positive per-client scalar in [0.5, 1.5]
    return 1.0 + 0.5 * jnp.tanh(jnp.mean(a))
  if kind == "iadd":
    return a + xs[1]
  if kind == "imax":
    return jnp.maximum(a, xs[1])
  if kind == "imin":
    return jnp.minimum(a, xs[1])
  if kind == "iclip":
    return jnp.clip(a, p["lo"], p["hi"])
  if kind == "cast":  # clipped into the target's range first, so the cast is exact
    return jnp.clip(a, p["lo"], p["hi"]).astype(p["dtype"])
  if kind == "quantize":
    return (a > 0).astype(jnp.int32)
  if kind in ("fold", "fold_count"):
    return _fb_fold(kind, p, *xs)
  raise ValueError(f"unknown op {kind}")


def _fb_fold(kind: str, p: dict, x, count, init=None):
  """A client's loop over its own examples (``fb.fold`` over the ragged input's leaves): ``fold``
  keeps ``h <- h/2 + tanh(x_j)/2`` (with batches: the mean over the batch's real examples),
  ``fold_count`` counts the positive entries of the real examples."""
  b = p["batch"] or None
  data = fb.Ragged(x, count, b)
  shape = x.shape[1:]
  if kind == "fold_count":
    zero = jnp.zeros(shape, jnp.int32)
    if b is None:
      return fb.fold(lambda c, e: c + (e > 0).astype(jnp.int32), zero, data)
    return fb.fold(lambda c, e, m: c + jnp.sum(
        (e > 0) & m.reshape(-1, *(1,) * len(shape)), axis=0, dtype=jnp.int32), zero, data)
  h0 = jnp.zeros(shape, jnp.float32) if init is None else init
  if b is None:
    return fb.fold(lambda h, e: 0.5 * h + 0.5 * jnp.tanh(e), h0, data)

  def step(h, e, m):
    mask = m.reshape(-1, *(1,) * len(shape))
    mean = jnp.sum(jnp.where(mask, jnp.tanh(e), 0.0), axis=0) / jnp.maximum(jnp.sum(m), 1)
    return 0.5 * h + 0.5 * mean

  return fb.fold(step, h0, data)


_DTYPE_RANGE = {"int8": (-128, 127), "int16": (-32768, 32767), "uint8": (0, 255),
                "int32": (-(2**31), 2**31 - 1)}


def _bshape(a: tuple, b: tuple) -> tuple | None:
  """The result shape of an elementwise op: equal shapes, or one side a scalar."""
  if a == b or not b:
    return a
  return b if not a else None


# ------------------------------------------------------------------------------------------------
# The generator.
# ------------------------------------------------------------------------------------------------
_COLLIDING = ({"dense": {"w": 0}, "dense_w": 1}, {"a": (0, 1), "a_0": 2}, {"x": {"0": 0}, "x_0": 1},
              {"k": {"b": {"c": 0}}, "k_b_c": 1, "k_b": {"c_": 2}})
_KEYS = ("w", "b", "x", "y", "dense", "bias", "count", "z")


class _Gen:
  def __init__(self, seed: int):
    self.rng = random.Random(seed)
    self.vals: dict[str, Val] = {}
    self.body: list[Statement] = []
    self.features: set[str] = set()
    self.counter = 0

  # -- values --------------------------------------------------------------------------------
  def new(self, place: str, shape, dtype, lo, hi, exact, depth) -> Val:
    self.counter += 1
    prefix = "s" if place == SERVER else "c"
    v = Val(f"{prefix}{self.counter}", place, tuple(shape), dtype, float(lo), float(hi), exact, depth)
    self.vals[v.name] = v
    return v

  def of(self, place: str) -> list[Val]:
    """The ordinary values at ``place`` (a ragged input's padded examples are no value)."""
    return [v for v in self.vals.values() if v.place == place and v.ragged is None]

  def ragged_input(self) -> fb.Ragged:
    """A ragged CLIENTS input (``fb.Ragged`` of leaf names): examples of a small shape, padded to
    4 or 6, each client's own count, batched by 2 or 3 or not at all."""
    rng = self.rng
    batch = rng.choice([0, 0, 2, 3])
    length = 6 if batch else rng.choice([4, 6])
    shape = rng.choice([(), (3,), (2,)])
    count = self.new(CLIENTS, (), "int32", 0, length, True, 0)
    x = dataclasses.replace(self.new(CLIENTS, (length, *shape), "float32", -1, 1, True, 0),
                            ragged=count.name, batch=batch)
    self.vals[x.name] = x
    self.features.add("ragged_batched" if batch else "ragged_examples")
    return fb.Ragged(x.name, count.name, batch or None)

  def fold_op(self, x: Val, pool: list[Val]) -> tuple[Op, Val]:
    """A fold over the ragged input ``x`` (its count in ``pool`` too), from a float value of
    ``pool`` of one example's shape when there is one (else zeros), or a count of positives."""
    rng = self.rng
    shape, count = x.shape[1:], self.vals[x.ragged]
    params = (("batch", x.batch),)
    if rng.random() < 0.3:
      out = self.new(CLIENTS, shape, "int32", 0, x.shape[0], True, x.depth)
      self.features.add("op_fold_count")
      return Op(out.name, "fold_count", (x.name, count.name), params), out
    inits = [v for v in pool if v.is_float and v.ragged is None and v.shape == shape]
    init = rng.choice(inits) if inits and rng.random() < 0.7 else None
    lo, hi = (-1.0, 1.0) if init is None else (min(init.lo, -1.0), max(init.hi, 1.0))
    depth = x.depth if init is None else max(x.depth, init.depth)
    out = self.new(CLIENTS, shape, "float32", lo, hi, False, depth)
    self.features.add("op_fold" + ("_from_value" if init else ""))
    args = (x.name, count.name) + ((init.name,) if init else ())
    return Op(out.name, "fold", args, params), out

  def arrange(self, items: list[str]) -> Tree:
    """``items`` in a random pytree: a bare leaf, a tuple, a (nested) dict, or keys that collide
    once paths are flattened to names (``dense/w`` and ``dense_w``)."""
    rng = self.rng
    if len(items) == 1 and rng.random() < 0.4:
      return items[0]
    colliding = [c for c in _COLLIDING if len(jax.tree.leaves(c)) <= len(items)]
    r = rng.random()
    if colliding and r < 0.35:
      self.features.add("colliding_names")
      template = rng.choice(colliding)
      k = len(jax.tree.leaves(template))
      tree = jax.tree.map(lambda i: items[i], template)
      for j, rest in enumerate(items[k:]):
        tree[f"r{j}"] = rest
      return tree
    if r < 0.55:
      return tuple(items)
    keys = rng.sample(_KEYS, len(items) + 1)
    if len(items) >= 3 and rng.random() < 0.5:  # nest a sub-dict
      return {keys[0]: items[0], keys[1]: {k: it for k, it in zip(keys[2:], items[1:])}}
    return dict(zip(keys, items))

  def input_leaf(self, place: str) -> Val:
    rng = self.rng
    r = rng.random()
    shape = rng.choice(SHAPES)
    if r < 0.55:
      return self.new(place, shape, "float32", -1, 1, True, 0)
    if r < 0.75:
      lo, hi = rng.choice([(-5, 5), (0, 9)])
      return self.new(place, shape, "int32", lo, hi, True, 0)
    dtype = rng.choice(SMALL_INTS)
    lo, hi = {"int8": (-100, 100), "int16": (-20000, 20000), "uint8": (0, 200)}[dtype]
    self.features.add(f"input_{dtype}")
    return self.new(place, shape, dtype, lo, hi, True, 0)

  def input_tree(self, place: str) -> Tree:
    rng = self.rng
    leaves = [self.input_leaf(place) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.5:  # the shapes that make vector @ matrix possible
      if place == CLIENTS:
        leaves.append(self.new(place, VEC, "float32", -1, 1, True, 0))
      else:
        leaves.append(self.new(place, MAT, "float32", -1, 1, True, 0))
    if place == CLIENTS and rng.random() < 0.4:  # a weight column, as weighted means take them
      if rng.random() < 0.7:
        leaves.append(self.new(place, (), "float32", 0.5, 1.5, True, 0))
      else:
        leaves.append(self.new(place, (), rng.choice(INT_DTYPES), 1, 4, True, 0))
    rng.shuffle(leaves)
    return self.arrange([v.name for v in leaves])

  # -- local ops -----------------------------------------------------------------------------
  FLOAT_KINDS = ("relu", "maximum", "minimum", "clip", "leaky", "avg", "mul", "tanh", "matvec",
                 "softmax", "logsumexp", "scan", "cond", "mean_last", "to_float")
  INT_KINDS = ("iadd", "imax", "imin", "iclip", "cast", "quantize")

  def candidates(self, kind: str, pool: list[Val]) -> list[tuple[Val, ...]]:
    pool = [v for v in pool if v.ragged is None]
    fl = [v for v in pool if v.is_float]
    ints = [v for v in pool if not v.is_float]
    pairs = lambda xs, ys, ok: [(a, b) for a in xs for b in ys if ok(a, b)]
    if kind in ("relu", "clip", "leaky", "tanh"):
      return [(a,) for a in fl]
    if kind in ("maximum", "minimum", "avg", "mul"):
      return pairs(fl, fl, lambda a, b: _bshape(a.shape, b.shape) is not None)
    if kind == "matvec":
      return pairs(fl, fl, lambda a, b: len(a.shape) == 1 and len(b.shape) == 2
                   and b.shape[0] == a.shape[0])
    if kind in ("softmax", "logsumexp", "scan", "mean_last"):
      return [(a,) for a in fl if a.shape]
    if kind == "cond":
      return pairs(fl, [v for v in pool if v.exact], lambda a, b: True)
    if kind == "to_float":
      return [(a,) for a in ints]
    if kind == "iadd":
      return pairs(ints, ints, lambda a, b: a.dtype == b.dtype == "int32"
                   and _bshape(a.shape, b.shape) is not None and a.bound + b.bound < 1e6)
    if kind in ("imax", "imin"):
      return pairs(ints, ints, lambda a, b: a.dtype == b.dtype
                   and _bshape(a.shape, b.shape) is not None)
    if kind in ("iclip", "cast"):
      return [(a,) for a in ints]
    if kind == "quantize":
      return [(a,) for a in fl if a.exact]
    raise ValueError(kind)

  def op(self, place: str, pool: list[Val], kind: str | None = None) -> tuple[Op, Val] | None:
    """A random local op over ``pool`` and its result (the caller places the op)."""
    rng = self.rng
    kinds = [kind] if kind else list(self.FLOAT_KINDS + self.INT_KINDS)
    if not kind:
      rng.shuffle(kinds)
    for k in kinds:
      cands = self.candidates(k, pool)
      if cands:
        return self._make(place, k, rng.choice(cands))
    return None

  def _make(self, place: str, kind: str, args: tuple[Val, ...]) -> tuple[Op, Val]:
    rng = self.rng
    a = args[0]
    b = args[1] if len(args) > 1 else None
    depth = max(v.depth for v in args)
    exact = all(v.exact for v in args)
    params: dict[str, Any] = {}
    shape, dtype = a.shape, a.dtype
    if kind == "relu":
      lo, hi = max(a.lo, 0), max(a.hi, 0)
    elif kind in ("maximum", "imax"):
      shape, lo, hi = _bshape(a.shape, b.shape), max(a.lo, b.lo), max(a.hi, b.hi)
    elif kind in ("minimum", "imin"):
      shape, lo, hi = _bshape(a.shape, b.shape), min(a.lo, b.lo), min(a.hi, b.hi)
    elif kind == "clip":
      params = {"lo": rng.choice([-0.5, -0.25, 0.0]), "hi": rng.choice([0.25, 0.5, 0.75])}
      lo, hi = params["lo"], params["hi"]
    elif kind == "leaky":
      f = lambda x: x if x > 0 else 0.25 * x
      lo, hi = f(a.lo), f(a.hi)
    elif kind == "avg":
      params = {"scale": 1 / (a.bound + b.bound)}
      shape, lo, hi, exact = _bshape(a.shape, b.shape), -1, 1, False
    elif kind == "mul":
      params = {"scale": 1 / (a.bound * b.bound)}
      shape, lo, hi, exact = _bshape(a.shape, b.shape), -1, 1, False
    elif kind == "tanh":
      lo, hi, exact = math.tanh(a.lo), math.tanh(a.hi), False
    elif kind == "matvec":
      params = {"scale": 1 / (a.shape[0] * a.bound * b.bound)}
      shape, lo, hi, exact = (b.shape[1],), -1, 1, False
      self.features.add(f"matvec_{place}")
    elif kind == "softmax":
      lo, hi, exact = 0, 1, False
    elif kind == "logsumexp":
      top = a.hi + math.log(math.prod(a.shape))
      params = {"scale": 1 / max(abs(a.lo), abs(top), 1e-3)}
      shape, lo, hi, exact = (), -1, 1, False
    elif kind == "scan":
      lo, hi, exact = -1, 1, False
    elif kind == "cond":
      lo, hi = min(max(a.lo, 0), -0.5 * a.hi), max(max(a.hi, 0), -0.5 * a.lo)
      exact = a.exact  # the predicate reads an exact value; both branches are exact maps
    elif kind == "mean_last":
      shape, lo, hi, exact = a.shape[:-1], a.lo, a.hi, False
    elif kind == "to_float":
      params = {"scale": 1 / a.bound}
      dtype, lo, hi, exact = "float32", a.lo / a.bound, a.hi / a.bound, False
    elif kind == "iadd":
      shape, lo, hi = _bshape(a.shape, b.shape), a.lo + b.lo, a.hi + b.hi
    elif kind == "iclip":
      lo = rng.randint(int(a.lo), int(a.hi))
      hi = rng.randint(lo, int(a.hi))
      params = {"lo": lo, "hi": hi}
    elif kind == "cast":
      dtype = rng.choice([d for d in INT_DTYPES if d != a.dtype])
      tlo, thi = _DTYPE_RANGE[dtype]
      lo, hi = max(a.lo, tlo), min(a.hi, thi)
      if lo > hi:  # disjoint ranges (uint8 of negatives): clip to the target's edge
        lo = hi = tlo if a.hi < tlo else thi
      params = {"lo": int(lo), "hi": int(hi), "dtype": dtype}
      self.features.add(f"cast_{dtype}")
    elif kind == "quantize":
      dtype, lo, hi = "int32", 0, 1
    elif kind == "weight":
      shape, lo, hi, exact = (), 0.5, 1.5, False
    else:
      raise ValueError(kind)
    self.features.add(f"op_{kind}")
    out = self.new(place, shape, dtype, lo, hi, exact, depth)
    return Op(out.name, kind, tuple(v.name for v in args), tuple(sorted(params.items()))), out

  # -- aggregations --------------------------------------------------------------------------
  def agg_kinds(self, v: Val) -> list[str]:
    if v.is_float:
      return ["sum", "mean", "weighted_mean", "max", "min"]
    return ["sum", "secure_sum", "max", "min"]

  def agg_result(self, kind: str, v: Val, n: int) -> Val:
    lo, hi, exact = v.lo, v.hi, v.exact and kind in ("max", "min")
    if kind in ("sum", "secure_sum"):
      lo, hi = n * v.lo, n * v.hi
      if not v.is_float:
        dlo, dhi = _DTYPE_RANGE[v.dtype]
        if lo < dlo or hi > dhi:  # it wraps: any value of the dtype
          lo, hi = dlo, dhi
          self.features.add(f"wrapping_sum_{v.dtype}")
    if kind in ("mean", "weighted_mean"):
      exact = False
    if not v.is_float:
      exact = True
    return self.new(SERVER, v.shape, v.dtype, lo, hi, exact, v.depth + 1)


def _stage(g: _Gen, k: int, n: int, previous_map_outputs: list[Val],
           aggregated: set[str]) -> list[Val]:
  """One round trip: server ops, a broadcast, a per-client map, aggregations. Returns the map's
  outputs (a later stage may read them again)."""
  rng = g.rng
  for _ in range(rng.randint(0, 2)):
    made = g.op(SERVER, g.of(SERVER))
    if made:
      g.body.append(made[0])
      g.features.add("server_pre")

  # Broadcast: in a later stage it depends on the previous stage's aggregates.
  server_vals = g.of(SERVER)
  bcast: list[Val] = []
  bcast_tree: Tree = None
  if server_vals:
    if k > 0:
      first = rng.choice([v for v in server_vals if v.depth >= k])
      if rng.random() < 0.5:  # through a server op first
        made = g.op(SERVER, [first, *rng.sample(server_vals, min(2, len(server_vals)))])
        if made and made[1].depth >= k:
          g.body.append(made[0])
          first = made[1]
          server_vals = g.of(SERVER)
        elif made:
          del g.vals[made[1].name]  # not used: the value must not be read by a later op
      bcast.append(first)
    others = [v for v in server_vals if v not in bcast]
    mats = [v for v in others if v.is_float and len(v.shape) == 2]
    if mats and rng.random() < 0.6:  # for vector @ matrix in the clients' work
      bcast.append(rng.choice(mats))
      others.remove(bcast[-1])
    bcast += rng.sample(others, min(len(others), rng.randint(0 if bcast else 1, 2)))
    btree = g.arrange([v.name for v in bcast])
    copies = {v.name: g.new(CLIENTS, v.shape, v.dtype, v.lo, v.hi, v.exact, v.depth).name
              for v in bcast}
    bcast_tree = jax.tree.map(lambda s: copies[s], btree)
    g.body.append(Broadcast(btree, bcast_tree))
    g.features.add(f"broadcast_stage{k}")

  # The per-client map reads the broadcasts and client values (inputs, earlier broadcasts and
  # map outputs), or the broadcasts only.
  copies_now = set(names(bcast_tree)) if bcast else set()
  client_pool = [v for v in g.of(CLIENTS) if v.name not in copies_now]
  map_args: list[Tree] = []
  local: list[Val] = []
  if bcast:
    map_args.append(bcast_tree)
    local += [g.vals[s] for s in names(bcast_tree)]
  # A ragged input is folded by the first stage's map.
  rag = [v for v in g.vals.values() if v.ragged] if k == 0 else []
  if bcast and not rag and (not client_pool or rng.random() < 0.2):
    g.features.add("map_reads_only_broadcasts")
  else:
    chosen = rng.sample(client_pool, min(len(client_pool), rng.randint(1, 3)))
    vecs = [v for v in client_pool if v.is_float and len(v.shape) == 1 and v not in chosen]
    if vecs and rng.random() < 0.6:
      chosen.append(rng.choice(vecs))
    reuse = [v for v in previous_map_outputs if v.name in aggregated and v not in chosen]
    if reuse and rng.random() < 0.7:  # the federated-variance shape
      chosen.append(rng.choice(reuse))
      g.features.add("map_output_aggregated_and_reused")
    for x in rag:
      chosen += [v for v in (x, g.vals[x.ragged]) if v not in chosen]
    map_args.append(g.arrange([v.name for v in chosen]))
    local += chosen
  ops: list[Op] = []
  outs: list[Val] = []
  for x in rag:
    made = g.fold_op(x, local)
    ops.append(made[0])
    outs.append(made[1])
  if g.candidates("matvec", local) and rng.random() < 0.7:
    made = g.op(CLIENTS, local, "matvec")
    ops.append(made[0])
    outs.append(made[1])
  for _ in range(rng.randint(1, 4)):
    made = g.op(CLIENTS, local + outs)
    if made:
      ops.append(made[0])
      outs.append(made[1])
  if not outs:  # nothing fit (e.g. a lone int8 input): a cast always does
    made = g.op(CLIENTS, local, "cast") or g.op(CLIENTS, local, "tanh")
    ops.append(made[0])
    outs.append(made[1])

  def add(op: Op, v: Val) -> Val:
    g.vals[v.name] = v
    ops.append(op)
    outs.append(v)
    return v

  # Aggregations: the first of this map's outputs, later ones of any client value.
  aggs = []
  for i in range(rng.randint(1, 3)):
    pool = outs if i == 0 else outs + g.of(CLIENTS)
    v = rng.choice(pool)
    kinds = g.agg_kinds(v)
    kind = rng.choice(kinds)
    if kind == "secure_sum" and v not in outs and v not in local:
      kind = rng.choice([x for x in kinds if x != "secure_sum"])
    if kind == "secure_sum":
      # Nonnegative and small enough that the total fits the bitwidth and the dtype.
      _, dhi = _DTYPE_RANGE[v.dtype]
      bitwidth = rng.randint(3, 16 if v.dtype in ("int32", "int16") else 8)
      top = min((2**bitwidth - 1) // n, dhi // n, max(int(v.hi), 1))
      if v.lo < 0 or v.hi > top:
        op, clipped = g._make(CLIENTS, "iclip", (v,))
        v = add(dataclasses.replace(op, params=(("hi", top), ("lo", 0))),
                dataclasses.replace(clipped, lo=0, hi=top))
      aggs.append((kind, [v], None, bitwidth))
      continue
    weight = None
    if kind == "weighted_mean":
      ws = [w for w in g.of(CLIENTS) if w.shape == () and w.lo > 0]
      ints = [x for x in local + outs if not x.is_float and not x.shape]
      floats = [x for x in local + outs if x.is_float and x.ragged is None]
      if not (ws or ints or floats):  # nothing in this map to derive a weight from
        kind = rng.choice([x for x in kinds if x != "weighted_mean"])
    if kind == "weighted_mean":
      if ws and (not (ints or floats) or rng.random() < 0.5):
        weight = rng.choice(ws)
      elif ints and (not floats or rng.random() < 0.6):
        op, w = g._make(CLIENTS, "iclip", (rng.choice(ints),))
        weight = add(dataclasses.replace(op, params=(("hi", 3), ("lo", 1))),
                     dataclasses.replace(w, lo=1, hi=3))
        g.features.add("int_weight")
      else:
        weight = add(*g._make(CLIENTS, "weight", (rng.choice(floats),)))
      if weight.dtype != v.dtype:
        g.features.add("int_weight")
    group = [v] + [x for x in rng.sample(pool, min(2, len(pool)))
                   if x is not v and x.dtype == v.dtype and rng.random() < 0.5]
    aggs.append((kind, group, weight, None))

  g.body.append(Map(tuple(map_args), tuple(ops), g.arrange([v.name for v in outs])))
  g.features.add(f"map_stage{k}")
  for kind, group, weight, bitwidth in aggs:
    tree = g.arrange(list(dict.fromkeys(v.name for v in group)))
    results = {s: g.agg_result(kind, g.vals[s], n).name for s in names(tree)}
    g.body.append(Agg(kind, tree, jax.tree.map(results.__getitem__, tree),
                      weight.name if weight is not None else None, bitwidth))
    g.features.add(f"agg_{kind}")
    g.features.update(f"agg_{kind}_{g.vals[s].dtype}" for s in names(tree))
    g.features.update(f"agg_{kind}_small_int" for s in names(tree) if g.vals[s].dtype in SMALL_INTS)
    aggregated.update(names(tree))
  return outs


def generate(seed: int, ragged: bool = False) -> Recipe:
  """A random valid federated program, the same for the same seed; ``ragged``: one whose CLIENTS
  input also holds an ``fb.ragged`` input, folded by the first map (another family of seeds)."""
  g = _Gen(seed)
  rng = g.rng
  n = rng.choice([1, 2, 3, 3, 4, 4])
  shape_of = rng.random()
  has_server = shape_of > 0.15
  has_clients = ragged or not (has_server and shape_of > 0.85)
  pass_clients = (not has_clients) or rng.random() < 0.2
  if not has_clients:
    g.features.add("no_clients_input")
  args, placements = [], []
  if has_server:
    args.append(g.input_tree(SERVER))
    placements.append(SERVER)
  if has_clients:
    tree = g.input_tree(CLIENTS)
    if ragged:
      tree = (tree, g.ragged_input())
    if rng.random() < 0.3 and args:
      args.insert(0, tree)
      placements.insert(0, CLIENTS)
    else:
      args.append(tree)
      placements.append(CLIENTS)

  stages = 1 if rng.random() < 0.45 else 2
  previous_map_outputs: list[Val] = []
  aggregated: set[str] = set()
  for k in range(stages):
    previous_map_outputs = _stage(g, k, n, previous_map_outputs, aggregated)
  if stages == 2:
    g.features.add("two_stages")

  # Server post-processing, then outputs.
  post: list[Val] = []
  for _ in range(rng.randint(0, 3)):
    made = g.op(SERVER, g.of(SERVER))
    if made:
      g.body.append(made[0])
      post.append(made[1])
      g.features.add("server_post")
  all_aggs = [g.vals[s] for st in g.body if isinstance(st, Agg) for s in names(st.out)]
  outputs = [*post[-2:], *rng.sample(all_aggs, min(len(all_aggs), rng.randint(1, 3)))]
  if rng.random() < 0.3:
    client_vals = [v for v in g.of(CLIENTS) if v.name in {
        s for st in g.body if isinstance(st, Map) for s in names(st.out)}]
    outputs.append(rng.choice(client_vals))
    g.features.add("clients_output")
  outputs = list(dict.fromkeys(v.name for v in outputs))
  rng.shuffle(outputs)
  result = g.arrange(outputs)
  return Recipe(seed, n, pass_clients, tuple(placements), tuple(args), g.body, result, g.vals,
                g.features)


# ------------------------------------------------------------------------------------------------
# Interpreter 1: the faxbridge program.
# ------------------------------------------------------------------------------------------------
def _bind(env: dict, tree: Tree, values: PyTree) -> None:
  for name, value in zip(names(tree), jax.tree.leaves(values)):
    env[name] = value


def _read(env: dict, tree: Tree) -> PyTree:
  return jax.tree.map(lambda s: env[s], tree)


def _local(ops, env: dict) -> None:
  for op in ops:
    env[op.out] = apply_op(op.kind, dict(op.params), *(env[a] for a in op.args))


_AGGREGATE = {
    "sum": lambda x, st: fb.sum(x),
    "mean": lambda x, st: fb.mean(x),
    "max": lambda x, st: fb.max(x),
    "min": lambda x, st: fb.min(x),
    "secure_sum": lambda x, st: fb.secure_sum(x, st.bitwidth),
}


def _walk(recipe: Recipe, broadcast: Callable, map_clients: Callable, aggregate: Callable) -> Callable:
  """The recipe's statements run in order over an environment of leaves; how a broadcast, a map
  over clients and an aggregation compute is given (faxbridge's operations, or plain JAX's)."""

  def program(*args):
    env: dict = {}
    for tree, arg in zip(recipe.args, args):
      _bind(env, tree, arg)
    for st in recipe.body:
      if isinstance(st, Op):
        _local([st], env)
      elif isinstance(st, Broadcast):
        _bind(env, st.out, broadcast(_read(env, st.value)))
      elif isinstance(st, Map):
        def per_client(*trees, st=st):
          lenv: dict = {}
          for tree, value in zip(st.args, trees):
            _bind(lenv, tree, value)
          _local(st.ops, lenv)
          return _read(lenv, st.out)

        _bind(env, st.out, map_clients(per_client, *(_read(env, t) for t in st.args)))
      elif isinstance(st, Agg):
        weight = env[st.weight] if st.weight else None
        _bind(env, st.out, aggregate(st, _read(env, st.value), weight))
    return _read(env, recipe.result)

  return program


def _fb_aggregate(st: Agg, x: PyTree, weight: Any) -> PyTree:
  return fb.weighted_mean(x, weight) if st.kind == "weighted_mean" else _AGGREGATE[st.kind](x, st)


def build(recipe: Recipe) -> fb.Computation:
  """The recipe as a faxbridge computation (public API only)."""
  program = _walk(recipe, fb.broadcast, fb.map, _fb_aggregate)
  program.__name__ = program.__qualname__ = f"program{recipe.seed}"
  places = tuple(fb.SERVER if p == SERVER else fb.CLIENTS for p in recipe.placements)
  return fb.computation(program, clients=recipe.clients if recipe.pass_clients else None,
                        in_placements=places)


# ------------------------------------------------------------------------------------------------
# Interpreter 2: the reference, without faxbridge. CLIENTS values are numpy arrays stacked on a
# leading clients axis; per-client work is a Python loop; aggregations are numpy folds over the
# clients in the value's own dtype (an int8 sum stays int8 and wraps, as fb.sum's contract says).
# ------------------------------------------------------------------------------------------------
def _fold(op: Callable, x: np.ndarray) -> np.ndarray:
  acc = np.array(x[0], copy=True)
  with np.errstate(over="ignore"):
    for i in range(1, x.shape[0]):
      acc = np.asarray(op(acc, x[i]), dtype=x.dtype)
  return acc


def _ref_aggregate(kind: str, x: np.ndarray, w: np.ndarray | None, n: int) -> np.ndarray:
  if kind in ("sum", "secure_sum"):
    return _fold(np.add, x)
  if kind == "mean":
    return np.asarray(_fold(np.add, x) / np.asarray(n, x.dtype), x.dtype)
  if kind == "weighted_mean":
    w = w.astype(x.dtype).reshape(w.shape + (1,) * (x.ndim - 1))
    return np.asarray(_fold(np.add, w * x) / _fold(np.add, w), x.dtype)
  if kind == "max":
    return _fold(np.maximum, x)
  if kind == "min":
    return _fold(np.minimum, x)
  raise ValueError(kind)


def _np_softmax(a: np.ndarray) -> np.ndarray:
  e = np.exp(a - np.max(a, axis=-1, keepdims=True))
  return e / np.sum(e, axis=-1, keepdims=True)


def _np_fold(kind: str, p: dict, x: np.ndarray, count: np.ndarray, init=None) -> np.ndarray:
  """:func:`_fb_fold` again: a Python loop over the client's real examples only (the first
  ``count``; the padding after them is never read), in float32 / int32."""
  f32, m, b = np.float32, int(count), p["batch"]
  real = x[:m]
  chunks = [real[i:i + 1][0] for i in range(m)] if not b else \
      [real[i:i + b] for i in range(0, m, b)]
  if kind == "fold_count":
    c = np.zeros(x.shape[1:], np.int32)
    for e in chunks:
      c = c + ((e > 0).astype(np.int32) if not b else np.sum(e > 0, axis=0, dtype=np.int32))
    return c
  h = np.zeros(x.shape[1:], f32) if init is None else np.asarray(init, f32)
  for e in chunks:
    step = np.tanh(e) if not b else np.sum(np.tanh(e), axis=0, dtype=f32) / f32(len(e))
    h = f32(0.5) * h + f32(0.5) * step
  return np.asarray(h, f32)


def np_op(kind: str, params: dict, *xs: np.ndarray) -> np.ndarray:
  """:func:`apply_op` again, in numpy float32/int arithmetic (no JAX): the reference's local ops."""
  p = params
  xs = tuple(np.asarray(x) for x in xs)
  a = xs[0]
  f32 = np.float32
  if kind == "relu":
    out = np.maximum(a, f32(0))
  elif kind in ("maximum", "imax"):
    out = np.maximum(a, xs[1])
  elif kind in ("minimum", "imin"):
    out = np.minimum(a, xs[1])
  elif kind == "clip":
    out = np.clip(a, f32(p["lo"]), f32(p["hi"]))
  elif kind == "leaky":
    out = np.where(a > 0, a, f32(0.25) * a)
  elif kind == "avg":
    out = (a + xs[1]) * f32(p["scale"])
  elif kind == "mul":
    out = a * xs[1] * f32(p["scale"])
  elif kind == "tanh":
    out = np.tanh(a)
  elif kind == "matvec":
    out = (a @ xs[1]) * f32(p["scale"])
  elif kind == "softmax":
    out = _np_softmax(a)
  elif kind == "logsumexp":
    top = np.max(a)
    out = (top + np.log(np.sum(np.exp(a - top)))) * f32(p["scale"])
  elif kind == "scan":
    h, ys = np.zeros(a.shape[1:], f32), []
    for x in a:
      h = f32(0.5) * h + f32(0.5) * np.tanh(x)
      ys.append(h)
    out = np.stack(ys)
  elif kind == "cond":
    out = np.maximum(a, f32(0)) if xs[1].reshape(-1)[0] > 0 else f32(-0.5) * a
  elif kind == "mean_last":
    out = np.mean(a, axis=-1)
  elif kind == "to_float":
    out = a.astype(f32) * f32(p["scale"])
  elif kind == "weight":
    out = f32(1) + f32(0.5) * np.tanh(np.mean(a))
  elif kind == "iadd":
    out = a + xs[1]
  elif kind == "iclip":
    out = np.clip(a, p["lo"], p["hi"]).astype(a.dtype)
  elif kind == "cast":
    out = np.clip(a, p["lo"], p["hi"]).astype(p["dtype"])
  elif kind == "quantize":
    out = (a > 0).astype(np.int32)
  elif kind in ("fold", "fold_count"):
    out = _np_fold(kind, p, *xs)
  else:
    raise ValueError(f"unknown op {kind}")
  out = np.asarray(out)
  # Every op keeps float32 or its int dtype, as the jnp version does.
  want = np.dtype(p["dtype"]) if kind == "cast" else np.dtype("int32") if kind in (
      "quantize", "fold_count") \
      else np.dtype("float32") if kind == "to_float" else a.dtype
  assert out.dtype == want, (kind, out.dtype, want)
  return out


def reference(recipe: Recipe, *args: PyTree) -> PyTree:
  """The expected outputs, computed without faxbridge."""
  n = recipe.clients
  env: dict[str, np.ndarray] = {}
  for tree, arg in zip(recipe.args, args):
    _bind(env, tree, jax.tree.map(np.asarray, arg))
  for st in recipe.body:
    if isinstance(st, Op):
      env[st.out] = np_op(st.kind, dict(st.params), *(env[a] for a in st.args))
    elif isinstance(st, Broadcast):
      for src, dst in zip(names(st.value), names(st.out)):
        env[dst] = np.stack([env[src]] * n)
    elif isinstance(st, Map):
      per_client = []
      for i in range(n):
        lenv = {s: env[s][i] for t in st.args for s in names(t)}
        for op in st.ops:
          lenv[op.out] = np_op(op.kind, dict(op.params), *(lenv[a] for a in op.args))
        per_client.append({s: lenv[s] for s in names(st.out)})
      for s in names(st.out):
        env[s] = np.stack([c[s] for c in per_client])
    elif isinstance(st, Agg):
      w = env[st.weight] if st.weight else None
      for src, dst in zip(names(st.value), names(st.out)):
        env[dst] = _ref_aggregate(st.kind, env[src], w, n)
  return _read(env, recipe.result)


# ------------------------------------------------------------------------------------------------
# Interpreter 3: the same program in plain JAX, without faxbridge, so that JAX's own derivatives of it
# are an independent answer for faxbridge's rules. CLIENTS values are arrays stacked on a leading
# clients axis; a broadcast is ``jnp.broadcast_to``, per-client work ``jax.vmap``, an aggregation a
# ``jax.numpy`` reduction over the clients in the value's dtype.
# ------------------------------------------------------------------------------------------------
def _jnp_weighted_mean(x, w):
  w = jnp.reshape(w, w.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
  return jnp.sum(w * x, axis=0) / jnp.sum(w, axis=0)


_JNP_AGGREGATE = {
    "sum": lambda x, w: jnp.sum(x, axis=0, dtype=x.dtype),
    "secure_sum": lambda x, w: jnp.sum(x, axis=0, dtype=x.dtype),
    "mean": lambda x, w: jnp.mean(x, axis=0, dtype=x.dtype),
    "weighted_mean": _jnp_weighted_mean,
    "max": lambda x, w: jnp.max(x, axis=0),
    "min": lambda x, w: jnp.min(x, axis=0),
}


def plain_jax(recipe: Recipe) -> Callable:
  """The recipe as a plain JAX function of the computation's arguments."""
  n = recipe.clients

  def broadcast(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *jnp.shape(v))), tree)

  def aggregate(st: Agg, x: PyTree, weight: Any) -> PyTree:
    return jax.tree.map(lambda v: _JNP_AGGREGATE[st.kind](v, weight), x)

  return _walk(recipe, broadcast, lambda f, *trees: jax.vmap(f)(*trees), aggregate)


# ------------------------------------------------------------------------------------------------
# Inputs, and the whole program.
# ------------------------------------------------------------------------------------------------
def example_inputs(recipe: Recipe) -> tuple:
  rng = np.random.default_rng(recipe.seed)

  def draw(name: str, place: str) -> np.ndarray:
    v = recipe.vals[name]
    shape = ((recipe.clients,) if place == CLIENTS else ()) + v.shape
    if v.is_float:
      return rng.uniform(v.lo, v.hi, size=shape).astype(np.float32)
    return rng.integers(int(v.lo), int(v.hi), size=shape, endpoint=True).astype(v.dtype)

  args = tuple(jax.tree.map(functools.partial(draw, place=p), t)
               for t, p in zip(recipe.args, recipe.placements))
  # A ragged input: each client's real examples are the first `count`; the padding after them is
  # poisoned (NaN, huge), so a result that read it could not equal the reference.
  for node in jax.tree.leaves(args, is_leaf=lambda a: isinstance(a, fb.Ragged)):
    if isinstance(node, fb.Ragged):
      for i, m in enumerate(node.count):
        node.examples[i, m:] = rng.choice([np.nan, 1e30, -1e30])
  return args


@dataclasses.dataclass
class Program:
  recipe: Recipe
  computation: fb.Computation
  args: tuple
  expected: PyTree

  @property
  def seed(self) -> int:
    return self.recipe.seed


def program(seed: int) -> Program:
  recipe = generate(seed)
  args = example_inputs(recipe)
  return Program(recipe, build(recipe), args, reference(recipe, *args))


# ------------------------------------------------------------------------------------------------
# Comparison.
# ------------------------------------------------------------------------------------------------
RTOL, ATOL = 1e-5, 1e-6


def mismatches(expected: PyTree, got: PyTree) -> list[str]:
  """Why ``got`` differs from ``expected`` (structure, dtype, shape, values), or []."""
  want_leaves, _ = jax.tree_util.tree_flatten_with_path(expected)
  got_leaves, got_tree = jax.tree.flatten(got)
  if jax.tree.structure(expected) != got_tree:
    return [f"pytree structure: expected {jax.tree.structure(expected)}, got {got_tree}"]
  return [m for (path, w), g in zip(want_leaves, got_leaves)
          if (m := leaf_mismatch(jax.tree_util.keystr(path), w, g))]


def leaf_mismatch(where: str, want, got) -> str | None:
  want, got = np.asarray(want), np.asarray(got)
  if want.dtype != got.dtype or want.shape != got.shape:
    return f"{where}: expected {want.dtype}{list(want.shape)}, got {got.dtype}{list(got.shape)}"
  if want.dtype.kind in "biu":
    if not np.array_equal(want, got):
      return f"{where}: integers differ: expected {want.tolist()}, got {got.tolist()}"
    return None
  w64, g64 = want.astype(np.float64), got.astype(np.float64)
  bad = ~(np.abs(w64 - g64) <= ATOL + RTOL * np.abs(w64))
  if bad.any():
    return (f"{where}: {int(bad.sum())} of {bad.size} floats beyond tolerance, max abs error "
            f"{float(np.max(np.abs(w64 - g64))):.3g}: expected {want.tolist()}, got {got.tolist()}")
  return None

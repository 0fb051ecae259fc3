"""The derivative and batching rules of call-like primitives (faxbridge/_src/call_rules.py), shared
by ``fb.map`` (the ``vmap`` strategy runs the computation's maps as ``faxbridge_map``) and the
native primitive (a streamed computation is one ``faxbridge_native``).

Independent answer: JAX's own derivatives of the same generated program written in plain JAX
(``federated_programs.plain_jax``: ``jax.vmap`` for maps, ``jax.numpy`` reductions). Each program is
differentiated with respect to its float inputs but the first, so that one (and every integer input)
reaches the rules as a symbolic zero tangent; the loss reads every other float output, so the others and
the integer outputs come back as symbolic zero cotangents; the transposed calls are linear in the
tangents only (their primals are residuals). A vmap of the JVP over two tangent directions batches
the tangent calls with batched and unbatched operands. Floats within 1e-4 relative, 1e-5 absolute;
primal outputs (integers too) must equal the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from federated_programs import generate, plain_jax, program

import faxbridge as fb
from faxbridge._src import execution

STRATEGIES = ["vmap", ("stream", 2)]


def _differentiable(seed: int) -> bool:
  """The program has a float input and a float output (something to differentiate)."""
  recipe = generate(seed)
  inputs = [recipe.vals[s] for tree in recipe.args for s in jax.tree.leaves(tree)]
  outputs = [recipe.vals[s] for s in jax.tree.leaves(recipe.result)]
  return any(v.is_float for v in inputs) and any(v.is_float for v in outputs)


# Small programs that between them pass integer inputs to a map (zero tangents into fb.map), hold a
# SERVER input (a zero tangent into the streamed call), have integer and unused map outputs (zero
# cotangents) and 3 clients (blocks of 2 leave a remainder); the other seeds run in the slow suite.
QUICK = [15, 23]
SEEDS = [pytest.param(s, marks=() if s in QUICK else pytest.mark.slow)
         for s in range(50) if _differentiable(s)]


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def derivatives(fn, args, seed: int):
  """Outputs, JVP tangents, gradients and a vmapped JVP of ``fn`` at ``args`` (see the module doc)."""
  leaves, tree = jax.tree.flatten(jax.tree.map(jnp.asarray, args))
  floats = [i for i, x in enumerate(leaves) if _is_float(x)]
  free = floats[1:] or floats
  rng = np.random.default_rng(seed)

  def on_free(*xs):
    full = list(leaves)
    for i, x in zip(free, xs):
      full[i] = x
    return jax.tree.leaves(fn(*jax.tree.unflatten(tree, full)))

  primals = [leaves[i] for i in free]
  outs = on_free(*primals)
  read = [i for i, o in enumerate(outs) if _is_float(o)][::2]
  weights = [rng.normal(size=np.shape(outs[i])).astype(np.float32) for i in read]

  def loss(*xs):
    ys = on_free(*xs)
    return sum(jnp.vdot(w, ys[i]) for w, i in zip(weights, read))

  def jvp(*ts):
    return jax.jvp(on_free, tuple(primals), ts)

  tangents = [rng.normal(size=np.shape(p)).astype(np.float32) for p in primals]
  directions = [rng.normal(size=(2, *np.shape(p))).astype(np.float32) for p in primals]

  @jax.jit
  def run():
    out, t_out = jvp(*tangents)
    batched = jax.vmap(lambda *ts: jvp(*ts)[1])(*directions)
    floats = [i for i, o in enumerate(out) if _is_float(o)]
    return (out, [t_out[i] for i in floats], jax.grad(loss, argnums=tuple(range(len(primals))))(
        *primals), [batched[i] for i in floats])

  return run()


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_derivatives_through_the_rules_equal_plain_jax(seed):
  p = program(seed)
  want = derivatives(plain_jax(p.recipe), p.args, seed)
  for strategy in STRATEGIES:
    with fb.execution_strategy(strategy):
      assert p.computation.strategy_for(*p.args) in ("vmap", execution.validate(strategy))
      got = derivatives(p.computation, p.args, seed)
    for name, g, w in zip(("outputs", "jvp", "grad", "vmapped jvp"), got, want):
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
        where = f"{name}, seed {seed}, strategy {strategy}"
        assert np.asarray(a).dtype == np.asarray(b).dtype, where
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=where)

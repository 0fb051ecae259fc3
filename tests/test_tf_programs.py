"""Whole programs through the tf converter, run by TF 2.21 and compared with JAX (quick suite)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf
from tf_programs import CASES, SAMPLES, TF_ONLY_SAMPLES, Case, assert_close, flat_inputs, flat_outputs

import faxbridge.converters.tf as fbtf

ALL = CASES + SAMPLES + TF_ONLY_SAMPLES


def run_tf(case: Case) -> dict[str, np.ndarray]:
  cf = fbtf.to_tf(case.fn, *case.args)
  got = cf(*[tf.constant(a) for a in flat_inputs(case)])
  return {n: np.asarray(got[n]) for n in cf.faxbridge_output_names}


# Whole programs take seconds each to trace and run: they are in the slow suite (which also runs
# them on TF 2.14 and TFLite); the per-primitive samples stay quick, the small-integer family for
# int8 only (each dtype takes a second or two; the others run in the slow suite).
QUICK_SMALL_INT = "small_int_int8"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) for c in CASES]
                         + [c if not c.name.startswith("small_int_") or c.name == QUICK_SMALL_INT
                            else pytest.param(c, marks=pytest.mark.slow) for c in SAMPLES]
                         + TF_ONLY_SAMPLES, ids=lambda c: c.name)
def test_program_in_tf221_equals_jax(case):
  got = run_tf(case)
  want = flat_outputs(case)
  assert len(got) == len(want)
  for (name, g), w in zip(got.items(), want):
    assert_close(g, w, case.rtol, what=f"{case.name}/{name}", atol=case.atol)


def test_assert_close_holds_every_element_to_its_own_size():
  """The comparison all these tests rest on: a small element is not excused by a large one."""
  want = np.array([1e5, np.exp(-12), -3.0], np.float32)
  assert_close(want + np.array([0.9, 5e-7, 3e-5], np.float32), want)  # within 1e-6 + 1e-5 |want|
  for i, wrong in ((1, 0.5), (1, np.exp(-12) + 2e-6), (0, 1e5 + 2.0), (2, -3.0 - 4e-5)):
    got = want.copy()
    got[i] = wrong
    with pytest.raises(AssertionError, match=f"element {i} "):
      assert_close(got, want)
  with pytest.raises(AssertionError, match="NaN positions"):
    assert_close(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
  with pytest.raises(AssertionError):
    assert_close(np.array([1, 2], np.int32), np.array([1, 3], np.int32))


def _primitives(jaxpr, acc):
  """The Primitive objects of ``jaxpr``'s equations, sub-jaxprs included (the table's keys)."""
  for eqn in jaxpr.eqns:
    acc.add(eqn.primitive)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _primitives(sub, acc)
  return acc


def test_every_rule_is_exercised_by_a_program():
  """Every primitive in the table appears in some program above, so its rule is run and compared
  with JAX (here on TF 2.21; in the slow suite on TF 2.14 and TFLite). No exemptions."""
  seen = set()
  for case in ALL:
    _primitives(jax.make_jaxpr(case.fn)(*case.args).jaxpr, seen)
  missing = set(fbtf.all_rules()) - seen
  assert not missing, f"rules with no program exercising them: {sorted(p.name for p in missing)}"


def _run_graph(fn, *args):
  """``fn``'s jaxpr lowered by ``lower_jaxpr`` and run by TF 2.21: (outputs, op type counts)."""
  closed = jax.make_jaxpr(fn)(*args)
  ins, outs = [f"in{i}" for i in range(len(args))], [f"out{i}" for i in range(len(closed.out_avals))]
  graph = fbtf.lower_jaxpr(closed, ins, outs)
  with tf.compat.v1.Session(graph=graph) as sess:
    got = sess.run([f"{o}:0" for o in outs], {f"{i}:0": a for i, a in zip(ins, args)})
  ops = [n.op for n in graph.as_graph_def().node]
  return got, {op: ops.count(op) for op in set(ops)}, closed.jaxpr


def test_transposed_product_is_one_matmul():
  """``(a @ b)^T`` with no other use of the product is one MatMul of the swapped operands (JAX's
  gradient of ``x @ w`` is such a pair): no Transpose op, values equal to JAX. A product that is
  also used elsewhere (or returned) keeps its Transpose and is computed once."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)

  def loss(w, x):
    return jax.numpy.sum(jax.numpy.tanh(x @ w) ** 2)

  def pair_uses(x, w):  # the transposed product, plus the product itself used twice more
    p = jax.lax.dot(x, w)
    return p.T, p.sum(), p

  for fn, args, n_transpose, n_matmul in ((jax.grad(loss), (w, x), 0, 2),
                                          (jax.value_and_grad(loss, argnums=(0, 1)), (w, x), 0, 3),
                                          (pair_uses, (x, w), 1, 1)):
    got, ops, jaxpr = _run_graph(fn, *args)
    assert any(e.primitive is jax.lax.transpose_p for e in jaxpr.eqns)  # the pattern is there
    assert ops.get("Transpose", 0) == n_transpose and ops.get("MatMul", 0) == n_matmul, ops
    for g, want in zip(got, jax.tree_util.tree_leaves(fn(*args)), strict=True):
      assert_close(g, np.asarray(want))

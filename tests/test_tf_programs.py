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
# them on TF 2.14 and TFLite); the per-primitive samples stay quick.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) for c in CASES]
                         + SAMPLES + TF_ONLY_SAMPLES, ids=lambda c: c.name)
def test_program_in_tf221_equals_jax(case):
  got = run_tf(case)
  want = flat_outputs(case)
  assert len(got) == len(want)
  for (name, g), w in zip(got.items(), want):
    assert_close(g, w, case.rtol, what=f"{case.name}/{name}")


# Primitives JAX 0.10 no longer emits for these programs (older names and aliases kept in the
# table so older jaxprs still lower); everything else in the table must be exercised here.
NOT_EMITTED = {"pjit", "core_call", "remat", "checkpoint", "closed_call", "custom_vjp_call_jaxpr",
               "scatter_add", "copy_p", "sharding_constraint", "reshard", "mesh_cast", "random_clone",
               "expand_dims", "threefry2x32", "iota_2x32_shape", "copy"}


def _primitives(jaxpr, acc):
  for eqn in jaxpr.eqns:
    acc.add(eqn.primitive.name)
    for p in eqn.params.values():
      for sub in p if isinstance(p, tuple | list) else [p]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitives(sub.jaxpr, acc)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitives(sub, acc)
  return acc


def test_every_rule_is_exercised_by_a_program():
  seen = set()
  for case in ALL:
    _primitives(jax.make_jaxpr(case.fn)(*case.args).jaxpr, seen)
  missing = set(fbtf.all_rules()) - seen - NOT_EMITTED
  assert not missing, f"rules with no program exercising them: {sorted(missing)}"

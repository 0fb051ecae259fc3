"""Adding a primitive to the TF lowering is what docs/architecture.md says: one ``register`` entry
in a rule table keyed by the Primitive. Here a primitive the lowering has never seen is refused,
then lowered (and exported to TFF inside a federated computation) after that one entry alone."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf
from jax.extend import core as jcore
from jax.interpreters import batching, mlir

import faxbridge as fb
import faxbridge.converters.tf as fbtf
from faxbridge.converters.tf import registry

# x -> x**3 + x, a primitive of this test's own (JAX knows it; the TF lowering does not).
cubic_p = jcore.Primitive("test_cubic")
cubic_p.def_impl(lambda x: x * x * x + x)
cubic_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(cubic_p, mlir.lower_fun(lambda x: x * x * x + x, multiple_results=False))
batching.defvectorized(cubic_p)  # elementwise: fb.map vmaps it over clients


@contextlib.contextmanager
def cubic_rule():
  """The one entry, removed again so the table (and docs/tf_primitives.md's test) stays as shipped."""

  @fbtf.register(cubic_p, family="elementwise")
  def _cubic(ctx, eqn, x):
    return x * x * x + x

  try:
    yield
  finally:
    registry._RULES.pop(cubic_p)


def _fn(x):
  return cubic_p.bind(x) * 2.0


def test_one_register_entry_lowers_a_new_primitive():
  x = np.linspace(-2, 2, 7, dtype=np.float32)
  with pytest.raises(fb.UnsupportedPrimitiveError, match="test_cubic"):
    fbtf.to_tf(_fn, x)
  with cubic_rule():
    assert cubic_p in fbtf.all_rules()
    cf = fbtf.to_tf(_fn, x)
    got = cf(tf.constant(x))["out0"].numpy()
  np.testing.assert_allclose(got, 2 * (x**3 + x), rtol=1e-6)  # numpy, not the rule under test
  assert cubic_p not in fbtf.all_rules()


def test_the_tff_target_exports_a_round_using_it(tmp_path):
  comp = fb.computation(lambda x: fb.mean(fb.map(_fn, x)), in_placements=(fb.CLIENTS,))
  x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_allclose(comp(x), np.mean(2 * (x**3 + x), axis=0), rtol=1e-6)
  with pytest.raises(fb.UnsupportedPrimitiveError, match="test_cubic"):
    fb.export(comp, x, target="tff", out_dir=tmp_path / "without")
  assert not (tmp_path / "without").exists()
  with cubic_rule():
    out = fb.export(comp, x, target="tff", out_dir=tmp_path / "with")
  assert (out / "manifest.json").is_file()  # its run on TFF 0.87 is the slow test below


@pytest.mark.slow
def test_its_tff_export_runs_on_tff_equal_to_native(tmp_path):
  comp = fb.computation(lambda x: fb.mean(fb.map(_fn, x)), in_placements=(fb.CLIENTS,))
  x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
  with cubic_rule():
    out = fb.export(comp, x, target="tff", out_dir=tmp_path / "with")
  report = fb.verify(out, x, runtime="tff")
  assert report.ok, report

"""The tf converter's graphs on the other runtimes (slow): TF 2.14 (TFF's) and TFLite builtins.

* TF 2.14: every program's GraphDef (``jaxpr_to_graph_def``: TF1-style, default attrs stripped) runs
  in .venv-tff through ONE runner process, and its outputs equal JAX's.
* TFLite: the TF 2.21 converter with ``TFLITE_BUILTINS`` only converts every program whose rules are
  builtin, and ``ai_edge_litert``'s interpreter reproduces JAX; for each primitive the table marks
  ``tf-only`` the conversion is shown to fail, by name.
"""

from __future__ import annotations

import jax
import pytest
import tensorflow as tf
from tf_programs import CASES, SAMPLES, TF_ONLY_SAMPLES, Case, assert_close, flat_inputs, flat_outputs

import faxbridge.converters.tf as fbtf

pytestmark = pytest.mark.slow

ALL = CASES + SAMPLES + TF_ONLY_SAMPLES


def _graph_job(case: Case):
  from faxbridge.converters.runtimes.tff import GraphJob

  # bfloat16 outputs are fetched as float32 (exact): TF 2.14's numpy 1.25 cannot write them to npz
  fn = lambda *a: jax.tree_util.tree_map(
      lambda y: y.astype(jax.numpy.float32) if y.dtype == jax.numpy.bfloat16 else y, case.fn(*a))
  closed = jax.make_jaxpr(fn)(*case.args)
  ins = [f"in{i}" for i in range(len(closed.jaxpr.invars))]
  outs = [f"out{i}" for i in range(len(closed.jaxpr.outvars))]
  gd = fbtf.jaxpr_to_graph_def(closed, ins, outs)
  return GraphJob(gd, dict(zip(ins, flat_inputs(case))), outs)


@pytest.fixture(scope="module")
def tf214_results():
  """All programs in one TF 2.14 process (each start costs seconds)."""
  from faxbridge.converters.runtimes.tff import run_graphs

  results = run_graphs([_graph_job(c) for c in ALL], strict=False)
  return {c.name: r for c, r in zip(ALL, results)}


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_tf214_runs_graph_equal_to_jax(tf214_results, case):
  result = tf214_results[case.name]
  if isinstance(result, Exception):
    raise result
  want = flat_outputs(case)
  assert len(result) == len(want)
  for i, w in enumerate(want):
    assert_close(result[f"out{i}"], w, case.rtol, what=f"{case.name}/out{i} on TF 2.14", atol=case.atol)


def to_tflite(case: Case) -> tuple[bytes, list[str], list[str]]:
  """(TFLite flatbuffer, input names, output names) of ``case`` converted with builtins only."""
  cf = fbtf.to_tf(case.fn, *case.args)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([cf], tf.Module())
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert(), cf.faxbridge_input_names, cf.faxbridge_output_names


@pytest.mark.parametrize("case", CASES + SAMPLES, ids=lambda c: c.name)
def test_tflite_builtins_run_equal_to_jax(case):
  from ai_edge_litert.interpreter import Interpreter

  model, in_names, out_names = to_tflite(case)
  runner = Interpreter(model_content=model).get_signature_runner()
  got = runner(**dict(zip(in_names, flat_inputs(case))))
  want = flat_outputs(case)
  assert sorted(got) == sorted(out_names) and len(out_names) == len(want)
  for name, w in zip(out_names, want):
    assert_close(got[name], w, case.rtol, what=f"{case.name}/{name} on TFLite", atol=case.atol)


@pytest.mark.parametrize("case", TF_ONLY_SAMPLES, ids=lambda c: c.name)
def test_tf_only_primitive_does_not_convert_to_tflite_builtins(case):
  if case.name == "float16_bfloat16":  # a dtype limit, stated in the table's header
    from faxbridge.converters.tf import docs

    assert "16-bit floats" in docs.render()
  else:
    by_name = {prim.name: info for prim, info in fbtf.all_rules().items()}
    assert by_name[case.name].tflite in ("tf-only", "partial"), "the table must mark it"
  with pytest.raises(Exception, match=r"(?i)not supported|failed|convert"):
    to_tflite(case)

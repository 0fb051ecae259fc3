"""An aggregation defined outside faxbridge, with a parameter that matters, end to end.

A temporary installed package ``clipagg`` (a ``*.dist-info`` with ``entry_points.txt`` on
``sys.path``, and on ``PYTHONPATH`` for fresh processes) defines ``clipagg.clipped_sum``,
``sum_i clip(x_i, -c, c)``, through ``faxbridge.extend`` only, and declares it under the
entry-point group ``faxbridge.aggregations``. It runs natively (both execution strategies),
through ``fb.split(...).run``, exported to stablehlo on the ``jax`` runtime (a fresh process that
finds the aggregation through its entry point) and on IREE, each against numpy; its ``c`` is in
``plan.json`` and in ``inspect``'s text; the ``tff`` target, which has no intrinsic for it,
refuses it with one error. Adding an aggregation touches only the package: nothing in faxbridge.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys

import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src.drawing import round_html
from faxbridge._src.render import form_text
from faxbridge.converters.plan import check_plan
from faxbridge.extend import (
  AGGREGATION_ENTRY_POINTS,
  aggregate,
  aggregation_rule,
  define_aggregation,
)

KIND = "clipagg.clipped_sum"
C = 1.5
CLIENTS = 5

PACKAGE = '''\
"""sum_i clip(x_i, -c, c): each client's contribution bounded by c (a clipped sum)."""

import jax
import jax.numpy as jnp

from faxbridge.extend import Stream, aggregate, define_aggregation


def _reduce(xp, x, w, params):
  c = params["c"]
  return xp.sum(xp.clip(x, -c, c), axis=0, dtype=x.dtype)


def _accumulate(acc, x, w, params):
  c = params["c"]
  return acc + jnp.sum(jnp.clip(x, -c, c), axis=0, dtype=acc.dtype)


clipped_sum_p = define_aggregation(
    "clipagg.clipped_sum", reduce=_reduce, params=("c",),
    stream=Stream(init=lambda aval, weight_aval, params: jnp.zeros(aval.shape, aval.dtype),
                  accumulate=_accumulate,
                  combine=lambda acc, axis, params: jax.lax.psum(acc, axis),
                  finish=lambda acc, n, dtype, params: acc.astype(dtype)),
    doc="sum_i clip(x_i, -c, c)")


def clipped_sum(x, c):
  """CLIENTS -> SERVER: sum_i clip(x_i, -c, c), leaf by leaf."""
  return aggregate(clipped_sum_p, x, c=float(c))
'''

# Loaded only through its entry point (no test imports it): proves the lazy lookup by kind.
MEAN_MODULE = '''\
import jax.numpy as jnp

from faxbridge.extend import Stream, define_aggregation

define_aggregation(
    "clipagg.clipped_mean", params=("c",),
    reduce=lambda xp, x, w, p: xp.mean(xp.clip(x, -p["c"], p["c"]), axis=0, dtype=x.dtype),
    stream=Stream(init=lambda aval, weight_aval, p: jnp.zeros(aval.shape, aval.dtype),
                  accumulate=lambda acc, x, w, p: acc + jnp.clip(x, -p["c"], p["c"]).sum(0),
                  combine=lambda acc, axis, p: acc,
                  finish=lambda acc, n, dtype, p: (acc / n).astype(dtype)))
'''

ENTRY_POINTS = f"""\
[{AGGREGATION_ENTRY_POINTS}]
clipagg.clipped_sum = clipagg
clipagg.clipped_mean = clipagg.mean
clipagg.missing = clipagg.empty
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """A directory holding the installed package ``clipagg``, on sys.path for this module."""
  root = tmp_path_factory.mktemp("site")
  (root / "clipagg").mkdir()
  (root / "clipagg" / "__init__.py").write_text(PACKAGE)
  (root / "clipagg" / "mean.py").write_text(MEAN_MODULE)
  (root / "clipagg" / "empty.py").write_text('"""Declared as an aggregation, defines none."""\n')
  info = root / "clipagg-0.1.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clipagg\nVersion: 0.1\n")
  (info / "entry_points.txt").write_text(ENTRY_POINTS)
  sys.path.insert(0, str(root))
  importlib.invalidate_caches()
  yield root
  sys.path.remove(str(root))


@pytest.fixture(scope="module")
def clipagg(site):
  return importlib.import_module("clipagg")


@pytest.fixture
def env(site, monkeypatch):
  """A fresh process (runtime "jax") sees the package too."""
  monkeypatch.setenv("PYTHONPATH", str(site))


def _data(seed=0):
  # Values of magnitude up to ~4: most clients are clipped, so c changes the result.
  rng = np.random.default_rng(seed)
  return {"x": (3 * rng.normal(size=(CLIENTS, 3))).astype(np.float32),
          "b": (3 * rng.normal(size=(CLIENTS, 2, 2))).astype(np.float32)}


def _want(data, c=C):
  return {k: np.clip(v, -c, c).sum(0) for k, v in data.items()}


def _computation(clipagg, c=C, strategy=None):
  @fb.computation(in_placements=(fb.CLIENTS,), strategy=strategy)
  def clipped(data):
    doubled = fb.map(lambda d: {k: 2 * v for k, v in d.items()}, data)  # fused into the stream
    return clipagg.clipped_sum(doubled, c)

  return clipped


def _doubled(data):
  return {k: 2 * v for k, v in data.items()}


def test_the_package_is_declared_by_its_entry_points(site):
  names = {ep.name for ep in importlib.metadata.entry_points(group=AGGREGATION_ENTRY_POINTS)}
  assert {KIND, "clipagg.clipped_mean", "clipagg.missing"} <= names


@pytest.mark.parametrize("strategy", ["vmap", "stream", ("stream", 2)])
def test_runs_natively_against_numpy(clipagg, strategy):
  data = _data()
  for c in (C, 0.25):  # the param reaches the reduction, and the stream's accumulator
    got = _computation(clipagg, c, strategy)(data)
    want = _want(_doubled(data), c)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{k} c={c}")
  assert not np.allclose(_want(data, C)["x"], _want(data, 0.25)["x"])


def test_split_carries_the_param_and_runs_against_numpy(clipagg):
  data = _data(1)
  form = fb.split(_computation(clipagg), data)
  (stage,) = form.stages
  assert {(a.kind, tuple(a.params.items())) for a in stage.aggregations} == {(KIND, (("c", C),))}
  got = form.run(data)
  want = _want(_doubled(data))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert f"{KIND}[c={C}](" in form_text(form, "clipped")  # inspect's text and page
  page = round_html({"computation": form}, "clipped")  # its aggregations table: kind, params
  assert KIND in page and f"c={C}" in page
  assert f"fb.{KIND}[c={C}]" in _computation(clipagg).trace(data).pretty()


def test_a_kind_is_found_through_its_entry_point_when_first_needed(site):
  assert "clipagg.mean" not in sys.modules
  rule = aggregation_rule("clipagg.clipped_mean")  # imports the module its entry point names
  assert "clipagg.mean" in sys.modules and rule.params == ("c",)
  x = np.float32([[-3.0, 0.5], [2.0, 1.0], [0.1, -0.2]])
  np.testing.assert_allclose(rule.reduce(np, x, None, {"c": 1.0}), np.clip(x, -1, 1).mean(0))


def test_unknown_and_undefined_kinds_are_one_error_each(site):
  with pytest.raises(LookupError, match=r"'clipagg\.missing'.*clipagg\.empty does not define it"):
    aggregation_rule("clipagg.missing")
  with pytest.raises(LookupError, match=f"no installed package declares it.*{AGGREGATION_ENTRY_POINTS}"):
    aggregation_rule("nopkg.nothing")
  spec = {"name": "r", "shape": [], "dtype": "float32"}
  plan = {"computations": {"computation": {
      "inputs": [{"name": "x", "placement": "CLIENTS", "shape": [], "dtype": "float32"}],
      "outputs": [], "server_result": {"inputs": [], "outputs": []},
      "stages": [{"server_prepare": {"name": "p", "inputs": [], "outputs": []}, "broadcasts": [],
                  "client_work": {"name": "w", "inputs": [], "outputs": []},
                  "aggregations": [{"kind": "nopkg.nothing", "value": "x", "result": spec},
                                   {"kind": "secure_sum", "value": "x", "result": spec}]}]}}}
  with pytest.raises(fb.VerificationError) as info:
    check_plan(plan)
  assert "unknown aggregation kind 'nopkg.nothing'" in str(info.value)
  assert "'secure_sum' of 'x' has params [], its rule takes ['bitwidth']" in str(info.value)


def test_definitions_and_binds_that_cannot_work_are_refused(clipagg):
  stream = aggregation_rule(KIND).stream
  with pytest.raises(ValueError, match="named by its package"):
    define_aggregation("clipped_sum", reduce=lambda *a: None, stream=stream)
  with pytest.raises(ValueError, match="already defined"):
    define_aggregation(KIND, reduce=lambda *a: None, stream=stream)
  with pytest.raises(ValueError, match="identifiers"):
    define_aggregation("clipagg.other", reduce=lambda *a: None, stream=stream, params=("c-1",))

  def bind(**params):
    comp = fb.computation(lambda x: aggregate(clipagg.clipped_sum_p, x, **params),
                          in_placements=(fb.CLIENTS,))
    return comp(np.ones((2, 3), np.float32))

  with pytest.raises(TypeError, match=r"takes the params \['c'\]; missing \['c'\]"):
    bind()
  with pytest.raises(TypeError, match=r"unknown \['d'\]"):
    bind(c=1.0, d=2)
  with pytest.raises(TypeError, match="must be a bool, int, finite float or str"):
    bind(c=np.ones(2))
  np.testing.assert_allclose(bind(c=np.float32(0.5)), [1.0, 1.0, 1.0])  # numpy scalars are fine


def test_tff_refuses_it_naming_the_aggregation_and_the_target(clipagg, tmp_path):
  data = _data()
  with pytest.raises(fb.ExportError) as info:
    fb.export(_computation(clipagg), data, target="tff", out_dir=tmp_path / "tff")
  message = str(info.value)
  assert f"aggregation '{KIND}'" in message and "target 'tff'" in message
  assert "clipagg" in message and "__init__.py:" in message  # where the aggregation is bound
  assert not (tmp_path / "tff").exists()


@pytest.fixture(scope="module")
def stablehlo_export(clipagg, tmp_path_factory):
  data = _data(2)
  comp = _computation(clipagg)
  out = fb.export(comp, data, target="stablehlo",
                  out_dir=tmp_path_factory.mktemp("outside") / "stablehlo")
  return out, data, comp


@pytest.mark.slow  # IREE compiles each piece; the jax runtime starts a fresh process
@pytest.mark.parametrize("runtime", ["jax", "iree"])
def test_stablehlo_export_runs_on_the_plan_runtimes(stablehlo_export, env, runtime):
  out, data, comp = stablehlo_export
  plan = json.loads((out / "plan.json").read_text())
  (agg, other) = plan["computations"]["computation"]["stages"][0]["aggregations"]
  assert {agg["kind"], other["kind"]} == {KIND} and agg["params"] == other["params"] == {"c": C}
  # verify runs the export on the runtime and compares every output with the stored native
  # program of the same computation, which numpy checks here on the same data.
  report = fb.verify(out, data, runtime=runtime)
  assert report.ok, str(report)
  assert len(report.checks) == 2 and report.max_abs < 1e-5
  native, want = comp(data), _want(_doubled(data))
  for k in want:
    np.testing.assert_allclose(native[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.fixture(autouse=True)
def _iree_cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("FAXBRIDGE_IREE_CACHE", str(tmp_path_factory.getbasetemp() / "iree-cache"))

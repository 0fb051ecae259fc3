"""fb.from_drjax: a function written against drjax's API becomes a faxbridge computation whose
values and gradients equal the same function under drjax.program (drjax 0.2.1 is the independent
answer), with the client/server boundaries visible to split and export."""

from __future__ import annotations

import inspect

import drjax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faxbridge as fb

N, DIM, LR = 4, 3, 0.1
ATOL = 1e-6


def _max_diff(got, want) -> float:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  diffs = [0.0]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert jnp.shape(g) == jnp.shape(w) and jnp.result_type(g) == jnp.result_type(w)
    diffs.append(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))))
  return max(diffs)


def _drjax(fn, n=N):
  return drjax.program(placements={"clients": n})(fn)


# -- programs written with drjax's API only ------------------------------------------------------
def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _local_step(params, data):
  grads = jax.grad(_loss)(params, data["x"], data["y"])
  new = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return jax.tree.map(jnp.subtract, new, params), _loss(new, data["x"], data["y"])


def fedavg(params, data):
  """broadcast, map_fn of a tuple, reduce_mean of a pytree."""
  deltas, losses = drjax.map_fn(_local_step, (drjax.broadcast(params), data))
  mean_delta = drjax.reduce_mean(deltas)
  return jax.tree.map(jnp.add, params, mean_delta), drjax.reduce_mean(losses)


def weighted_fedavg(params, data):
  """reduce_weighted_mean with one weight per client (float32 and int32 counts), as drjax
  0.2.1 takes it: a weight of the value's tree structure."""
  deltas, losses = drjax.map_fn(_local_step, (drjax.broadcast(params), data))
  counts = data["count"]
  weights = jax.tree.map(lambda _: counts, deltas)
  mean_delta = drjax.reduce_weighted_mean(deltas, weights)
  int_counts = drjax.map_fn(lambda c: c.astype(jnp.int32), counts)
  return jax.tree.map(jnp.add, params, mean_delta), drjax.reduce_weighted_mean(losses, int_counts)


def summed(params, data):
  """reduce_sum of a map over a single (non-tuple) argument, and of a broadcast value;
  per-element weights (not one per client) in reduce_weighted_mean."""
  scores = drjax.map_fn(lambda d: jnp.sin(d["x"]).sum(axis=0) * d["count"], data)
  per_element = drjax.reduce_weighted_mean(scores, drjax.map_fn(jnp.exp, scores))
  return drjax.reduce_sum(scores) + params["w"], drjax.reduce_sum(drjax.broadcast(params["b"])), \
      per_element


def captures_server_value(params, data):
  """map_fn's function closes over a SERVER value (drjax's vmap allows it)."""
  scale = params["b"] * 2.0 + 1.0
  return drjax.reduce_mean(drjax.map_fn(lambda d: jnp.tanh(d["x"] @ params["w"]) * scale, data))


def everything(params, data):
  """Every translated drjax function in one program: one compilation per side."""
  return weighted_fedavg(params, data), fedavg(params, data)[1], summed(params, data), \
      captures_server_value(params, data)


# The quick suite runs `everything`; each program alone runs in the slow suite.
PROGRAMS = [everything] + [
    pytest.param(f, marks=pytest.mark.slow)
    for f in (fedavg, weighted_fedavg, summed, captures_server_value)
]


def _inputs(seed=0, n=N, batch=5, dim=DIM):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, batch, dim)).astype(np.float32)
  data = {"x": x, "y": (x @ rng.normal(size=dim) + 0.3).astype(np.float32),
          "count": rng.integers(1, 20, size=n).astype(np.float32)}
  params = {"w": rng.normal(size=dim).astype(np.float32), "b": np.float32(0.2)}
  return params, data


def _objective(round_fn):
  def objective(params, data):
    return sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(round_fn(params, data)))

  return objective


# -- values and gradients equal drjax.program's ----------------------------------------------------
@pytest.mark.parametrize("program", PROGRAMS, ids=lambda f: getattr(f, "__name__", None))
def test_value_and_server_gradient_equal_drjax_program(program):
  params, data = _inputs()
  comp = fb.from_drjax(program, in_placements=(fb.SERVER, fb.CLIENTS))
  reference = _drjax(program)
  # One compilation per side: the program's outputs and the objective's gradient.
  both = lambda f: jax.jit(lambda p, d: (f(p, d), jax.grad(_objective(f))(p, d)))
  (got, got_g), (want, want_g) = both(comp)(params, data), both(reference)(params, data)
  assert _max_diff(got, want) <= ATOL
  assert _max_diff(got_g, want_g) <= 1e-5 * max(1.0, float(np.max(np.abs(want_g["w"]))))
  assert np.abs(want_g["w"]).max() > 1e-3  # the gradient is not trivially zero


def test_a_drjax_program_is_accepted_decorated_and_gives_the_number_of_clients():
  params, data = _inputs(seed=1)
  decorated = _drjax(captures_server_value)
  comp = fb.from_drjax(decorated, in_placements=("server", "clients"))
  assert comp.clients == N
  assert _max_diff(comp(params, data), jax.jit(decorated)(params, data)) <= ATOL
  # Arguments keep the user's names (the trace, split and export name inputs after them).
  assert comp.trace(params, data).arg_names == ("params", "data")
  # drjax's own module is restored after tracing: outside a program it still refuses.
  with pytest.raises(Exception, match="only defined in the context"):
    drjax.broadcast(1.0)


@pytest.mark.slow
def test_gradient_with_respect_to_client_data_equals_drjax():
  params, data = _inputs(seed=3)
  comp = fb.from_drjax(weighted_fedavg, in_placements=(fb.SERVER, fb.CLIENTS))
  got = jax.jit(jax.grad(_objective(comp), argnums=1))(params, data)
  want = jax.jit(jax.grad(_objective(_drjax(weighted_fedavg)), argnums=1))(params, data)
  assert got["x"].shape == (N, 5, DIM)  # a per-client gradient, clients axis first
  assert _max_diff(got, want) <= 1e-5


@pytest.mark.slow
def test_random_shapes_and_client_counts():
  rng = np.random.default_rng(7)
  for _ in range(3):
    n, batch, dim = (int(v) for v in rng.integers(1, 6, size=3))
    params, data = _inputs(int(rng.integers(1 << 16)), n=n, batch=batch, dim=dim)
    comp = fb.from_drjax(weighted_fedavg, clients=n, in_placements=(fb.SERVER, fb.CLIENTS))
    assert _max_diff(comp(params, data), jax.jit(_drjax(weighted_fedavg, n))(params, data)) \
        <= ATOL


# -- the boundaries are faxbridge's --------------------------------------------------------------
def test_trace_and_split_show_the_client_work():
  params, data = _inputs()
  comp = fb.from_drjax(weighted_fedavg, in_placements=(fb.SERVER, fb.CLIENTS))
  traced = comp.trace(params, data)
  names = [e.primitive.name for e in traced.jaxpr.jaxpr.eqns]
  assert "faxbridge_broadcast" in names and "faxbridge_map" in names
  assert names.count("faxbridge_weighted_mean") == 3  # w, b and the losses
  assert not any("clients" in n for n in names)  # no drjax primitive left
  (stage,) = fb.split(comp, params, data).stages
  work = [e.primitive.name for e in stage.client_work.jaxpr.jaxpr.eqns]
  assert "dot_general" in str(stage.client_work.jaxpr)  # the local step runs on the clients
  assert not any(n.startswith("faxbridge_") for n in work)
  # A captured SERVER value became an explicit broadcast argument of the map.
  cap = fb.from_drjax(captures_server_value, in_placements=(fb.SERVER, fb.CLIENTS))
  names = [e.primitive.name for e in cap.trace(params, data).jaxpr.jaxpr.eqns]
  assert names.count("faxbridge_broadcast") == 2  # w and scale


@pytest.mark.slow
def test_export_stablehlo_verifies_on_jax(tmp_path):
  params, data = _inputs()
  comp = fb.from_drjax(fedavg, in_placements=(fb.SERVER, fb.CLIENTS))
  out = fb.export(comp, params, data, target="stablehlo", out_dir=tmp_path / "fedavg")
  report = fb.verify(out, params, data, runtime="jax")
  assert report.ok, report
  assert max(c.max_abs for c in report.checks) <= ATOL


@pytest.mark.slow
def test_export_to_tff_verifies_on_tff(tmp_path):
  params, data = _inputs()
  comp = fb.from_drjax(everything, in_placements=(fb.SERVER, fb.CLIENTS))
  out = fb.export(comp, params, data, target="tff", out_dir=tmp_path / "everything")
  report = fb.verify(out, params, data, runtime="tff")
  print(report)
  assert report.ok, report
  assert len(report.checks) == len(jax.tree.leaves(comp(params, data)))
  # The TFF outputs are drjax's too (within verify's float tolerance of the native program).
  assert _max_diff(comp(params, data), jax.jit(_drjax(everything))(params, data)) <= ATOL


# -- what has no translation is refused, naming it and the user's line ---------------------------
def _line_of(marker: str) -> str:
  source, _ = inspect.getsourcelines(inspect.getmodule(_line_of))
  (index,) = [i for i, line in enumerate(source) if marker in line and "_line_of" not in line]
  return f"test_from_drjax.py:{index + 1}"


def test_mesh_arguments_are_refused():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("clients",))

  def with_mesh(params, data):
    return drjax.reduce_sum(drjax.broadcast(params["b"], mesh=mesh))  # mesh-marker

  comp = fb.from_drjax(with_mesh, clients=N, in_placements=(fb.SERVER, fb.CLIENTS))
  with pytest.raises(fb.TraceError, match=r"drjax\.broadcast\(mesh=\.\.\.\)") as e:
    comp.trace(*_inputs())
  assert _line_of("# mesh-marker") in str(e.value)
  assert "fb.from_drjax(fn, mesh=...)" in str(e.value)


def test_collectives_over_the_placement_axis_are_refused():
  def centered(params, data):
    return drjax.reduce_sum(drjax.map_fn(
        lambda d: d["count"] - jax.lax.pmean(d["count"], "clients"), data))  # psum-marker

  comp = fb.from_drjax(centered, in_placements=(fb.SERVER, fb.CLIENTS))
  with pytest.raises(fb.TraceError, match="collectives over drjax's placement axis") as e:
    comp.trace(*_inputs())
  assert _line_of("# psum-marker") in str(e.value)


def test_a_nested_program_of_another_placement_is_refused():
  inner = drjax.program(placements={"devices": 2})(lambda v: drjax.reduce_sum(drjax.broadcast(v)))

  def nested(params, data):
    return inner(params["b"])  # nested-marker

  comp = fb.from_drjax(nested, in_placements=(fb.SERVER, fb.CLIENTS))
  with pytest.raises(fb.PlacementError, match=r"placements=\{'devices': 2\}") as e:
    comp.trace(*_inputs())
  assert _line_of("# nested-marker") in str(e.value)
  # A nested program of the same placement is translated like the rest.
  same = drjax.program(placements={"clients": N})(lambda v: drjax.reduce_sum(drjax.broadcast(v)))
  fine = fb.from_drjax(lambda params, data: same(params["b"]), in_placements=("server", "clients"))
  np.testing.assert_allclose(fine(*_inputs()), N * 0.2, rtol=1e-6)


def test_clients_disagreeing_with_the_drjax_program_are_refused():
  with pytest.raises(fb.PlacementError, match=r"clients=3.*placements=\{'clients': 4\}"):
    fb.from_drjax(_drjax(fedavg), clients=3, in_placements=(fb.SERVER, fb.CLIENTS))
  with pytest.raises(TypeError, match="in_placements takes"):
    fb.from_drjax(fedavg, in_placements=("server", "devices"))


def test_unknown_drjax_functions_are_refused(monkeypatch):
  # A later drjax may add API (say reduce_max); it must not run untranslated.
  monkeypatch.setattr(drjax, "reduce_max", lambda x: x, raising=False)

  def uses_max(params, data):
    return drjax.reduce_max(data["count"])  # max-marker

  comp = fb.from_drjax(uses_max, in_placements=(fb.SERVER, fb.CLIENTS))
  with pytest.raises(fb.TraceError, match=r"does not support drjax\.reduce_max") as e:
    comp.trace(*_inputs())
  assert _line_of("# max-marker") in str(e.value)


# -- the documentation runs ------------------------------------------------------------------------
@pytest.mark.slow
def test_docs_page_and_docstring_examples_run(tmp_path, monkeypatch):
  import doctest
  import pathlib
  import re

  import faxbridge._src.drjax_frontend

  monkeypatch.chdir(tmp_path)
  page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "drjax.md"
  text = page.read_text()
  ran = 0
  for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    line = text.count("\n", 0, m.start(1))
    exec(compile("\n" * line + m[1], str(page), "exec"), {"__name__": "__docs__"})
    ran += 1
  assert ran >= 1
  result = doctest.testmod(faxbridge._src.drjax_frontend, extraglobs={"fb": fb, "np": np, "drjax": drjax})
  assert result.attempted > 0 and result.failed == 0, result

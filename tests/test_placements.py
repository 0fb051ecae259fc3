"""Placement inference: what is SERVER, what is CLIENTS, and the PlacementErrors that point at the
user's line."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src import placements

HERE = __file__
S = np.float32(2.0)
X = np.arange(15, dtype=np.float32).reshape(5, 3)  # 5 clients
XS = np.arange(5, dtype=np.float32)  # 5 clients, a scalar each: same shape as a SERVER vector


def _raises(comp, *args) -> fb.PlacementError:
  with pytest.raises(fb.PlacementError) as info:
    comp(*args)
  # The same error at trace time, without running anything.
  with pytest.raises(fb.PlacementError) as traced:
    comp.trace(*args)
  assert str(traced.value) == str(info.value)
  return info.value


# -- the four placement mistakes of the issue ------------------------------------------------------
def test_server_value_to_map_without_broadcast(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.sum(fb.map(lambda a, b: a * b, s, x))  # server-to-map

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "server-to-map")
  assert "fb.map" in str(error) and "fb.broadcast" in str(error)


def test_server_value_to_map_caught_even_when_its_shape_looks_like_clients(assert_points_at):
  # A SERVER vector of length n has the shape of a CLIENTS scalar: only placements tell them apart.
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.sum(fb.map(lambda a, b: a * b, s, x))  # server-vector-to-map

  error = _raises(bad, XS, XS)
  assert_points_at(error, HERE, "server-vector-to-map")
  assert "fb.map received a SERVER-placed value as argument 0" in str(error)
  assert "fb.map(fn, fb.broadcast(params), data)" in str(error)


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "weighted_mean", "secure_sum"])
def test_aggregating_a_server_value(op, assert_points_at):
  aggregate = {  # the user's line is the one calling the aggregation
      "sum": lambda v: fb.sum(v),  # aggregate-sum
      "mean": lambda v: fb.mean(v),  # aggregate-mean
      "max": lambda v: fb.max(v),  # aggregate-max
      "min": lambda v: fb.min(v),  # aggregate-min
      "weighted_mean": lambda v: fb.weighted_mean(v, jnp.ones(5)),  # aggregate-weighted_mean
      "secure_sum": lambda v: fb.secure_sum(v.astype(int), bitwidth=4),  # aggregate-secure_sum
  }[op]

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return aggregate(s * jnp.ones((5, 3)))

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, f"aggregate-{op}")
  assert "SERVER-placed" in str(error) and "CLIENTS-placed" in str(error)


def test_aggregating_a_server_scalar_names_the_aggregation(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.mean(s)  # aggregate-scalar

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "aggregate-scalar")
  assert str(error).startswith("fb.mean ") and "not CLIENTS-placed" in str(error)


def test_broadcasting_a_clients_value(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.broadcast(x)  # broadcast-clients

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "broadcast-clients")
  assert "fb.broadcast received a CLIENTS-placed value" in str(error)


@pytest.mark.parametrize(
    "body",
    [lambda x: x.sum(axis=0), lambda x: jnp.mean(x, axis=0), lambda x: x[0], lambda x: x * 2.0],
    ids=["sum-axis0", "mean-axis0", "index", "multiply"],
)
def test_plain_jax_on_clients_value_outside_map(body):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return body(x)

  error = _raises(bad, S, X)
  # The innermost user frame is the lambda above, in this file.
  assert f"{HERE}:" in str(error)
  assert "was applied to a CLIENTS-placed value outside fb.map" in str(error)
  assert "fb.sum(x) instead of x.sum(axis=0)" in str(error)


def test_sum_axis0_names_the_line_and_the_hint(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return x.sum(axis=0)  # sum-axis0

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "sum-axis0")
  assert "'reduce_sum'" in str(error)
  assert "fb.sum(x) instead of x.sum(axis=0)" in str(error)


def test_mixing_server_and_clients_values_outside_map(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.sum(x + s)  # mixed

  assert_points_at(_raises(bad, S, X), HERE, "mixed")


def test_plain_jax_inside_a_jitted_helper_is_checked_too(assert_points_at):
  @jax.jit
  def helper(v):
    return jnp.max(v, axis=0)  # inside-jit

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return helper(x)

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "inside-jit")
  assert "'reduce_max'" in str(error)


def test_map_capturing_an_outer_traced_value(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def bad(s, x):
    return fb.sum(fb.map(lambda v: v * s, x))  # capture

  error = _raises(bad, S, X)
  assert_points_at(error, HERE, "capture")
  assert "captures a traced value" in str(error) and "fb.broadcast(value)" in str(error)


def test_map_may_close_over_constants():
  scale = np.float32(3.0)

  @fb.computation(in_placements=(fb.CLIENTS,))
  def ok(x):
    return fb.sum(fb.map(lambda v: v * scale + jnp.arange(3.0), x))

  np.testing.assert_allclose(ok(X), (X * 3 + np.arange(3.0)).sum(0))


@pytest.mark.parametrize("op", ["broadcast", "sum", "mean", "max", "min", "map"])
def test_federated_ops_outside_a_computation(op, assert_points_at):
  fn = {"map": functools.partial(fb.map, jnp.sin)}.get(op, getattr(fb, op))
  with pytest.raises(fb.PlacementError) as info:
    fn(X)  # outside
  assert_points_at(info.value, HERE, "outside")
  assert f"fb.{op} was called outside a federated computation" in str(info.value)


def test_wrong_leading_axis_and_wrong_number_of_arguments(assert_points_at):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
  def fine(s, x, w):
    return fb.weighted_mean(x, w)

  with pytest.raises(fb.PlacementError) as info:
    fine(S, X, np.ones(4, np.float32))  # leading-axis
  assert_points_at(info.value, HERE, "leading-axis")
  assert "argument 2" in str(info.value) and "(size 5)" in str(info.value)

  with pytest.raises(fb.PlacementError) as info:
    fine(S, {"a": X, "b": np.float32(1.0)}, XS)  # scalar-clients-leaf
  assert_points_at(info.value, HERE, "scalar-clients-leaf")
  assert "argument 1['b']" in str(info.value) and "shape ()" in str(info.value)

  with pytest.raises(fb.PlacementError) as info:
    fine(S, X)  # arg-count
  assert_points_at(info.value, HERE, "arg-count")
  assert "takes 3 positional arguments" in str(info.value) and "got 2" in str(info.value)

  with pytest.raises(fb.PlacementError, match=r"\(size 4\)"):
    fb.computation(fine.fn, clients=4, in_placements=fine.in_placements)(S, X, XS)

  with pytest.raises(TypeError, match=r"fb\.SERVER or fb\.CLIENTS"):
    fb.computation(lambda v: v, in_placements=("SERVER",))


def test_a_placement_error_is_a_type_error():
  assert issubclass(fb.PlacementError, TypeError)
  assert issubclass(fb.PlacementError, fb.FaxbridgeError)


# -- inference over a jaxpr ------------------------------------------------------------------------
def test_inference_follows_the_federated_primitives():
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def comp(s, x):
    y = fb.map(lambda a, b: a * b, fb.broadcast(s * 2.0), x)
    total = fb.sum(y)
    return total + s, y, fb.mean(y) * 3.0

  traced = comp.trace(S, X)
  assert traced.in_placements == (fb.SERVER, fb.CLIENTS)
  assert traced.out_placements == (fb.SERVER, fb.CLIENTS, fb.SERVER)
  by_prim = {}
  for eqn in traced.jaxpr.jaxpr.eqns:
    by_prim.setdefault(eqn.primitive.name, []).append(traced.var_placements[eqn.outvars[0]])
  assert by_prim["mul"] == [fb.SERVER, fb.SERVER]  # s * 2.0 and the mean * 3.0
  assert by_prim["faxbridge_broadcast"] == [fb.CLIENTS]
  assert by_prim["faxbridge_map"] == [fb.CLIENTS]
  assert by_prim["faxbridge_sum"] == by_prim["faxbridge_mean"] == by_prim["add"] == [fb.SERVER]


def test_inference_enters_jitted_helpers_holding_federated_ops():
  @jax.jit
  def aggregate(v):
    return fb.mean(v), fb.max(v)

  @fb.computation(in_placements=(fb.CLIENTS,))
  def comp(x):
    mean, peak = aggregate(fb.map(jnp.cos, x))
    return mean - peak, fb.map(jnp.sin, x)

  traced = comp.trace(X)
  assert traced.out_placements == (fb.SERVER, fb.CLIENTS)
  mean, clients_out = comp(X)
  np.testing.assert_allclose(mean, np.cos(X).mean(0) - np.cos(X).max(0), rtol=1e-6)
  np.testing.assert_allclose(clients_out, np.sin(X), rtol=1e-6)


def test_infer_on_a_hand_written_jaxpr():
  def f(s, x):
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.lax.with_sharding_constraint(x, one_device), s + 1.0

  closed = jax.make_jaxpr(f)(S, X)
  outs, env = placements.infer(closed.jaxpr, [fb.SERVER, fb.CLIENTS])
  assert outs == [fb.CLIENTS, fb.SERVER]
  assert set(env.values()) == {fb.SERVER, fb.CLIENTS}
  with pytest.raises(ValueError, match="1 placements for 2 jaxpr inputs"):
    placements.infer(closed.jaxpr, [fb.SERVER])
  with pytest.raises(fb.PlacementError, match="'add'"):
    placements.infer(closed.jaxpr, [fb.CLIENTS, fb.CLIENTS])


def test_placement_reprs():
  assert repr(fb.SERVER) == "fb.SERVER" and str(fb.CLIENTS) == "fb.CLIENTS"
  assert {fb.SERVER, fb.CLIENTS} == set(fb.Placement)


def test_error_inside_library_code_names_the_users_line(assert_points_at):
  # jax.nn.relu is a jitted custom_jvp function: the offending `max` lives in JAX's own code, so
  # the error must name the line of this file that called it.
  @fb.computation(in_placements=(fb.CLIENTS,))
  def comp(x):
    return jax.nn.relu(x)  # relu-on-clients

  with pytest.raises(fb.PlacementError, match="'max' was applied to a CLIENTS-placed value") as e:
    comp.trace(X)
  assert_points_at(e.value, HERE, "relu-on-clients")


def test_enclosing_location_is_the_fallback():
  from jax._src import source_info_util

  from faxbridge._src.locations import describe, enclosing

  here = source_info_util.current()  # this test's frame: user code
  assert describe(None, here) == describe(here) != ""
  no_user_frame = source_info_util.new_source_info()  # no traceback at all
  assert describe(no_user_frame) == ""
  assert describe(no_user_frame, here) == describe(here)
  assert enclosing(no_user_frame, here) is here and enclosing(here, None) is here

"""Clients with their own data sizes (faxbridge/_src/ragged.py): ``fb.ragged``, ``fb.fold``, their
native execution under both strategies, the split's spec and the exports' refusal.

Independent answers: numpy loops over each client's own examples only (the padding is never read),
with the derivatives written out by hand (forward mode for the weights, the chain rule backwards
for the examples), and the generated programs' numpy reference (tests/federated_programs.py).
Floats within 1e-6 + 1e-5 * |ref| (summation order), integers exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from federated_programs import build, example_inputs, generate, mismatches, reference

import faxbridge as fb
from faxbridge._src import ragged as R

SIZES = [1, 3, 17, 250, 0]  # the sizes and an empty client
STRATEGIES = ["vmap", ("stream", 2)]
D = 3  # features per example
RNG = np.random.default_rng(19)
EXAMPLES = [RNG.uniform(-1, 1, size=(m, D)).astype(np.float32) for m in SIZES]
W = RNG.uniform(0.5, 1.5, size=D).astype(np.float32)
H0 = RNG.uniform(-0.5, 0.5, size=D).astype(np.float32)


def _close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol,
                             atol=atol)


def _poisoned(data: fb.Ragged, value: float) -> fb.Ragged:
  x = np.array(data.examples)
  for i, m in enumerate(data.count):
    x[i, m:] = value
  return fb.Ragged(x, data.count, data.batch_size)


# -- one round over the clients' own examples, and its numpy reference ------------------------------
def local(w, h0, data):
  """The client's loop: ``h <- h/2 + tanh(w x_j)`` over its real examples; the client's value is
  ``sum(h)``."""
  return jnp.sum(fb.fold(lambda h, x: 0.5 * h + jnp.tanh(w * x), h0, data))


def make_round(strategy):
  @fb.computation(in_placements=(fb.SERVER, fb.SERVER, fb.CLIENTS), strategy=strategy)
  def ragged_round(w, h0, data):
    ys = fb.map(local, fb.broadcast(w), fb.broadcast(h0), data)
    loss = fb.weighted_mean(ys, data.count) + 0.5 * fb.mean(ys)
    return loss, ys, fb.max(ys), fb.sum(data.count)

  return ragged_round


def make_loss(strategy):
  """The round's loss alone (what the gradient tests differentiate, jitted: one compile)."""

  @fb.computation(in_placements=(fb.SERVER, fb.SERVER, fb.CLIENTS), strategy=strategy)
  def ragged_loss(w, h0, data):
    ys = fb.map(local, fb.broadcast(w), fb.broadcast(h0), data)
    return fb.weighted_mean(fb.map(lambda y: 2 * y, ys), data.count) + fb.mean(ys)

  return jax.jit(jax.grad(ragged_loss, argnums=(0, 1, 2), allow_int=True))


def numpy_round(w, h0, examples, scale=1.0, mean_share=0.5):
  """Values and derivatives, one client at a time over its own examples: ``loss``, the clients'
  ``ys``, ``d loss / d w``, ``d loss / d h0`` and ``d loss / d x`` (one array per client); the
  loss is ``scale * (weighted_mean(y, count) + mean_share * mean(y))``."""
  w, h0 = w.astype(np.float64), h0.astype(np.float64)
  counts = np.array([len(x) for x in examples], np.float64)
  ys, dw, dh0, dx = [], [], [], []
  for x in examples:
    h, g = h0.copy(), np.zeros_like(w)  # g = dh/dw, forward mode
    for e in x.astype(np.float64):
      t = np.tanh(w * e)
      h, g = 0.5 * h + t, 0.5 * g + (1 - t**2) * e
    ys.append(h.sum())
    dw.append(g)
    dh0.append(np.full_like(h0, 0.5 ** len(x)))
    # d sum(h_final) / d x_j = 0.5^(m-1-j) (1 - tanh(w x_j)^2) w
    m = len(x)
    dx.append(np.stack([0.5 ** (m - 1 - j) * (1 - np.tanh(w * e) ** 2) * w
                        for j, e in enumerate(x.astype(np.float64))]) if m else np.zeros((0, len(w))))
  ys = np.array(ys)
  # loss = sum_i (c_i / C + 0.5 / n) y_i: an empty client counts in the mean only.
  coef = scale * (counts / counts.sum() + mean_share / len(ys))
  loss = float(coef @ ys)
  return (loss, ys, sum(c * g for c, g in zip(coef, dw)), sum(c * g for c, g in zip(coef, dh0)),
          [c * g for c, g in zip(coef, dx)])


def test_ragged_pads_and_counts():
  data = fb.ragged(EXAMPLES)
  assert data.examples.shape == (5, 250, D) and data.examples.dtype == np.float32
  assert data.count.tolist() == SIZES and data.count.dtype == np.int32
  for x, m, got in zip(EXAMPLES, SIZES, data.examples):
    np.testing.assert_array_equal(got[:m], x)
    assert not got[m:].any()
  batched = fb.ragged(EXAMPLES, batch_size=16, max_length=300)
  assert batched.examples.shape == (5, 304, D) and batched.batch_size == 16
  assert np.asarray(batched.num_batches).tolist() == [1, 1, 2, 16, 0]
  leaves, tree = jax.tree.flatten(batched)
  assert len(leaves) == 2 and jax.tree.unflatten(tree, leaves).batch_size == 16


POISONS = (np.nan, 1e30, -np.inf)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_values_equal_numpy_over_each_clients_own_examples(strategy):
  comp = make_round(strategy)
  loss, ys, top, total = comp(W, H0, fb.ragged(EXAMPLES))
  want_loss, want_ys, *_ = numpy_round(W, H0, EXAMPLES)
  _close(loss, want_loss)
  _close(ys, want_ys)  # stacked in the clients' order (the stream sorts them by size to run)
  _close(top, want_ys.max())
  assert int(total) == sum(SIZES)
  assert ys[SIZES.index(0)] == pytest.approx(float(H0.sum()))  # an empty client's fold is init
  for poison in POISONS:  # the padding never reaches a value: bit for bit the same results
    got = comp(W, H0, _poisoned(fb.ragged(EXAMPLES), poison))
    for a, b in zip(jax.tree.leaves(got), (loss, ys, top, total)):
      np.testing.assert_array_equal(a, b, err_msg=f"padding {poison}")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_gradients_equal_numpy_and_ignore_the_padding(strategy):
  grad = make_loss(strategy)
  grads = grad(W, H0, fb.ragged(EXAMPLES))
  # 2 * loss: the loss is weighted_mean(2 y) + mean(y) (one aggregation per value: a CLIENTS value
  # read by two aggregations under jax.grad sums its cotangents outside fb.map, which placement
  # inference refuses).
  _, _, want_w, want_h0, want_x = numpy_round(W, H0, EXAMPLES, scale=2.0)
  _close(grads[0], want_w, atol=1e-5)
  _close(grads[1], want_h0, atol=1e-5)
  gx = np.asarray(grads[2].examples)
  for i, m in enumerate(SIZES):
    _close(gx[i, :m], want_x[i], atol=1e-5)
    assert not gx[i, m:].any()  # nothing flows to the padding
  for poison in POISONS:  # nor from it: NaN * 0 would be NaN in a backward pass
    got = grad(W, H0, _poisoned(fb.ragged(EXAMPLES), poison))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b, err_msg=f"padding {poison}")


def test_federated_gradient_through_the_fold_inside_a_computation():
  """FedSGD's shape: the server differentiates the clients' loss; the jaxpr keeps the boundary
  (the transpose of the broadcast is an fb.sum) and the fold's derivative is per-client work."""

  @fb.computation(in_placements=(fb.SERVER, fb.SERVER, fb.CLIENTS), strategy="vmap")
  def server_gradient(w, h0, data):
    def loss(w):
      return fb.weighted_mean(fb.map(local, fb.broadcast(w), fb.broadcast(h0), data), data.count)

    return jax.grad(loss)(w)

  data = fb.ragged(EXAMPLES)
  want = numpy_round(W, H0, EXAMPLES, mean_share=0.0)[2]
  _close(server_gradient(W, H0, data), want, atol=1e-5)
  assert "fb.sum" in server_gradient.trace(W, H0, data).pretty()
  form = fb.split(server_gradient, W, H0, data)
  assert form.folds() and [b.name for b in form.ragged_inputs] == ["data_examples"]
  _close(form.run(W, H0, data), want, atol=1e-5)


# -- batches: the client's loop over its own batches, a mask on the last ---------------------------
def batched_local(w, data):
  def step(h, batch, mask):
    t = jnp.where(mask[:, None], jnp.tanh(w * batch), 0.0)
    return 0.5 * h + jnp.sum(t, axis=0) / jnp.maximum(jnp.sum(mask), 1)

  return fb.fold(step, jnp.zeros(D, jnp.float32), data)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_batches_equal_numpy_and_ignore_poison(strategy):
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS), strategy=strategy)
  def batched(w, data):
    return fb.map(batched_local, fb.broadcast(w), data)

  want = []
  for x in EXAMPLES:
    h = np.zeros(D)
    for start in range(0, len(x), 4):  # the last batch holds only the client's remaining examples
      h = 0.5 * h + np.tanh(W * x[start:start + 4].astype(np.float64)).mean(axis=0)
    want.append(h)
  data = fb.ragged(EXAMPLES, batch_size=4)
  _close(batched(W, data), np.stack(want))
  np.testing.assert_array_equal(batched(W, data), batched(W, _poisoned(data, np.nan)))


# -- what an empty client contributes ---------------------------------------------------------------
def test_an_empty_client_per_aggregation():
  """Its fold returns init; weighted by its count it is left out of weighted_mean; mean, sum, max
  and min take its value like any other client's."""

  @fb.computation(in_placements=(fb.CLIENTS,))
  def totals(data):
    ys = fb.map(lambda d: fb.fold(lambda c, x: c + x, jnp.float32(10), d), data)
    return fb.weighted_mean(ys, data.count), fb.mean(ys), fb.sum(ys), fb.max(ys), fb.min(ys)

  data = fb.ragged([np.array([1.0, 2.0], np.float32), np.zeros(0, np.float32)])
  wmean, mean, total, top, low = totals(data)  # the clients' values: 13 and 10 (init)
  assert float(wmean) == 13.0  # weight 0: the empty client is left out
  assert (float(mean), float(total), float(top), float(low)) == (11.5, 23.0, 13.0, 10.0)
  assert np.isnan(totals(fb.ragged([np.zeros(0, np.float32)] * 2))[0])  # 0 / 0: nobody has data


# -- the stream's order --------------------------------------------------------------------------
def test_the_stream_sorts_clients_by_their_fold_steps():
  """The sort key of a map (what the stream orders clients by) is its folds' steps, computed from
  the count alone: the examples themselves are not read."""

  def steps_of(fn, data):
    comp = fb.computation(lambda w, d: fb.map(fn, fb.broadcast(w), d),
                          in_placements=(fb.SERVER, fb.CLIENTS))
    (_, m) = comp.trace(W, data).jaxpr.jaxpr.eqns
    key, used = R.fold_steps(m.params["jaxpr"])
    assert used == [False, False, True]  # (w, examples, count): the count only
    return [int(jax.core.eval_jaxpr(key.jaxpr, key.consts, np.int32(s))[0]) for s in SIZES]

  assert steps_of(lambda w, d: local(w, w, d), fb.ragged(EXAMPLES)) == SIZES
  assert steps_of(batched_local, fb.ragged(EXAMPLES, batch_size=4)) == [-(-s // 4) for s in SIZES]


def test_no_sort_key_when_the_count_takes_array_work():
  def local_weird(d):
    count = jnp.sum(d.examples[:, 0] > 0).astype(jnp.int32)  # a count computed from the examples
    return fb.fold(lambda c, x: c + x, jnp.zeros(D), fb.Ragged(d.examples, count))

  comp = fb.computation(lambda d: fb.map(local_weird, d), in_placements=(fb.CLIENTS,))
  data = fb.ragged(EXAMPLES)
  (m,) = comp.trace(data).jaxpr.jaxpr.eqns
  assert R.fold_steps(m.params["jaxpr"]) is None
  with fb.execution_strategy(("stream", 2)):
    got = comp(data)  # runs unsorted, still right
  want = [x[: int((x[:, 0] > 0).sum())].sum(0) for x in EXAMPLES]
  _close(got, np.stack(want), atol=1e-5)


# -- the generated programs with ragged inputs, native paths ----------------------------------------
RAGGED_SEEDS = [0, 3, 5, 7]  # unbatched and batched ragged inputs, both folds, folds from a value
QUICK_SEEDS = (0, 7)


def test_ragged_seeds_cover_the_ragged_features():
  features = set().union(*(generate(s, ragged=True).features for s in RAGGED_SEEDS))
  assert {"ragged_examples", "ragged_batched", "op_fold", "op_fold_count",
          "op_fold_from_value"} <= features


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in QUICK_SEEDS else pytest.mark.slow)
                                  for s in RAGGED_SEEDS], ids=lambda s: f"seed{s}")
def test_generated_ragged_programs_equal_numpy(seed):
  recipe = generate(seed, ragged=True)
  comp, args = build(recipe), example_inputs(recipe)  # the padding is poisoned
  want = reference(recipe, *args)
  for strategy in STRATEGIES:
    with fb.execution_strategy(strategy):
      problems = mismatches(want, comp(*args))
    assert not problems, f"seed {seed}, {strategy}:\n" + "\n".join(problems) + recipe.describe()
  problems = mismatches(want, fb.split(comp, *args).run(*args))
  assert not problems, f"seed {seed}, split:\n" + "\n".join(problems) + recipe.describe()


# -- the split's spec and the exports' refusal ------------------------------------------------------
def test_the_form_carries_the_ragged_spec():
  data = fb.ragged(EXAMPLES, batch_size=8)
  comp = fb.computation(lambda w, data: fb.map(batched_local, fb.broadcast(w), data),
                        in_placements=(fb.SERVER, fb.CLIENTS))
  form = fb.split(comp, W, data)
  (leaf,) = form.ragged_inputs
  assert leaf.name == "data_examples" and leaf.spec.shape == (256, D)
  assert leaf.ragged == fb.FederatedForm.from_json(form.to_json()).ragged_inputs[0].ragged
  assert leaf.ragged.to_json() == {"count": "data_count", "max_length": 256, "batch_size": 8}
  count = next(b for b in form.inputs if b.name == "data_count")
  assert count.spec.shape == () and count.spec.dtype == "int32" and count.ragged is None
  _close(form.run(W, data), comp(W, data))
  # `faxbridge inspect` lists the leaf at its traced length and says what a client really holds.
  from faxbridge._src import render

  text = render.form_text(form, "comp")
  assert "  data['examples']: own rows: the first data['count'] of at most 256\n" in text


@pytest.fixture
def fixed_shapes_target():
  """A target whose exporter takes no ragged programs (``ragged=False``, the registry's default):
  every built-in one takes them, a plug-in may not. Its exporter is stablehlo's; never reached."""
  from faxbridge.extend import Target, register_target, unregister_target

  register_target(Target("fixed_shapes", "faxbridge.converters.stablehlo.export:export_stablehlo",
                         "a test target without ragged programs"))
  yield "fixed_shapes"
  unregister_target("fixed_shapes")


def test_a_target_without_ragged_programs_refuses_naming_the_cause(fixed_shapes_target, tmp_path):
  with pytest.raises(fb.ExportError, match=r"its input data_examples holds each client's own "
                     r"number of examples \(fb.ragged, counted by data_count; folded by fb.fold at "
                     r".*test_ragged.py:\d+ \(local\)\), and the fixed_shapes target cannot export"):
    fb.export(make_round("vmap"), W, H0, fb.ragged(EXAMPLES), target=fixed_shapes_target,
              out_dir=tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_it_refuses_a_fold_over_data_the_user_padded(fixed_shapes_target, tmp_path):
  @fb.computation(in_placements=(fb.CLIENTS, fb.CLIENTS))
  def padded(x, count):
    return fb.sum(fb.map(lambda x, c: fb.fold(lambda h, e: h + e, 0.0, fb.Ragged(x, c)), x, count))

  x, count = np.ones((2, 4), np.float32), np.array([1, 3], np.int32)
  assert float(padded(x, count)) == 4.0
  with pytest.raises(fb.ExportError, match=r"it folds over a client's own examples \(fb.fold at "
                     r".*test_ragged.py:\d+"):
    fb.export(padded, x, count, target=fixed_shapes_target, out_dir=tmp_path / "x")


@pytest.mark.parametrize("target", ["stablehlo", "tflite", "tff", "flower"])
def test_every_built_in_target_takes_ragged_programs(target):
  from faxbridge._src import registry

  assert registry.targets()[target].ragged


# -- mistakes -------------------------------------------------------------------------------------
def test_mistakes_are_named():
  with pytest.raises(ValueError, match="share one leading"):
    fb.ragged([{"x": np.ones((2, 3)), "y": np.ones(3)}])
  with pytest.raises(ValueError, match="may differ only in their number of examples"):
    fb.ragged([np.ones((2, 3)), np.ones((2, 4))])
  with pytest.raises(ValueError, match="max_length=2 is below"):
    fb.ragged([np.ones((3, 1))], max_length=2)
  data = fb.ragged(EXAMPLES)

  @fb.computation(in_placements=(fb.CLIENTS,))
  def outside_map(data):
    return fb.fold(lambda c, x: c + x, jnp.zeros(D), data)

  with pytest.raises(fb.PlacementError, match=r"counts of 5 clients.*inside fb.map"):
    outside_map.trace(data)

  @fb.computation(in_placements=(fb.CLIENTS,))
  def wrong_carry(data):
    return fb.map(lambda d: fb.fold(lambda c, x: c + x, 0, d), data)  # int init, float step

  with pytest.raises(TypeError, match=r"step returned float32\[3\] for carry leaf init, which is "
                     r"int32\[\]"):
    wrong_carry.trace(data)
  with pytest.raises(TypeError, match=r"folds over an fb\.Ragged"):
    fb.computation(lambda x: fb.map(lambda x: fb.fold(lambda c, e: c, 0.0, x), x),
                   in_placements=(fb.CLIENTS,)).trace(np.ones((2, 3), np.float32))


# -- what the exports rely on -----------------------------------------------------------------------
def test_a_batch_holds_zeros_past_the_count():
  """The step sees zeros, not the padding, in the masked rows of the last batch: a step that forgets
  the mask still never reads a NaN (and its gradient none either)."""

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def unmasked(w, data):
    ys = fb.map(lambda w, d: fb.fold(lambda c, xb, m: c + jnp.sum(w * xb), 0.0, d),
                fb.broadcast(w), data)
    return fb.sum(ys)

  data = fb.ragged(EXAMPLES, batch_size=4)
  want = sum(float((W.astype(np.float64) * x).sum()) for x in EXAMPLES)
  for poison in (np.nan, 1e30, -np.inf):
    _close(unmasked(W, _poisoned(data, poison)), want)
    _close(jax.grad(unmasked)(W, _poisoned(data, poison)), sum(x.sum(axis=0) for x in EXAMPLES))


def test_client_values_are_each_clients_own_examples():
  form = fb.split(make_round("vmap"), W, H0, fb.ragged(EXAMPLES))
  from faxbridge._src.form import client_values

  data = fb.ragged(EXAMPLES)
  named = {"data_examples": np.asarray(data.examples), "data_count": np.asarray(data.count)}
  binding = next(b for b in form.inputs if b.name == "data_examples")
  got = client_values(binding, named, len(SIZES))
  assert [g.shape for g in got] == [(m, D) for m in SIZES]
  for g, x in zip(got, EXAMPLES):
    np.testing.assert_array_equal(g, x)
  with pytest.raises(ValueError, match=r"counts \[251\] outside \[0, 250\]"):
    client_values(binding, {**named, "data_count": np.array([1, 3, 17, 251, 0], np.int32)}, 5)


def test_padding_read_outside_a_fold_is_named():
  from faxbridge._src.export import SplitProgram, check_padding_unread

  @fb.computation(in_placements=(fb.CLIENTS,))
  def peeks(data):
    return fb.sum(fb.map(lambda d: fb.fold(lambda c, x: c + x, 0.0, d) + jnp.sum(d.examples), data))

  data = fb.ragged([np.ones(2, np.float32), np.ones(3, np.float32)])
  split = SplitProgram("peeks", "computation", {"computation": fb.split(peeks, data)}, {})
  with pytest.raises(fb.ExportError, match=r"\(data_examples\) are read by reduce_sum at "
                     r".*test_ragged.py:\d+ .*not by fb.fold"):
    check_padding_unread(split)

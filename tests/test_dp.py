"""faxbridge/_src/dp.py: the clipped mean against numpy, the noise's distribution and replay, adaptive
clipping against the paper's update written in numpy, epsilon against dp-accounting called
directly, the split (clipping on clients, noise on the server), inspect's DP lines, and (slow)
exports replayed on TFF, IREE, LiteRT and jax with the same noise."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src import drawing, render
from faxbridge._src.dp import adaptive_noise_multipliers, form_mechanisms

RNG = np.random.default_rng(7)
KEY = np.asarray([3, 11], np.uint32)


def _updates(n: int = 16) -> dict:
  """Client updates whose whole-update norms spread from ~0.1 to ~6 (some under a clip of 1)."""
  scales = np.geomspace(0.02, 1.5, n).astype(np.float32)
  return {"w": (RNG.normal(size=(n, 3, 4)) * scales[:, None, None]).astype(np.float32),
          "b": (RNG.normal(size=(n, 4)) * scales[:, None]).astype(np.float32)}


def _numpy_clip(x: dict, clip: float) -> tuple[dict, np.ndarray]:
  """Per client: scale the whole update (all leaves) to norm <= clip, in float64."""
  flat = np.concatenate([x["w"].reshape(len(x["b"]), -1), x["b"]], axis=1).astype(np.float64)
  norms = np.linalg.norm(flat, axis=1)
  scale = np.minimum(1.0, clip / norms)
  return {"w": x["w"] * scale[:, None, None], "b": x["b"] * scale[:, None]}, norms


@fb.computation(in_placements=(fb.CLIENTS, fb.SERVER))
def static_clip_mean(x, key):
  return fb.dp_mean(x, clip_norm=1.0, noise_multiplier=0.0, key=key)


@fb.computation(in_placements=(fb.CLIENTS, fb.SERVER, fb.SERVER))
def traced_clip_mean(x, clip, key):
  return fb.dp_mean(x, clip_norm=clip, noise_multiplier=0.0, key=key)


@fb.computation(in_placements=(fb.CLIENTS, fb.SERVER))
def noised_mean(x, key):
  return fb.dp_mean(x, clip_norm=2.0, noise_multiplier=0.8, key=key)


@fb.computation(in_placements=(fb.CLIENTS, fb.SERVER, fb.SERVER))
def adaptive(x, state, key):
  return fb.dp_adaptive_mean(x, state, key=key, noise_multiplier=1.0, target_quantile=0.5,
                             clip_learning_rate=0.2, clipped_count_stddev=2.0)


@fb.computation(in_placements=(fb.CLIENTS, fb.SERVER, fb.SERVER))
def adaptive_noiseless(x, state, key):
  return fb.dp_adaptive_mean(x, state, key=key, noise_multiplier=0.0, target_quantile=0.7,
                             clip_learning_rate=0.3)


# --- the clipped mean -----------------------------------------------------------------------------
def test_clipped_mean_equals_numpy_with_a_static_and_a_server_clip_norm():
  x = _updates()
  clipped, norms = _numpy_clip(x, 1.0)
  assert (norms < 1.0).any() and (norms > 1.0).any()  # both sides of the clip are exercised
  expected = {k: v.mean(axis=0) for k, v in clipped.items()}
  for got in (static_clip_mean(x, KEY), traced_clip_mean(x, np.float32(1.0), KEY)):
    err = max(float(np.max(np.abs(np.asarray(got[k]) - expected[k]))) for k in expected)
    assert err < 1e-6, err


def test_a_zero_update_stays_zero_and_a_small_one_is_unchanged():
  x = {"w": np.zeros((2, 3, 4), np.float32), "b": np.zeros((2, 4), np.float32)}
  x["b"][1] = [0.1, 0.0, 0.0, 0.0]  # norm 0.1 < 1: not scaled
  got = static_clip_mean(x, KEY)
  np.testing.assert_array_equal(np.asarray(got["w"]), 0.0)
  np.testing.assert_allclose(np.asarray(got["b"]), [0.05, 0, 0, 0], rtol=1e-6)


# --- the noise ------------------------------------------------------------------------------------
def test_noise_standard_deviation_over_many_keys_is_noise_multiplier_times_clip_norm():
  n = 4
  x = {"a": np.zeros((n, 500), np.float32), "b": np.zeros((n, 20, 25), np.float32)}
  samples = []
  for seed in range(40):
    out = noised_mean(x, np.asarray([seed, 1], np.uint32))
    samples.append(np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])]) * n)  # noise on the sum
  samples = np.stack(samples)  # [keys, 1000]
  stated = 0.8 * 2.0
  measured = float(samples.std())
  assert abs(measured / stated - 1) < 0.02, (measured, stated)  # 40,000 draws: ~0.4% standard error
  assert abs(float(samples.mean())) < 0.03 * stated
  # Leaves and keys draw independent noise: no correlation between leaf a and leaf b, or two keys.
  assert abs(np.corrcoef(samples[:, :500].ravel(), samples[:, 500:1000].ravel())[0, 1]) < 0.03
  assert abs(np.corrcoef(samples[0], samples[1])[0, 1]) < 0.15


def test_same_key_same_noise_replayed_from_the_documented_key_derivation():
  x = _updates(8)
  a, b = noised_mean(x, KEY), noised_mean(x, KEY)
  c = noised_mean(x, KEY + 1)
  for k in ("w", "b"):
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert not np.allclose(np.asarray(a[k]), np.asarray(c[k]))
  # Written another way: split(key, leaves) in leaf order (b before w), normal per leaf.
  clipped, _ = _numpy_clip(x, 2.0)
  keys = jax.random.split(jnp.asarray(KEY), 2)
  for i, k in enumerate(["b", "w"]):
    noise = 0.8 * 2.0 * np.asarray(jax.random.normal(keys[i], x[k].shape[1:], jnp.float32))
    np.testing.assert_allclose(np.asarray(a[k]), (clipped[k].sum(0) + noise) / 8, atol=2e-6)


def test_a_typed_key_gives_the_raw_keys_noise():
  x = _updates(8)
  typed = jax.random.wrap_key_data(jnp.asarray(KEY))
  got, want = noised_mean(x, typed), noised_mean(x, KEY)
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


def test_a_key_that_is_not_a_key_is_refused():
  with pytest.raises(TypeError, match="uint32"):
    noised_mean(_updates(4), np.zeros(2, np.int32))


# --- adaptive clipping ----------------------------------------------------------------------------
def test_adaptive_noiseless_round_is_the_clipped_mean_and_the_geometric_clip_update():
  x = _updates()
  clip = 0.8
  mean, state = adaptive_noiseless(x, fb.dp_adaptive_init(clip), KEY)
  clipped, norms = _numpy_clip(x, clip)
  for k in ("w", "b"):
    np.testing.assert_allclose(np.asarray(mean[k]), clipped[k].mean(0), atol=1e-6)
  fraction = np.mean(norms <= clip)
  np.testing.assert_allclose(float(state["clip_norm"]), clip * np.exp(-0.3 * (fraction - 0.7)),
                             rtol=1e-6)


def test_adaptive_noised_round_follows_andrew_et_al():
  x = _updates()
  z, sigma_b, clip = 1.0, 2.0, 0.8
  mean, state = adaptive(x, fb.dp_adaptive_init(clip), KEY)
  # The paper's Theorem 1: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2.
  z_delta = 1.0 / np.sqrt(1.0 / z**2 - 1.0 / (2 * sigma_b) ** 2)
  update_key, count_key = jax.random.split(jnp.asarray(KEY))
  leaf_keys = jax.random.split(update_key, 2)
  clipped, norms = _numpy_clip(x, clip)
  n = len(norms)
  for i, k in enumerate(["b", "w"]):
    noise = z_delta * clip * np.asarray(jax.random.normal(leaf_keys[i], x[k].shape[1:]))
    np.testing.assert_allclose(np.asarray(mean[k]), (clipped[k].sum(0) + noise) / n, atol=2e-6)
  count = np.sum(norms <= clip) + sigma_b * float(jax.random.normal(count_key, ()))
  np.testing.assert_allclose(float(state["clip_norm"]),
                             clip * np.exp(-0.2 * (count / n - 0.5)), rtol=1e-5)


def test_adaptive_noise_multiplier_needs_enough_count_noise():
  assert adaptive_noise_multipliers(1.0, 2.5) == pytest.approx((1 - 1 / 25) ** -0.5)
  with pytest.raises(ValueError, match="clipped_count_stddev"):
    adaptive_noise_multipliers(1.0, 0.5)


def test_adaptive_clip_moves_towards_the_target_quantile_over_rounds():
  x = _updates(40)
  _, norms = _numpy_clip(x, 1.0)
  state = fb.dp_adaptive_init(0.01)
  for _ in range(60):
    _, state = adaptive_noiseless(x, state, KEY)
  fraction = np.mean(norms <= float(state["clip_norm"]))
  assert abs(fraction - 0.7) <= 0.1, fraction


# --- accounting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", pytest.param("pld", marks=pytest.mark.slow)])
def test_epsilon_equals_dp_accounting_called_directly(accountant):
  import dp_accounting

  z, q, rounds, delta = 1.1, 0.05, 60, 1e-5
  acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
         else dp_accounting.pld.PLDAccountant())
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
  want = acc.get_epsilon(delta)
  got = fb.dp_epsilon(noise_multiplier=z, sampling_rate=q, rounds=rounds, delta=delta,
                      accountant=accountant)
  assert got == pytest.approx(want, rel=1e-9)
  assert 0 < got < 10
  assert fb.dp_epsilon(noise_multiplier=z, sampling_rate=q, rounds=2 * rounds, delta=delta,
                       accountant=accountant) > got  # more rounds spend more


def test_epsilon_of_no_noise_is_infinite_and_a_bad_accountant_is_refused():
  assert fb.dp_epsilon(noise_multiplier=0, sampling_rate=0.1, rounds=1, delta=1e-5) == np.inf
  with pytest.raises(ValueError, match="accountant"):
    fb.dp_epsilon(noise_multiplier=1, sampling_rate=0.1, rounds=1, delta=1e-5, accountant="x")


# --- the split and inspect ------------------------------------------------------------------------
_RANDOM = {"random_bits", "random_split", "random_wrap", "random_unwrap", "threefry2x32",
           "erf_inv", "random_fold_in", "random_seed"}


def _primitive_names(jaxpr) -> set[str]:
  from faxbridge._src.dp import _eqns

  return {e.primitive.name for e in _eqns(jaxpr.jaxpr)}


@pytest.mark.parametrize("comp,args", [
    (noised_mean, lambda x: (x, KEY)),
    (adaptive, lambda x: (x, fb.dp_adaptive_init(1.0), KEY))], ids=["dp_mean", "adaptive"])
def test_split_clips_in_client_work_and_draws_noise_only_on_the_server(comp, args):
  form = fb.split(comp, *args(_updates(8)))
  client = set().union(*(_primitive_names(s.client_work.jaxpr) for s in form.stages))
  server = set().union(*(_primitive_names(p.jaxpr) for p in
                         [*(s.server_prepare for s in form.stages), form.server_result]))
  assert not client & _RANDOM  # no noise leaves the server
  assert server & _RANDOM >= {"random_bits", "erf_inv"}
  assert {"sqrt", "min"} <= client  # the norm and the clip factor are client work
  (mech,) = form_mechanisms(form)
  assert mech["clipping_in"] == ["stage0_client_work"]
  assert mech["noise_in"] and all("client" not in p for p in mech["noise_in"])


def test_inspect_text_shows_the_dp_parameters():
  static = render.form_text(fb.split(noised_mean, _updates(8), KEY), "noised")
  assert "differential privacy: gaussian mechanism" in static
  assert "clip norm: 2\n" in static and "noise multiplier: 0.8\n" in static
  assert "noise (server only): stage0_server_prepare" in static
  text = render.form_text(fb.split(adaptive, _updates(8), fb.dp_adaptive_init(1.0), KEY), "a")
  assert "clip norm: server state (adapted each round)" in text
  assert "update sum's noise multiplier: 1.0328" in text  # (1 - 1/16)^-1/2
  assert "clipped count's noise stddev: 2\n" in text
  import xml.etree.ElementTree as ET

  page = drawing.round_html({"next": fb.split(adaptive, _updates(8), fb.dp_adaptive_init(1.0),
                                              KEY)}, "dp")
  ET.fromstring(page.split("\n", 1)[1])  # still well-formed XHTML
  assert "<th>clip norm</th><td>server state (adapted each round)</td>" in page  # DP table
  plain = render.form_text(fb.split(fb.computation(fb.mean, in_placements=(fb.CLIENTS,)),
                                     np.ones((3, 2), np.float32)), "plain")
  assert "differential privacy" not in plain


# --- the example ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dp_fedavg_learns_digits_well_above_chance_and_reports_dp_accountings_epsilon():
  import dp_accounting

  from examples import dp_fedavg

  history = dp_fedavg.train(rounds=15, log=None)
  assert history[0]["accuracy"] < 0.3
  assert history[-1]["accuracy"] > 0.1 + 0.5  # chance is 0.1 (ten digits); measured 0.875
  acc = dp_accounting.rdp.RdpAccountant()
  q = dp_fedavg.CLIENTS_PER_ROUND / dp_fedavg.TOTAL_CLIENTS
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(dp_fedavg.NOISE_MULTIPLIER)), 15)
  assert history[-1]["epsilon"] == pytest.approx(acc.get_epsilon(dp_fedavg.DELTA), rel=1e-9)


# --- exports replay the same noise ----------------------------------------------------------------
def _dp_programs():
  x = _updates(8)
  return {"dp_mean": (noised_mean, (x, KEY)),
          "adaptive": (adaptive, (x, fb.dp_adaptive_init(0.8), KEY))}


TARGET_OF = {"tff": "tff", "iree": "stablehlo", "jax": "stablehlo", "litert": "tflite"}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["tff", "iree", "litert", "jax"])
@pytest.mark.parametrize("name", ["dp_mean", "adaptive"])
def test_export_replays_the_noise_on_every_runtime(tmp_path, name, runtime):
  comp, args = _dp_programs()[name]
  out = fb.export(comp, *args, target=TARGET_OF[runtime], out_dir=tmp_path / name)
  report = fb.verify(out, *args, runtime=runtime)
  assert report.ok, str(report)
  assert report.max_abs < 1e-5
  # The noise is really there (not the clipped mean): the native result differs from numpy's
  # noiseless clipped mean by far more than the tolerance.
  native = comp(*args)
  mean = native[0] if isinstance(native, tuple) else native
  clipped, _ = _numpy_clip(args[0], 2.0 if name == "dp_mean" else 0.8)
  assert np.abs(np.asarray(mean["w"]) - clipped["w"].mean(0)).max() > 1e-2
  print(f"{name} on {runtime}: max abs err {report.max_abs:.3g}, max rel err {report.max_rel:.3g}")
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["computation"]["outputs"]


# The DP-FedAvg example's process on every runtime, 3 rounds, every output (the key and the clip
# norm too) against the native program and an independent reference that replays the noise from
# the documented key derivation: test_examples_reference.py, test_every_example_on_runtime.


def test_docstring_examples_run():
  import doctest

  import faxbridge._src.dp

  result = doctest.testmod(faxbridge._src.dp, extraglobs={"fb": fb, "np": np}, report=True)
  assert result.attempted >= 6 and result.failed == 0, result

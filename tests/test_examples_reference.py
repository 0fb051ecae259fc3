"""Every bundled example's exports, over all of its rounds, against an independent reference.

``fb.verify`` compares a runtime with faxbridge's own native run, so a bug in tracing, splitting or
the aggregation rules that both sides share would pass it. Here each example is written again
without faxbridge: per-client work as a Python loop over clients (or ``jax.vmap``), aggregations
as explicit numpy reductions over the clients axis (sum keeps the dtype, mean = sum / n,
weighted_mean = sum(w * x) / sum(w), max / min over clients, secure_sum an integer sum), and an
iterative process as a Python loop feeding its state back. A client with its own number of examples
(an ``fb.Ragged`` input) is a loop over its real examples only, read as ``examples[i, :count[i]]``
and cut into batches by slicing (the last one shorter): the reference never sees the padding. The
digits MLP's loss and gradient are numpy (``algorithm_references.mlp_value_and_grad``); only the
initial parameters of ``examples/_mlp.py`` are shared; nothing here calls ``fb.*`` or an example's
``fb.computation``.

The runtime's outputs must equal the reference elementwise within ``1e-6 + 1e-5 * |reference|``
for floats, exactly for integers, with the reference's dtype and shape. In the slow suite the same
outputs must also pass ``fb.verify``'s comparison with the export's native program
(``native_outputs`` and ``compare_all``, what ``fb.verify`` is made of), so one run of each export
on each runtime serves both checks. The quick suite runs two programs on runtime ``jax``
(``faxbridge._src.verify.run_on_runtime``: a fresh process each); the slow suite runs every program
on TFF (all in one runner process), IREE, LiteRT and jax (all in one fresh process, jax_batch.py).
A negative check shows that a reference with a slightly wrong learning rate, or shifted by one
round, is caught. The same references check every example's native run, no export needed
(``test_native_run_matches_the_reference``; FedAvg and the two computations in the quick suite).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import algorithm_references as algo
import jax
import numpy as np
import pytest
from jax_batch import run_on_jax
from run_shared import made_once

import faxbridge as fb
from examples import EXAMPLES, _mlp, _transformer
from faxbridge._src.export import check_padding_unread, split_program
from faxbridge._src.verify import compare_all, native_outputs, run_on_runtime
from faxbridge.converters.runtimes import jax_runner

RTOL, ATOL = 1e-5, 1e-6
ROUNDS = 3  # rounds of each iterative process, every one compared
TARGET_OF = {"jax": "stablehlo", "iree": "stablehlo", "litert": "tflite", "tff": "tff"}

# The examples' hyperparameters, restated rather than imported: a reference that read them from
# the example would follow a wrong edit there.
FEDAVG_LR = 0.1
FEDSGD_LR = 0.5
FEDADAM = {"local_lr": 0.05, "server_lr": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-3}
FEDYOGI = {**FEDADAM, "initial_accumulator": 1e-6}  # optax.yogi's default start of m and v
ANALYTICS = {"bins": 20, "lo": 0.1, "hi": 0.5}
F32 = np.float32


# -- aggregations over the clients axis (axis 0), written out --------------------------------------
def agg_sum(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return np.sum(x, axis=0, dtype=x.dtype)


def agg_mean(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return (agg_sum(x) / x.dtype.type(x.shape[0])).astype(x.dtype)


def agg_weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """The weights in the values' dtype (integer counts too), as fb.weighted_mean casts them."""
  x = np.asarray(x)
  w = np.asarray(w).astype(x.dtype)
  wx = w.reshape(w.shape + (1,) * (x.ndim - 1)) * x
  return (agg_sum(wx) / agg_sum(w)).astype(x.dtype)


def tree_stack(trees: list) -> Any:
  """Per-client results (a Python list) to one pytree of arrays with a leading clients axis."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# -- the examples, without faxbridge ---------------------------------------------------------------
def ref_fedavg_round(params: dict, data, lr: float = FEDAVG_LR,
                     weights: np.ndarray | None = None) -> tuple:
  """Each client one epoch of SGD over its own batches; deltas and training losses averaged with
  the clients' real example counts as weights (or ``weights``)."""
  deltas, losses = [], []
  for i in range(len(data.count)):
    trained, loss = algo.local_sgd(params, algo.digit_batches(data, i), lr)
    deltas.append({k: trained[k] - np.asarray(params[k]) for k in params})
    losses.append(loss)
  deltas = tree_stack(deltas)
  weights = np.asarray(data.count) if weights is None else weights
  new_params = {k: np.asarray(params[k]) + agg_weighted_mean(deltas[k], weights) for k in params}
  return new_params, agg_weighted_mean(np.stack(losses), weights)


def ref_fedsgd_round(params: dict, data, lr: float = FEDSGD_LR) -> tuple:
  """Each client's mean loss over all of its own examples at once and its gradient; one step with
  the count-weighted mean gradient."""
  losses, grads = [], []
  for own in algo.own_examples(data):
    loss, grad = algo.mlp_value_and_grad(params, own)
    losses.append(loss)
    grads.append(grad)
  grads, weights = tree_stack(grads), np.asarray(data.count)
  mean_grad = {k: agg_weighted_mean(grads[k], weights) for k in grads}
  return ({k: np.asarray(params[k]) - F32(lr) * mean_grad[k] for k in params},
          agg_weighted_mean(np.stack(losses), weights))


def _local_deltas(params: dict, data, lr: float) -> dict:
  """Each client's update after one epoch of SGD over its own batches, stacked over clients."""
  deltas = []
  for i in range(len(data.count)):
    trained, _ = algo.local_sgd(params, algo.digit_batches(data, i), lr)
    deltas.append({k: trained[k] - np.asarray(params[k]) for k in params})
  return tree_stack(deltas)


def _bias_corrected(moment: np.ndarray, decay: float, step: np.ndarray) -> np.ndarray:
  return moment / (F32(1) - np.power(F32(decay), step.astype(F32)))


def ref_fedopt_round(state: dict, data: dict, second_moment: Callable, h: dict,
                     server_lr: float | None = None) -> tuple:
  """FedOpt with an Adam-like server optimizer in numpy float32: the pseudo-gradient g is minus
  the example-weighted mean delta; m <- b1 m + (1 - b1) g, v <- ``second_moment(v, g)``, both
  bias-corrected by the step t, and w <- w - lr m_hat / (sqrt(v_hat) + eps)."""
  server_lr = h["server_lr"] if server_lr is None else server_lr
  params = {k: np.asarray(v) for k, v in state["params"].items()}
  deltas = _local_deltas(params, data, h["local_lr"])
  weights = np.asarray(data.count)
  grad = {k: -agg_weighted_mean(deltas[k], weights) for k in params}
  norm = np.sqrt(sum(np.sum(g * g, dtype=F32) for _, g in sorted(grad.items()))).astype(F32)
  moments, empty = state["opt"]
  step = (np.asarray(moments["count"]) + np.int32(1)).astype(np.int32)
  m = {k: (F32(h["b1"]) * moments["mu"][k] + F32(1 - h["b1"]) * grad[k]).astype(F32)
       for k in params}
  v = {k: second_moment(np.asarray(moments["nu"][k]), grad[k]).astype(F32) for k in params}
  new = {k: (params[k] - F32(server_lr) * _bias_corrected(m[k], h["b1"], step)
             / (np.sqrt(_bias_corrected(v[k], h["b2"], step)) + F32(h["eps"]))).astype(F32)
         for k in params}
  return ({"params": new, "opt": ({"count": step, "mu": m, "nu": v}, empty)},
          {"update_norm": norm})


def ref_fedadam_round(state: dict, data: dict, server_lr: float | None = None) -> tuple:
  b2 = F32(FEDADAM["b2"])
  return ref_fedopt_round(state, data, lambda v, g: b2 * v + (F32(1) - b2) * g * g, FEDADAM,
                          server_lr)


def ref_fedyogi_round(state: dict, data: dict, server_lr: float | None = None) -> tuple:
  # Yogi: v moves towards g^2 by (1 - b2) g^2 at most, in the direction of sign(g^2 - v).
  b2 = F32(FEDYOGI["b2"])
  return ref_fedopt_round(state, data, lambda v, g: v - (F32(1) - b2) * np.sign(v - g * g) * g * g,
                          FEDYOGI, server_lr)


def _ref_fedopt_init(accumulator: float) -> dict:
  params = _mlp.init_params()
  fill = {k: np.full_like(v, accumulator) for k, v in params.items()}
  return {"params": params, "opt": ({"count": np.zeros((), np.int32), "mu": fill,
                                     "nu": dict(fill)}, {})}


def ref_fedadam_init() -> dict:
  return _ref_fedopt_init(0.0)


def ref_fedyogi_init() -> dict:
  return _ref_fedopt_init(FEDYOGI["initial_accumulator"])


def ref_analytics(levels, values) -> dict:
  """Per client, over its own values only: mean, bin counts, max, min; the server: the mean of
  means weighted by the counts, the summed counts, the max of maxima, the min of minima, and each
  quantile found by walking the cumulative counts to the bin where q N falls."""
  own = [np.asarray(v) for v in (np.asarray(values.examples)[i, :m]
                                 for i, m in enumerate(np.asarray(values.count)))]
  lo, hi, bins = ANALYTICS["lo"], ANALYTICS["hi"], ANALYTICS["bins"]
  width = F32((hi - lo) / bins)
  means = np.stack([np.sum(v, dtype=F32) / F32(max(len(v), 1)) for v in own]).astype(F32)
  counts = []
  for v in own:
    index = np.clip(np.floor((v - F32(lo)) * F32(bins / (hi - lo))), 0, bins - 1).astype(int)
    counts.append(np.bincount(index, minlength=bins).astype(np.int32))
  histogram = agg_sum(np.stack(counts))  # secure_sum: an exact integer sum
  total = float(histogram.sum())
  quantiles = []
  for q in np.asarray(levels, dtype=np.float64):
    target, below, k = q * total, 0.0, 0
    while k < bins - 1 and below + histogram[k] < target:  # bins entirely below q N
      below += histogram[k]
      k += 1
    inside = 0.0 if histogram[k] == 0 else min(max((target - below) / histogram[k], 0.0), 1.0)
    quantiles.append(lo + (k + inside) * float(width))
  return {"histogram": histogram, "max": np.max(np.stack([v.max() for v in own]), axis=0),
          "mean": agg_weighted_mean(means, np.asarray(values.count)),
          "min": np.min(np.stack([v.min() for v in own]), axis=0),
          "quantiles": np.asarray(quantiles, F32)}


def ref_two_stage(scale, values) -> tuple:
  values = np.asarray(values)
  mean = agg_mean(np.stack([scale * np.mean(v, axis=0, dtype=F32) for v in values]))
  centred = np.stack([np.mean((v - mean) ** 2, axis=0, dtype=F32) for v in values])
  return mean, agg_mean(centred)


DP_FEDAVG = {"local_lr": 0.5, "server_lr": 1.0, "z": 1.0, "count_stddev": 2.5, "quantile": 0.5,
             "clip_lr": 0.2, "initial_clip": 0.5}


def ref_dp_fedavg_init() -> dict:
  return {"params": _mlp.init_params(0), "clip": {"clip_norm": F32(DP_FEDAVG["initial_clip"])},
          "key": np.asarray([0, 0], np.uint32)}


def ref_dp_fedavg_round(state: dict, data: dict) -> tuple:
  """DP-FedAvg with adaptive clipping (Andrew et al. 2021) in numpy float32; only the Gaussian
  draws come from ``jax.random`` (threefry), from the key derivation docs/dp.md states."""
  h, params, clip = DP_FEDAVG, state["params"], F32(state["clip"]["clip_norm"])
  deltas = _local_deltas(params, data, h["local_lr"])
  n, names = len(data.count), sorted(params)  # leaf order: sorted dict keys
  norms = np.sqrt(sum(np.sum(np.square(deltas[k]).reshape(n, -1), axis=1, dtype=F32)
                      for k in names)).astype(F32)
  scale = np.minimum(F32(1), clip / np.maximum(norms, F32(1e-12)))
  noise_key, next_key = jax.random.split(np.asarray(state["key"]))
  update_key, count_key = jax.random.split(noise_key)
  leaf_keys = jax.random.split(update_key, len(names))
  z_delta = F32((h["z"] ** -2 - (2 * h["count_stddev"]) ** -2) ** -0.5)
  new_params = {}
  for k, leaf_key in zip(names, leaf_keys):
    clipped = deltas[k] * scale.reshape((n,) + (1,) * (deltas[k].ndim - 1))
    noise = np.asarray(jax.random.normal(leaf_key, params[k].shape, np.float32))
    mean = (agg_sum(clipped) + z_delta * clip * noise) / F32(n)
    new_params[k] = params[k] + F32(h["server_lr"]) * mean
  count = agg_sum((norms <= clip).astype(F32)) + F32(h["count_stddev"]) * np.asarray(
      jax.random.normal(count_key, (), np.float32))
  new_clip = clip * np.exp(F32(-h["clip_lr"]) * (count / F32(n) - F32(h["quantile"])))
  return ({"params": new_params, "clip": {"clip_norm": new_clip.astype(F32)},
           "key": np.asarray(next_key)}, {"clip_norm": clip})


# name -> (the reference of the computation or of one round of ``next``, the reference initial
# state of the iterative process, None where the example has no process)
REFERENCES: dict[str, tuple[Callable, Callable | None]] = {
    "fedavg": (ref_fedavg_round, _mlp.init_params),
    "fedsgd": (ref_fedsgd_round, _mlp.init_params),
    "fedadam": (ref_fedadam_round, ref_fedadam_init),
    "fedyogi": (ref_fedyogi_round, ref_fedyogi_init),
    "analytics": (ref_analytics, None),
    "two_stage": (ref_two_stage, None),
    "dp_fedavg": (ref_dp_fedavg_round, ref_dp_fedavg_init),
    # DiLoCo, branch-train-merge, PAPA, char_lm: written in algorithm_references.py
    "diloco": (algo.ref_diloco_round, algo.ref_diloco_init),
    "branch_train_merge": (algo.ref_btm_round, algo.ref_btm_init),
    "papa": (algo.ref_papa_round, algo.ref_papa_init),
    "char_lm": (algo.ref_char_lm_round, _transformer.init_params),
}


def test_every_example_has_a_reference():
  assert set(REFERENCES) == set(EXAMPLES)
  for name in EXAMPLES:
    module = importlib.import_module(f"examples.{name}")
    assert hasattr(module, "process") == (REFERENCES[name][1] is not None), name


# -- the reference's outputs, keyed as run_on_runtime keys the runtime's ---------------------------
def _path(keys) -> list:
  return [k.key if isinstance(k, jax.tree_util.DictKey) else k.idx for k in keys]


def _named(block: dict, tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Reference leaves by the manifest's output names. The manifest lists outputs in leaf order with
  their paths into the output pytree; the reference's own paths must be the same, so an output
  cannot be compared with another one's reference."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert [_path(p) for p, _ in leaves] == [o["path"] for o in block["outputs"]]
  return {prefix + o["name"]: np.asarray(v) for o, (_, v) in zip(block["outputs"], leaves)}


def reference_trees(name: str, kind: str, args: tuple, rounds: int = ROUNDS,
                    **hyper: Any) -> list[tuple[str, str, Any]]:
  """(manifest block, output prefix, reference pytree) of the computation, or of the initial state
  and of each round of the process."""
  step, init = REFERENCES[name]
  if kind == "computation":
    return [("computation", "", step(*args, **hyper))]
  state = init()
  trees = [("initialize", "initialize/", state)]
  for r in range(1, rounds + 1):
    state, metrics = step(state, *args[1:], **hyper)
    trees.append(("next", f"round{r}/", (state, metrics)))
  return trees


def reference_outputs(name: str, kind: str, manifest: dict, args: tuple, rounds: int = ROUNDS,
                      **hyper: Any) -> dict[str, np.ndarray]:
  # The example's own reference is computed once per process; fewer rounds are its first ones.
  trees = (_example_reference(name, kind)[:rounds + 1] if rounds <= ROUNDS and not hyper and
           args is example_args(name) else reference_trees(name, kind, args, rounds, **hyper))
  return {k: v for block, prefix, tree in trees for k, v in _named(manifest[block], tree,
                                                                     prefix).items()}


@functools.cache
def example_args(name: str) -> tuple:
  """The example's inputs (``example_inputs()``), made once per process."""
  return tuple(importlib.import_module(f"examples.{name}").example_inputs())


@functools.cache
def _example_reference(name: str, kind: str) -> list[tuple[str, str, Any]]:
  # Each program is compared on four runtimes: its reference is computed once per process.
  return reference_trees(name, kind, example_args(name))


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, tuple]:
  """Per output ``(max_abs, max_rel, problem)``; ``problem`` is "" when it matches."""
  report = {}
  for key in sorted(set(ref) | set(got)):
    if key not in got or key not in ref:
      report[key] = (np.inf, np.inf, "missing from the runtime" if key not in got
                     else "not in the reference")
      continue
    a, b = np.asarray(ref[key]), np.asarray(got[key])
    if a.dtype != b.dtype or a.shape != b.shape:
      report[key] = (np.inf, np.inf, f"runtime {b.dtype}{list(b.shape)}, reference "
                                     f"{a.dtype}{list(a.shape)}")
      continue
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if a.dtype.kind in "fc":
      bound = ATOL + RTOL * np.abs(a.astype(np.float64))
      ok = bool(np.all(diff <= bound))  # a NaN anywhere fails: no example produces one
    else:
      ok = bool(np.array_equal(a, b))
    rel = diff / np.maximum(np.abs(a.astype(np.float64)), np.finfo(np.float32).tiny)
    report[key] = (float(diff.max(initial=0)), float(rel.max(initial=0)),
                   "" if ok else "exceeds tolerance" if a.dtype.kind in "fc" else "not equal")
  return report


def mismatches(report: dict[str, tuple]) -> dict[str, tuple]:
  return {k: v for k, v in report.items() if v[2]}


# -- exports (once per run: conftest's example_export) and runs --------------------------------------
def _inputs(manifest: dict, kind: str, name: str) -> dict[str, np.ndarray]:
  block = manifest["next" if kind == "process" else "computation"]
  args = example_args(name)
  return dict(zip([s["name"] for s in block["inputs"]],
                  jax.tree.leaves(args[1:] if kind == "process" else args), strict=True))


def _on_tff(example_export) -> dict[tuple[str, str], Any]:
  """Every program's TFF export run in ONE runner process (each start of TFF costs seconds): per
  (name, kind), (outputs, other result sets by label, info) or the error of that program alone.
  A one-stage ``next`` is also built into TFF's two deployment forms, whose rebuilt computations
  run the same rounds (as ``fb.verify`` on runtime tff does)."""
  from faxbridge.converters.runtimes.tff import ComputationJob, run_computations

  jobs = []
  for name, kind in _programs():
    out, _ = example_export(name, kind, "tff")
    manifest = json.loads((out / "manifest.json").read_text())
    process = kind == "process"
    jobs.append(ComputationJob(out, _inputs(manifest, kind, name), rounds=ROUNDS if process else None,
                               forms=process and manifest["next"]["stages"] == 1))
  results = {}
  for program, run in zip(_programs(), run_computations(jobs, strict=False)):
    if isinstance(run, Exception):
      results[program] = run
      continue
    extra = {f"{form} rebuilt": status.outputs for form, status in run.forms.items()
             if status.built and status.ran}
    info = {"context": run.context, **{f"{form}_form": (status.error or status.run_error or "ran")
                                       for form, status in run.forms.items()}}
    results[program] = (run.outputs, extra, info)
  return results


def _on_jax(example_export) -> dict[tuple[str, str], Any]:
  """Every program's StableHLO export on runtime jax's child, all in ONE fresh Python
  (jax_batch.py): per (name, kind), (outputs, {}, {}) or the error of that program alone."""
  jobs = []
  for name, kind in _programs():
    out, _ = example_export(name, kind, "stablehlo")
    manifest = json.loads((out / "manifest.json").read_text())
    jobs.append((out, _inputs(manifest, kind, name), ROUNDS if kind == "process" else 0))
  return {program: run if isinstance(run, Exception) else (run, {}, {})
          for program, run in zip(_programs(), run_on_jax(jobs))}


BATCHES = {"tff": _on_tff, "jax": _on_jax}


def _native(run_dir: Path, export: Path, manifest: dict, inputs: dict, kind: str) -> dict:
  """The export's native program (what ``fb.verify`` compares a runtime with) on the inputs, run
  once per run for every export holding the same native files (those of every target agree)."""
  digest = hashlib.sha256(b"".join(
      (export / rel).read_bytes() for rel in sorted(manifest["native"].values()))).hexdigest()
  rounds = ROUNDS if kind == "process" else 0
  path = made_once(run_dir, f"native-{digest[:24]}-{rounds}.npz", lambda p: jax_runner.save(
      p, native_outputs(export, manifest, inputs, rounds)))
  return jax_runner.load(path)


_RUNS: dict = {}  # made once per process; the tests of one program spread over the workers


@pytest.fixture
def run_example(example_export, run_dir):
  """``run_example(name, kind, runtime, batch=False)``: (manifest, args, runtime outputs by name,
  other result sets the runtime returned, native outputs (when called), info), made once per
  process. On TFF, and on jax with ``batch``, the first test runs every program at once (in
  BATCHES); the tests that read such a batch are one xdist group."""

  def get(name: str, kind: str, runtime: str, batch: bool = False):
    batch = (batch and runtime in BATCHES) or runtime == "tff"
    key = (name, kind, runtime, batch)
    if key not in _RUNS:
      out, _ = example_export(name, kind, TARGET_OF[runtime])
      manifest = json.loads((Path(out) / "manifest.json").read_text())
      inputs = _inputs(manifest, kind, name)
      if batch:
        if runtime not in _RUNS:
          _RUNS[runtime] = BATCHES[runtime](example_export)
        result = _RUNS[runtime][name, kind]
        if isinstance(result, Exception):
          raise result
        outputs, extra, info = result
      else:
        result = run_on_runtime(out, runtime, inputs, ROUNDS)
        outputs, extra, info = result.outputs, result.extra_outputs, result.info
      native = functools.cache(lambda: _native(run_dir, out, manifest, inputs, kind))
      _RUNS[key] = (manifest, example_args(name), outputs, extra, native, info)
    return _RUNS[key]

  return get


def check_against_reference(run_example, name: str, kind: str, runtime: str,
                            against_native: bool = True, batch: bool = False) -> None:
  """The run against the independent reference and (``against_native``) as ``fb.verify`` checks
  it, against the export's native program."""
  manifest, args, outputs, extra, native, info = run_example(name, kind, runtime, batch)
  ref = reference_outputs(name, kind, manifest, args)
  if kind == "process":  # every round of the process came back and was compared
    assert {k.split("/")[0] for k in ref} == {"initialize",
                                              *(f"round{r}" for r in range(1, ROUNDS + 1))}
  if runtime == "tff":
    # Secure sums run on TFF's test context (the native one rejects them); all else natively.
    assert info["context"] == ("test" if name == "analytics" else "native"), info
  if runtime == "tff" and kind == "process" and manifest["next"]["stages"] == 1:
    # A one-stage next(state, data) is what cross-device deployment takes: TFF must build both
    # deployment forms from it and run their rebuilds (a next with two CLIENTS arguments did not).
    assert {"mapreduce rebuilt", "distribute_aggregate rebuilt"} <= set(extra), info
  # Result sets besides the main one (TFF's MapReduceForm rebuild) must match the reference too.
  for label, got in {"": outputs, **extra}.items():
    report = compare(ref, got)
    bad = mismatches(report)
    # Shown with -s: the margins measured, for the record of each runtime's error.
    print(f"{name} {kind} on {runtime}{' [' + label + ']' if label else ''}: {len(report)} outputs,"
          f" max abs {max(v[0] for v in report.values()):.3g},"
          f" max rel {max(v[1] for v in report.values()):.3g}")
    assert not bad, (f"{name} {kind} on {runtime}{' [' + label + ']' if label else ''} differs "
                     f"from the independent reference (max_abs, max_rel, why): {bad}")
  if not against_native:
    return
  # fb.verify's check of the same run: every output of every round against the export's native
  # program, within verify's tolerance, and no float off by 1e-5 or more.
  checks = compare_all(native(), outputs)
  assert len(checks) == len(ref) and all(c.ok for c in checks), [c for c in checks if not c.ok]
  assert max(c.max_abs for c in checks) < 1e-5, max(c.max_abs for c in checks)
  for label, got in extra.items():
    assert all(c.ok for c in compare_all(native(), got)), label


def _programs() -> list[tuple[str, str]]:
  return [(name, kind) for name in EXAMPLES
          for kind in ("computation", *(("process",) if REFERENCES[name][1] else ()))]


# -- native: every program against its reference, without an export ---------------------------------
def _keyed(tree: Any) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def native_trees(name: str, kind: str, args: tuple, rounds: int = ROUNDS) -> list[tuple[str, str, Any]]:
  """``reference_trees``' blocks from faxbridge's own native run of the example."""
  module = importlib.import_module(f"examples.{name}")
  if kind == "computation":
    return [("computation", "", module.computation(*args))]
  state = module.process.initialize()
  trees = [("initialize", "initialize/", state)]
  for r in range(1, rounds + 1):
    state, metrics = module.process.next(state, *args[1:])
    trees.append(("next", f"round{r}/", (state, metrics)))
  return trees


# The quick suite runs FedAvg (a ragged client loop, a weighted mean by the real counts) and the
# cheap computations; the others take seconds each to compile (optimizers, DP noise, attention).
NATIVE_QUICK = {("fedavg", "process"), ("analytics", "computation"), ("two_stage", "computation")}


@pytest.mark.parametrize("name,kind", [
    pytest.param(n, k, id=f"{n}-{k}", marks=() if (n, k) in NATIVE_QUICK else pytest.mark.slow)
    for n, k in [(n, "process" if REFERENCES[n][1] else "computation") for n in EXAMPLES]])
def test_native_run_matches_the_reference(name, kind):
  """The example run natively (``fb.computation``'s own execution), every output of every round,
  against its independent reference: the reference's tolerance, dtypes and pytree paths."""
  args = example_args(name)
  want, got = reference_trees(name, kind, args), native_trees(name, kind, args)
  assert [b for b, *_ in want] == [b for b, *_ in got]
  for (_, prefix, ref), (_, _, out) in zip(want, got, strict=True):
    assert jax.tree.structure(ref) == jax.tree.structure(out), prefix
    bad = mismatches(compare(_keyed(ref), _keyed(out)))
    assert not bad, f"{name} {kind} {prefix or 'computation'}: {bad}"


# Every example but two_stage (values per client, no examples to loop over) holds real partitions.
EQUAL_SHAPES = {"two_stage"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_hold_real_partitions_read_only_through_fold(name):
  """Each example's client data is ragged (an ``fb.Ragged`` input whose counts differ) and its client
  work reads the examples only through ``fb.fold``: the check an export makes
  (``check_padding_unread``), so the exporters of ragged programs can take every example."""
  module = importlib.import_module(f"examples.{name}")
  args = example_args(name)
  ragged = [leaf for leaf in jax.tree.leaves(args, is_leaf=lambda x: isinstance(x, fb.Ragged))
            if isinstance(leaf, fb.Ragged)]
  assert bool(ragged) == (name not in EQUAL_SHAPES), name
  for data in ragged:
    assert len(set(np.asarray(data.count).tolist())) > 1, name  # sizes differ
  for program, program_args in ((module.computation, args),
                                *(((module.process, args[1:]),) if hasattr(module, "process") else ())):
    split = split_program(program, program_args)
    assert any(form.ragged_inputs for form in split.forms.values()) == bool(ragged), name
    check_padding_unread(split)


def test_native_fedavg_is_told_apart_from_wrong_references():
  """Not vacuous: a local learning rate 1% off, or clients weighted equally rather than by their
  real counts, fails the native comparison."""
  params, data = example_args("fedavg")
  got = _keyed(native_trees("fedavg", "process", (params, data), rounds=1)[1][2])
  wrong_lr = ref_fedavg_round(params, data, lr=FEDAVG_LR * 1.01)
  assert mismatches(compare(_keyed(wrong_lr), got))
  unweighted = ref_fedavg_round(params, data, weights=np.ones(len(data.count), F32))
  assert mismatches(compare(_keyed(unweighted), got))


# -- quick: one program on jax.export in a fresh process --------------------------------------------
# analytics has the integer, max and min aggregations the training examples lack (FedAdam's process,
# ~18 s here, is the slow suite's with every other program).
QUICK = [("analytics", "computation")]


@pytest.mark.xdist_group("examples-quick")
@pytest.mark.parametrize("name,kind", QUICK, ids=[f"{n}-{k}" for n, k in QUICK])
def test_quick_on_jax_runtime(run_example, name, kind):
  # The native comparison is the slow suite's (test_every_example_on_runtime, every program).
  check_against_reference(run_example, name, kind, "jax", against_native=False)


@pytest.mark.slow  # reads FedAdam's process run (~18 s)
@pytest.mark.xdist_group("examples-quick")
def test_a_wrong_reference_is_caught(run_example):
  """The comparison is not vacuous: references that are slightly wrong must fail it."""
  manifest, args, outputs, *_ = run_example("fedadam", "process", "jax")
  # A server learning rate 0.1% off changes the parameters from round 1 on.
  wrong_lr = reference_outputs("fedadam", "process", manifest, args,
                               server_lr=FEDADAM["server_lr"] * 1.001)
  bad = mismatches(compare(wrong_lr, outputs))
  assert any(k.startswith("round1/out_0_params") for k in bad), bad
  assert not any(k.startswith("initialize/") for k in bad)  # the initial state is still right
  # One round fewer: the last round is missing, and the reference's round r compared with the
  # runtime's round r + 1 fails everywhere (so the state fed back is checked, not only round 1).
  short = reference_outputs("fedadam", "process", manifest, args, rounds=ROUNDS - 1)
  last = {k for k in outputs if k.startswith(f"round{ROUNDS}/")}
  assert {k for k, v in mismatches(compare(short, outputs)).items()
          if v[2] == "not in the reference"} == last
  shifted = {}
  for key, value in short.items():
    stage, leaf = key.split("/")
    if stage != "initialize":
      shifted[f"round{int(stage[5:]) + 1}/{leaf}"] = value
  later = {k: v for k, v in outputs.items() if k in shifted}
  assert len(later) == len(shifted) == (ROUNDS - 1) * len(manifest["next"]["outputs"])
  # Every output fails, Adam's second moments too. They are squared pseudo-gradients times
  # 1 - b2, which stayed below the absolute tolerance (1e-6, under which any value of the right
  # sign passes) while every client took a few steps on equal shards; with each client's full
  # epoch over its own examples (update norms about 0.5) each leaf's largest is 5e-6 (b1) to
  # 4e-5 (w1) after round 1 and grows, so none hides under the tolerance.
  nu = {k for k in later if "_opt_0_nu_" in k}
  assert nu == {f"round{r}/out_0_opt_0_nu_{leaf}" for r in range(2, ROUNDS + 1)
                for leaf in ("b1", "b2", "w1", "w2")}
  assert all(np.abs(shifted[k]).max() > ATOL for k in nu), {
      k: float(np.abs(shifted[k]).max()) for k in nu}
  assert set(mismatches(compare(shifted, later))) == set(later)
  # Integer counts off by one and quantile levels moved a little: exact integers, not a tolerance.
  manifest, args, outputs, *_ = run_example("analytics", "computation", "jax")
  moved = reference_outputs("analytics", "computation", manifest, (args[0] + F32(0.01), args[1]))
  assert set(mismatches(compare(moved, outputs))) == {"out_quantiles"}
  off = dict(reference_outputs("analytics", "computation", manifest, args))
  off["out_histogram"] = off["out_histogram"] + (np.arange(len(off["out_histogram"])) == 7)
  assert off["out_histogram"].dtype == np.int32
  assert set(mismatches(compare(off, outputs))) == {"out_histogram"}
  off["out_histogram"] = (off["out_histogram"] - (np.arange(len(off["out_histogram"])) == 7)
                          ).astype(F32)  # right values, wrong dtype
  assert set(mismatches(compare(off, outputs))) == {"out_histogram"}


# -- slow: every program on TFF, IREE, LiteRT and jax -----------------------------------------------
def _runtime_cases() -> list:
  cases = []
  for runtime in ("tff", "iree", "litert", "jax"):
    # TFF's and jax's runs are one batch each (one process): its tests stay on one xdist worker.
    marks = [pytest.mark.xdist_group(f"examples-on-{runtime}")] if runtime in BATCHES else []
    cases += [pytest.param(name, kind, runtime, marks=marks, id=f"{name}-{kind}-{runtime}")
              for name, kind in _programs()]
  return cases


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,runtime", _runtime_cases())
def test_every_example_on_runtime(run_example, name, kind, runtime):
  check_against_reference(run_example, name, kind, runtime, batch=True)

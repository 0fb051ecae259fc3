"""The cost of skew: one FedAvg round over clients with their own numbers of examples (``fb.ragged``,
``fb.fold``) against the same round with every client at the mean size and the same total examples.

The round: the benchmark's MLP (``_fedavg_model.py``: 256-512-10), one local epoch of SGD over each
client's own batches of 16 (masked mean cross-entropy, so a partial last batch counts only its real
examples), FedAvg weighted by the real counts. Sizes (``sizes``): a long tail drawn once, with the
largest client at 10x the mean, a client of 1 example and an empty one; ``equal``: every client at
the mean. Both rounds are the same program (only the data differs), run by each strategy:

* ``("stream", 8)`` (``auto`` on CPU): clients sorted by their numbers of batches, blocks of 8,
  each block's loop run to its own largest count;
* ``vmap``: every client at once, each loop run to the largest count of all.

Modes, each run in its own process by ``run.py`` (one JSON object on the last stdout line):

  .venv/bin/python benchmarks/ragged_round.py time --clients 128 --repeats 5
  .venv/bin/python benchmarks/ragged_round.py memory --clients 128 --impl "stream skewed"
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _fedavg_model as model  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import faxbridge as fb  # noqa: E402

MEAN_EXAMPLES = 64  # per client: 4 batches of 16 at the mean
BATCH_SIZE = 16
SKEW = 10  # the largest client holds SKEW x the mean
STRATEGIES = {"stream": ("stream", 8), "vmap": "vmap"}


def sizes(clients: int, kind: str, seed: int = 0) -> list[int]:
  """Examples per client: ``equal`` (all at the mean) or ``skewed`` (a lognormal tail with the
  largest at exactly ``SKEW`` x the mean, the others at most half of it, one client of 1 example
  and one of 0 when there are at least 4 clients), both summing to ``clients * MEAN_EXAMPLES``."""
  total = clients * MEAN_EXAMPLES
  if kind == "equal":
    return [MEAN_EXAMPLES] * clients
  rng = np.random.default_rng(seed)
  top = SKEW * MEAN_EXAMPLES
  fixed = [top, 1] + ([0] if clients >= 4 else [])
  rest = clients - len(fixed)
  if rest < 1 or total - sum(fixed) < rest:
    raise ValueError(f"{clients} clients are too few for a {SKEW}x skew around the mean")
  w = np.sort(rng.lognormal(0.0, 1.0, rest))
  w = w / w.sum() * (total - sum(fixed))
  out = np.minimum(np.maximum(np.floor(w), 1), top // 2).astype(int)
  short, i = int(total - sum(fixed) - out.sum()), 0
  while short > 0:  # what rounding and the cap left over, one example each from the largest down
    j = rest - 1 - i % rest
    if out[j] < top // 2:
      out[j] += 1
      short -= 1
    i += 1
  got = [*fixed, *out.tolist()]
  assert sum(got) == total and max(got) == top, (sum(got), total, max(got))
  return got


def client_data(counts: list[int], seed: int = 1) -> fb.Ragged:
  rng = np.random.default_rng(seed)
  per_client = [{"x": rng.standard_normal((m, model.FEATURES), dtype=np.float32),
                 "y": rng.integers(0, model.CLASSES, m, dtype=np.int32)} for m in counts]
  return fb.ragged(per_client, batch_size=BATCH_SIZE)


def masked_loss(params, x, y, mask):
  """Mean cross-entropy over the batch's real examples."""
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  logp = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
  nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def client_update(params, data: fb.Ragged):
  def step(w, batch, mask):
    grads = jax.grad(masked_loss)(w, batch["x"], batch["y"], mask)
    return jax.tree.map(lambda a, g: a - model.LR * g, w, grads)

  trained = fb.fold(step, params, data)
  return jax.tree.map(jnp.subtract, trained, params)


def faxbridge_round(strategy) -> fb.Computation:
  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS), strategy=strategy)
  def ragged_round(params, data):
    deltas = fb.map(client_update, fb.broadcast(params), data)
    return jax.tree.map(jnp.add, params, fb.weighted_mean(deltas, data.count))

  return ragged_round


_reference_grad = jax.jit(jax.grad(masked_loss))  # one batch's gradient, compiled per batch shape


def reference_round(params, counts: list[int], data: fb.Ragged) -> dict[str, np.ndarray]:
  """The round one client at a time over its own examples, in Python loops (no faxbridge)."""
  x, y = np.asarray(data.examples["x"]), np.asarray(data.examples["y"])
  total = {k: np.zeros_like(v) for k, v in params.items()}
  for i, m in enumerate(counts):
    w = dict(params)
    for start in range(0, m, BATCH_SIZE):
      stop = min(start + BATCH_SIZE, m)
      # The batch's real examples, zero-filled to one shape (one compiled gradient) and masked.
      xb, yb = np.zeros((BATCH_SIZE, x.shape[2]), x.dtype), np.zeros(BATCH_SIZE, y.dtype)
      xb[: stop - start], yb[: stop - start] = x[i, start:stop], y[i, start:stop]
      grads = _reference_grad(w, xb, yb, np.arange(BATCH_SIZE) < stop - start)
      w = {k: np.asarray(w[k] - model.LR * grads[k]) for k in w}
    for k in w:
      total[k] += m * (w[k] - params[k])
  return {k: params[k] + total[k] / sum(counts) for k in params}


def impls() -> dict[str, tuple[Callable[[], fb.Computation], str]]:
  """Row name -> (builder, which sizes)."""
  return {f"{s} {kind}": (lambda s=s: faxbridge_round(STRATEGIES[s]), kind)
          for s in STRATEGIES for kind in ("skewed", "equal")}


def _inputs(clients: int, kind: str):
  # On the device once, as rounds read them: a numpy input would be copied in on every call, and the
  # padded skewed data (n x the largest client) is 10x the equal-size data's.
  counts = sizes(clients, kind)
  return counts, jax.device_put(model.init_params()), jax.device_put(client_data(counts))


def _batch_steps(counts: list[int]) -> int:
  return sum(-(-m // BATCH_SIZE) for m in counts)


def time_mode(clients: int, names: list[str], repeats: int, budget_s: float) -> dict:
  """Compile each, then per strategy ``repeats`` round-robin passes over its rows (fewer when its
  share of ``budget_s`` runs out)."""
  table = impls()
  fns, args, compile_s, info = {}, {}, {}, {}
  for name in names:
    build, kind = table[name]
    counts, params, data = _inputs(clients, kind)
    fn = build()
    start = time.perf_counter()
    jax.block_until_ready(fn(params, data))
    compile_s[name] = time.perf_counter() - start
    fns[name], args[name] = fn, (params, data)
    info[name] = {"examples": sum(counts), "largest": max(counts), "batch_steps":
                  _batch_steps(counts), "padded_length": int(data.examples["x"].shape[1])}
  times: dict[str, list[float]] = {n: [] for n in names}
  # Interleaved within a strategy (skewed, equal, skewed, ...): the ratio compares rounds run under
  # the same load; a strategy's rows are not interleaved with the other's much longer rounds.
  for strategy in STRATEGIES:
    rows = [n for n in names if n.split()[0] == strategy]
    start_all = time.perf_counter()
    for r in range(repeats):
      for name in rows:
        start = time.perf_counter()
        jax.block_until_ready(fns[name](*args[name]))
        times[name].append(time.perf_counter() - start)
      if r >= 2 and time.perf_counter() - start_all > budget_s / len(STRATEGIES):
        break
  return {"clients": clients, "times_s": times, "first_call_s": compile_s, "info": info}


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def memory_mode(clients: int, name: str) -> dict:
  """``ru_maxrss`` before and after a round (the inputs, padded, are in the baseline), and the
  round's temporaries as XLA allocates them (``temp_mb``: what grows with the clients if anything
  does, without the inputs and without the noise of the process's high-water mark)."""
  build, kind = impls()[name]
  _, params, data = _inputs(clients, kind)
  jax.block_until_ready(data)
  baseline = _maxrss_mb()
  fn = build()
  jax.block_until_ready(fn(params, data))
  peak = _maxrss_mb()
  temp = jax.jit(fn).lower(params, data).compile().memory_analysis().temp_size_in_bytes
  return {"clients": clients, "impl": name, "baseline_mb": baseline, "peak_mb": peak,
          "delta_mb": peak - baseline, "temp_mb": temp / 2**20}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=["time", "memory", "list"])
  parser.add_argument("--clients", type=int, default=128)
  parser.add_argument("--impl", action="append", help="a row (repeatable; default all)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=60.0)
  ns = parser.parse_args(argv)
  names = ns.impl or list(impls())
  if ns.mode == "list":
    out: dict = {"impls": names}
  elif ns.mode == "time":
    out = time_mode(ns.clients, names, ns.repeats, ns.budget_s)
  else:
    out = memory_mode(ns.clients, names[0])
  print(json.dumps(out))


if __name__ == "__main__":
  main()

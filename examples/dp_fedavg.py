"""DP-FedAvg with adaptive clipping on scikit-learn's digits: each round a random sample of the
clients trains locally; the server averages their updates with ``fb.dp_adaptive_mean`` (each
client's whole update clipped to the adaptive clip norm, Gaussian noise on the sum, the clip norm
moved towards the median update norm) and accounts for the privacy spent with ``fb.dp_epsilon``.

The guarantee is user-level (client-level) (epsilon, delta)-DP for the released models: the sampled
Gaussian mechanism of noise multiplier ``NOISE_MULTIPLIER`` run ``rounds`` times with sampling rate
``CLIENTS_PER_ROUND / TOTAL_CLIENTS``. The sample here is of fixed size (the computation's shapes
are static) while the accountant assumes Poisson sampling with that rate: the usual approximation
(as in McMahan et al. 2018). At this scale (200 clients) epsilon is large; DP-FedAvg needs many
clients per round to make the noise small next to the signal.

Clients hold their real partitions (1 to 16 digits each, Dirichlet(1.0)): a client's local epoch
runs over its own batches (``fb.fold``), so its number of local steps is its own; the clipping
bounds each client's contribution whatever it did. Every round's sample is padded to the largest
client's count over all 200 (16, two batches of 8), so every round has one signature.

Run ``python -m examples.dp_fedavg`` for held-out accuracy and epsilon per round.

The PRNG key is server state, split each round: one half for this round's noise, one carried on. An
export computes the noise from it on the server, so every runtime replays the same noise.
"""

from __future__ import annotations

import jax
import numpy as np

import faxbridge as fb

from . import _cli, _data, _mlp

TOTAL_CLIENTS = 200  # digits' 1,437 training examples over 200 clients (Dirichlet label skew)
CLIENTS_PER_ROUND = 50
ROUNDS = 40
NOISE_MULTIPLIER = 1.0  # z: the update sum and the clipped count together (Andrew et al.)
CLIPPED_COUNT_STDDEV = CLIENTS_PER_ROUND / 20  # sigma_b, the paper's choice
TARGET_QUANTILE, CLIP_LEARNING_RATE, INITIAL_CLIP = 0.5, 0.2, 0.5
DELTA = 1e-3  # < 1 / TOTAL_CLIENTS
LOCAL_LR, SERVER_LR = 0.5, 1.0
BATCH_SIZE = 8
SEED = 0


def client_update(params: dict, data: fb.Ragged) -> dict:
  """Local SGD over the client's own batches; the update (trained - initial) is what is clipped."""
  trained, _ = _mlp.sgd_epoch(params, data, LOCAL_LR)
  return jax.tree.map(lambda new, old: new - old, trained, params)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def dp_fedavg_round(state, data):
  """One round: ``state = {params, clip, key}`` and the sampled clients' data to the new state and
  the round's clip norm. Unweighted: a client's weight may not depend on its data under DP."""
  deltas = fb.map(client_update, fb.broadcast(state["params"]), data)
  keys = jax.random.split(state["key"])
  mean_delta, clip = fb.dp_adaptive_mean(
      deltas, state["clip"], key=keys[0], noise_multiplier=NOISE_MULTIPLIER,
      target_quantile=TARGET_QUANTILE, clip_learning_rate=CLIP_LEARNING_RATE,
      clipped_count_stddev=CLIPPED_COUNT_STDDEV)
  params = jax.tree.map(lambda p, d: p + SERVER_LR * d, state["params"], mean_delta)
  return {"params": params, "clip": clip, "key": keys[1]}, {"clip_norm": state["clip"]["clip_norm"]}


def init_state() -> dict:
  return {"params": _mlp.init_params(SEED), "clip": fb.dp_adaptive_init(INITIAL_CLIP),
          "key": np.asarray([0, SEED], np.uint32)}


@fb.computation()
def initialize():
  return init_state()


computation = dp_fedavg_round
process = fb.IterativeProcess(initialize, dp_fedavg_round)


def epsilon(rounds: int) -> float:
  """(epsilon at DELTA) after ``rounds`` rounds, RDP accountant of dp-accounting."""
  return fb.dp_epsilon(noise_multiplier=NOISE_MULTIPLIER,
                       sampling_rate=CLIENTS_PER_ROUND / TOTAL_CLIENTS, rounds=rounds, delta=DELTA)


def _split():
  train_x, train_y, test_x, test_y = _data.load_digits_split(SEED)
  parts = _data.partition(train_y, TOTAL_CLIENTS, alpha=1.0, seed=SEED)
  return train_x, train_y, parts, (test_x, test_y)


def _sample(round_: int, train_x, train_y, parts) -> fb.Ragged:
  """This round's clients (a seeded sample of CLIENTS_PER_ROUND, without replacement) with their
  own examples, padded to the largest client's count of all (one signature for every round). The
  counts bound each client's loop only: the round does not weight by them."""
  rng = np.random.default_rng(SEED * 1000 + round_)
  chosen = rng.choice(len(parts), size=CLIENTS_PER_ROUND, replace=False)
  return _data.client_examples(train_x, train_y, [parts[i] for i in chosen], batch_size=BATCH_SIZE,
                               length=max(len(p) for p in parts), seed=SEED * 1000 + round_)


def train(rounds: int = ROUNDS, log=print) -> list[dict]:
  """Run natively; per round (0: the initial model) held-out accuracy, clip norm and epsilon."""
  train_x, train_y, parts, (test_x, test_y) = _split()
  state = process.initialize()
  history = []
  for r in range(rounds + 1):
    if r:
      state, _ = process.next(state, _sample(r, train_x, train_y, parts))
    metrics = {k: float(v) for k, v in _mlp.evaluate(state["params"], test_x, test_y).items()}
    row = {"round": r, **metrics, "clip_norm": float(state["clip"]["clip_norm"]),
           "epsilon": epsilon(r) if r else 0.0}
    history.append(row)
    if log:
      log(f"round {r:2d}: held-out accuracy {row['accuracy']:.3f} (loss {row['loss']:.3f}), "
          f"clip norm {row['clip_norm']:.3f}, epsilon {row['epsilon']:.2f} at delta {DELTA:g}")
  return history


def example_inputs(clients: int = CLIENTS_PER_ROUND):
  """The initial state and round 1's sample (its first ``clients``): 50 clients holding 2 to 15
  digits, padded to 16."""
  train_x, train_y, parts, _ = _split()
  data = _sample(1, train_x, train_y, parts)
  return init_state(), jax.tree.map(lambda v: v[:clients], data)


if __name__ == "__main__":
  _cli.run(train)

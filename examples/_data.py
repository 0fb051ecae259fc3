"""Real data for the examples, shipped inside installed packages (no download), and its partition
over clients.

Digits: scikit-learn's 1,797 8x8 handwritten digits (``sklearn.datasets.load_digits``, a file inside
the package). Pixels are scaled from 0..16 to [0, 1] as float32 (64 features), labels are int32.

The API, smallest first:

- ``load_digits_split(seed)``: a seeded held-out split, ``(train_x, train_y, test_x, test_y)``.
- ``partition(labels, clients, alpha=, seed=)``: a seeded Dirichlet label-skew partition (non-IID)
  of example indices over clients; disjoint, covering every index, no client empty.
- ``client_examples(x, y, parts, batch_size=, length=, seed=)``: each client's own examples, all of
  them and each once, as an ``fb.Ragged`` (a CLIENTS input; ``count`` = the client's examples).
- ``example_clients(clients, batch_size=, alpha=, length=, seed=)``: the three above in one call
  (the exported examples' inputs).

Real partitions: client ``i`` holds exactly the examples ``parts[i]`` (no repetition, no
subsample), so clients hold from a handful to hundreds of examples. ``fb.ragged`` pads them to one
length ``L`` and keeps each count; a client's loop (``fb.fold``) runs over its own
``ceil(count / batch_size)`` batches, with the mask of the real examples of its last one, and the
count is the FedAvg weight n_k. Drawing again with another ``seed`` (say, the round number) shows a
client its examples in another order.

``EXAMPLE_*``: the sizes of the exported examples' inputs (``example_inputs()``): 8 clients at
``alpha = 0.05`` (split seed 0) hold 1, 3, 22, 57, 156, 251, 386 and 562 examples, padded to
``EXAMPLE_LENGTH = 576`` (36 batches of 16, 72 of 8).
"""

from __future__ import annotations

import numpy as np

import faxbridge as fb

# -- digits ----------------------------------------------------------------------------------------
FEATURES, CLASSES = 64, 10
TEST_FRACTION = 0.2
EXAMPLE_CLIENTS, EXAMPLE_ALPHA, EXAMPLE_LENGTH = 8, 0.05, 576


def load_digits_split(seed: int = 0, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, ...]:
  """scikit-learn's digits as ``(train_x [N, 64] f32 in [0, 1], train_y [N] i32, test_x, test_y)``.

  The held-out ``test_fraction`` is a seeded random permutation's head; the rest is the train part.
  """
  from sklearn.datasets import load_digits  # imported here: only the examples need scikit-learn

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = round(test_fraction * len(y))
  test, train = order[:n_test], order[n_test:]
  return x[train], y[train], x[test], y[test]


def partition(labels: np.ndarray, clients: int, *, alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
  """Split example indices over ``clients`` with a Dirichlet(alpha) label skew.

  For each class c, proportions p_c ~ Dirichlet(alpha * 1_clients) split c's shuffled examples
  among the clients; a small ``alpha`` concentrates each class on few clients (non-IID), a large one
  approaches an even split. A client left empty then takes one example from the largest client, so
  every client has at least one. The result is disjoint, covers ``range(len(labels))`` and depends
  only on (labels, clients, alpha, seed). Each client's indices are sorted.
  """
  labels = np.asarray(labels)
  if clients < 1 or clients > len(labels):
    raise ValueError(f"clients must be in 1..{len(labels)} (one example each at least), got {clients}")
  if alpha <= 0:
    raise ValueError(f"alpha must be positive, got {alpha}")
  rng = np.random.default_rng(seed)
  parts: list[list[int]] = [[] for _ in range(clients)]
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    shares = rng.dirichlet(np.full(clients, alpha))
    cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
    for i, chunk in enumerate(np.split(members, cuts)):
      parts[i].extend(chunk.tolist())
  for i in range(clients):  # deterministic repair: the largest client gives one example away
    if not parts[i]:
      donor = max(range(clients), key=lambda j: len(parts[j]))
      parts[i].append(parts[donor].pop())
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def client_examples(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], *,
                    batch_size: int, length: int | None = None, seed: int = 0) -> fb.Ragged:
  """Each client's own examples as an ``fb.Ragged`` (examples ``{"x": [n, L, 64], "y": [n, L]}``,
  ``count`` int32 [n] = ``len(parts[i])``, batches of ``batch_size``).

  Client i's real rows are ``x[parts[i]]`` and ``y[parts[i]]``, every one once, in a seeded random
  order (the order its SGD sees them in). ``L`` is ``length`` (rounded up to whole batches), or the
  largest client's count where that is more (or ``length`` is None).
  """
  rng = np.random.default_rng(seed)
  x, y = np.asarray(x), np.asarray(y)
  own = []
  for part in parts:
    order = rng.permutation(np.asarray(part))
    own.append({"x": x[order], "y": y[order]})
  largest = max(len(p) for p in parts)
  return fb.ragged(own, batch_size=batch_size,
                   max_length=None if length is None else max(length, largest))


def example_clients(clients: int = EXAMPLE_CLIENTS, *, batch_size: int, alpha: float = EXAMPLE_ALPHA,
                    length: int | None = EXAMPLE_LENGTH, seed: int = 0) -> fb.Ragged:
  """The exported examples' client data: the digits train split (seed ``seed``) over ``clients``
  at ``alpha``, in batches of ``batch_size``, padded to ``length`` (to the largest client where
  another number of clients gives a larger one)."""
  train_x, train_y, _, _ = load_digits_split(seed)
  parts = partition(train_y, clients, alpha=alpha, seed=seed)
  return client_examples(train_x, train_y, parts, batch_size=batch_size, length=length, seed=seed)


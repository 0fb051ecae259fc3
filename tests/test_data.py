"""examples/_data.py: the digits split, the Dirichlet label-skew partition and each client's own
examples (an fb.Ragged: every example once, no repetition or subsample)."""

from __future__ import annotations

import numpy as np
import pytest

import faxbridge as fb
from examples import _data


@pytest.fixture(scope="module")
def split():
  return _data.load_digits_split(seed=0)


def test_split_is_seeded_held_out_and_scaled(split):
  train_x, train_y, test_x, test_y = split
  assert train_x.shape == (1797 - 359, 64) and test_x.shape == (359, 64)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert train_x.min() >= 0.0 and train_x.max() == 1.0
  # Disjoint: no test image also in the train part (digits has no exact duplicates across the split
  # at this seed, checked on rows as bytes), and a different seed gives a different split.
  train_rows = {r.tobytes() + bytes([lab]) for r, lab in zip(train_x, train_y)}
  assert not any(r.tobytes() + bytes([lab]) in train_rows for r, lab in zip(test_x, test_y))
  assert np.array_equal(_data.load_digits_split(seed=0)[3], test_y)
  assert not np.array_equal(_data.load_digits_split(seed=1)[3], test_y)


@pytest.mark.parametrize("clients,alpha", [(8, 0.5), (20, 0.05), (3, 100.0)])
def test_partition_is_disjoint_covering_nonempty_and_deterministic(split, clients, alpha):
  labels = split[1]
  parts = _data.partition(labels, clients, alpha=alpha, seed=3)
  assert len(parts) == clients and all(len(p) >= 1 for p in parts)
  every = np.concatenate(parts)
  assert len(every) == len(labels) and np.array_equal(np.sort(every), np.arange(len(labels)))
  again = _data.partition(labels, clients, alpha=alpha, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  other = _data.partition(labels, clients, alpha=alpha, seed=4)
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
  """Mean total-variation distance between a client's label histogram and the global one."""
  overall = np.bincount(labels, minlength=10) / len(labels)
  return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum()
                        for p in parts]))


def test_skew_grows_as_alpha_falls(split):
  labels = split[1]
  skews = [np.mean([_skew(labels, _data.partition(labels, 10, alpha=a, seed=s)) for s in range(5)])
           for a in (100.0, 1.0, 0.1)]
  assert skews[0] < 0.1 < skews[1] < skews[2], skews  # near IID at alpha=100, far from it at 0.1
  assert skews[2] > 0.5, skews


def test_client_examples_are_each_clients_own_examples_once(split):
  """Real partitions: client i's real rows are exactly ``parts[i]`` (each example once, none of
  another client's, none repeated or left out), the counts are the parts' sizes, and the padding
  is zeros up to the fixed length."""
  train_x, train_y = split[0], split[1]
  parts = _data.partition(train_y, 6, alpha=0.1, seed=0)
  data = _data.client_examples(train_x, train_y, parts, batch_size=16, length=600, seed=1)
  assert isinstance(data, fb.Ragged) and data.batch_size == 16
  assert data.examples["x"].shape == (6, 608, 64) and data.examples["y"].shape == (6, 608)
  assert data.examples["x"].dtype == np.float32 and data.examples["y"].dtype == np.int32
  assert data.count.dtype == np.int32 and data.count.tolist() == [len(p) for p in parts]
  row = {train_x[j].tobytes(): j for j in range(len(train_y))}  # digits' rows are distinct
  seen = []
  for i, part in enumerate(parts):
    m = len(part)
    own = [row[r.tobytes()] for r in data.examples["x"][i, :m]]
    assert sorted(own) == part.tolist()  # all of its own examples, each once
    np.testing.assert_array_equal(data.examples["y"][i, :m], train_y[own])
    assert not data.examples["x"][i, m:].any() and not data.examples["y"][i, m:].any()
    seen += own
  assert sorted(seen) == list(range(len(train_y)))  # the clients together: every example once
  # Another seed: the same examples in another order (what a new round's SGD sees).
  again = _data.client_examples(train_x, train_y, parts, batch_size=16, seed=2)
  largest = max(len(p) for p in parts)  # without a length: the largest client, in whole batches
  assert again.examples["x"].shape[1] == -(-largest // 16) * 16
  np.testing.assert_array_equal(again.count, data.count)
  assert not np.array_equal(again.examples["y"][:, :10], data.examples["y"][:, :10])


def test_example_clients_sizes_vary_from_a_handful_to_hundreds(split):
  data = _data.example_clients(batch_size=16)
  counts = sorted(data.count.tolist())
  assert len(counts) == _data.EXAMPLE_CLIENTS and sum(counts) == len(split[1])
  assert counts[0] <= 5 and counts[-1] >= 300, counts
  assert data.examples["x"].shape[1] == _data.EXAMPLE_LENGTH  # the documented padded length
  # Fewer clients hold more each: the length grows to the largest client rather than failing.
  assert _data.example_clients(2, batch_size=16).examples["x"].shape[1] >= _data.EXAMPLE_LENGTH

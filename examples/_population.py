"""Several models trained side by side by disjoint client groups, shared by branch-train-merge
and PAPA: the group assignment, one round of group-wise local training, and a simulation loop.

The models are stacked on a leading axis of size ``K`` (one SERVER pytree). Every client gets all
``K`` (the broadcast), picks its group's model with the one-hot ``group`` row of its client data
(next to ``digits``, its own examples: an ``fb.Ragged``), trains it one epoch over its own batches
(``_mlp.sgd_epoch``), and uploads its update in its group's slot (zeros elsewhere), weighted by its
real example count n_i:

  ``m_k <- m_k + sum_i g_ik n_i (trained_i - m_k) / sum_i g_ik n_i``

so each model is FedAvg'd over its own group only. Hiding the group from the server costs ``K``
models down and up per client per round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

from . import _data, _mlp


def stack(models: list[dict]) -> dict:
  """``K`` models to one pytree with a leading models axis."""
  return jax.tree.map(lambda *leaves: np.stack(leaves), *models)


def groups_by_label(mean_labels: np.ndarray, groups: int) -> np.ndarray:
  """One-hot groups float32 [clients, groups]: clients ranked by their mean label and cut into
  ``groups`` contiguous blocks, so a group holds clients with similar labels (a data domain)."""
  order = np.argsort(np.asarray(mean_labels), kind="stable")
  group = np.empty(len(order), np.int64)
  for k, block in enumerate(np.array_split(order, groups)):
    group[block] = k
  return np.eye(groups, dtype=np.float32)[group]


def _local(models: dict, data: dict, lr: float):
  """One client: train its group's model with SGD over its own examples; its weighted update in
  its group's slot, the weights ``group * n_i`` and its epoch's training loss."""
  group = data["group"]
  select = lambda m: jnp.tensordot(group, m, axes=1)  # exact: the other rows are multiplied by 0
  start = jax.tree.map(select, models)
  trained, loss = _mlp.sgd_epoch(start, data["digits"], lr)
  weight = group * data["digits"].count.astype(jnp.float32)  # [K]: n_i in the client's slot
  slotted = jax.tree.map(lambda new, old: jnp.tensordot(weight, new - old, axes=0), trained, start)
  return slotted, weight, loss


def train_groups(models: dict, data: Any, lr: float) -> tuple[dict, jax.Array, Any]:
  """Inside an ``fb.computation``: each of the ``K`` stacked models trained one local SGD epoch
  by its group (formula above; the group is ``data["group"]``, one-hot [K] per client, the
  examples ``data["digits"]``). Returns the new models, the examples per group
  ``sum_i g_ik n_i`` [K] (SERVER) and the clients' training loss per example."""
  slotted, weights, losses = fb.map(lambda m, d: _local(m, d, lr), fb.broadcast(models), data)
  per_group = fb.sum(weights)
  total = fb.sum(slotted)
  scale = lambda t: t / per_group.reshape(per_group.shape + (1,) * (t.ndim - 1))
  loss = fb.weighted_mean(losses, data["digits"].count)
  return jax.tree.map(lambda m, t: m + scale(t), models, total), per_group, loss


def client_data(clients: int, groups: int, *, batch_size: int) -> dict:
  """One round of digits client data (``_data.example_clients``: 8 clients holding 1 to 562
  examples, padded to 576) with each client's one-hot ``group`` row (clients grouped by mean
  label): the exported programs' example inputs."""
  train_x, train_y, _, _ = _data.load_digits_split(0)
  parts = _data.partition(train_y, clients, alpha=_data.EXAMPLE_ALPHA, seed=0)
  digits = _data.client_examples(train_x, train_y, parts, batch_size=batch_size,
                                 length=_data.EXAMPLE_LENGTH, seed=0)
  return {"digits": digits, "group": groups_by_label([np.mean(train_y[p]) for p in parts], groups)}


def simulate(process: Any, groups: int, *, rounds: int, clients: int, batch_size: int,
             models_of: Callable[[Any, np.ndarray], dict[str, dict]],
             alpha: float = 0.5, seed: int = 0, log: Callable[[str], None] | None = print
             ) -> list[dict]:
  """Run ``process`` (``next(state, data)``, ``data["group"]`` one-hot per client) natively for
  ``rounds`` rounds on digits split over ``clients`` (fixed partition and groups; each round
  every client one epoch over its own examples in a fresh order) and evaluate the named models
  ``models_of(state, examples_per_group)`` on the held-out digits, from round 0 (the initial
  state) on.

  Returns per round ``{"round", "loss", "accuracy", "models": {name: {"loss", "accuracy"}}}``; the
  top-level loss and accuracy are those of the last model named, the one the algorithm delivers.
  """
  train_x, train_y, test_x, test_y = _data.load_digits_split(seed)
  parts = _data.partition(train_y, clients, alpha=alpha, seed=seed)
  group = groups_by_label(np.stack([np.mean(train_y[p]) for p in parts]), groups)
  examples = group.T @ np.asarray([len(p) for p in parts], np.float32)
  state, history = process.initialize(), []
  for r in range(rounds + 1):
    if r:
      digits = _data.client_examples(train_x, train_y, parts, batch_size=batch_size,
                                     seed=seed * 1000 + r)
      state, _ = process.next(state, {"digits": digits, "group": group})
    scores = {name: {k: float(v) for k, v in _mlp.evaluate(p, test_x, test_y).items()}
              for name, p in models_of(state, examples).items()}
    history.append({"round": r, **list(scores.values())[-1], "models": scores})
    if log:
      log(f"round {r:2d}: " + ", ".join(f"{name} loss {s['loss']:.3f} acc {s['accuracy']:.3f}"
                                         for name, s in scores.items()))
  return history

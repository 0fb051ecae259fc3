"""Several models trained side by side by disjoint client groups, shared by branch-train-merge
and PAPA: the group assignment, one round of group-wise local training, and a simulation loop.

The models are stacked on a leading axis of size ``K`` (one SERVER pytree). Every client gets all
``K`` (the broadcast), picks its group's model with the one-hot ``group`` row of its client data
(next to ``x``, ``y``, ``num_examples``), trains it, and uploads its update in its group's slot
(zeros elsewhere), weighted by its example count:

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


def groups_by_label(y: np.ndarray, groups: int) -> np.ndarray:
  """One-hot groups float32 [clients, groups]: clients ranked by their mean label and cut into
  ``groups`` contiguous blocks, so a group holds clients with similar labels (a data domain)."""
  order = np.argsort(np.mean(np.asarray(y).reshape(len(y), -1), axis=1), kind="stable")
  group = np.empty(len(y), np.int64)
  for k, block in enumerate(np.array_split(order, groups)):
    group[block] = k
  return np.eye(groups, dtype=np.float32)[group]


def _local(models: dict, data: dict, lr: float):
  """One client: train its group's model with SGD; its weighted update in its group's slot."""
  group = data["group"]
  select = lambda m: jnp.tensordot(group, m, axes=1)  # exact: the other rows are multiplied by 0
  start = jax.tree.map(select, models)
  batches = {"x": data["x"], "y": data["y"]}
  trained = _mlp.sgd_batches(start, batches, lr)
  weight = group * data["num_examples"]  # [K]: n_i in the client's slot
  slotted = jax.tree.map(lambda new, old: jnp.tensordot(weight, new - old, axes=0), trained, start)
  return slotted, weight, _mlp.loss(trained, jax.tree.map(lambda b: b[-1], batches))


def train_groups(models: dict, data: Any, lr: float) -> tuple[dict, jax.Array, Any]:
  """Inside an ``fb.computation``: each of the ``K`` stacked models trained one local SGD epoch
  by its group (formula above; the group is ``data["group"]``, one-hot [K] per client). Returns
  the new models, the examples per group ``sum_i g_ik n_i`` [K] (SERVER) and the clients' mean
  last-batch loss."""
  slotted, weights, losses = fb.map(lambda m, d: _local(m, d, lr), fb.broadcast(models), data)
  per_group = fb.sum(weights)
  total = fb.sum(slotted)
  scale = lambda t: t / per_group.reshape(per_group.shape + (1,) * (t.ndim - 1))
  return jax.tree.map(lambda m, t: m + scale(t), models, total), per_group, fb.mean(losses)


def client_data(clients: int, groups: int, *, batches: int, batch_size: int) -> dict:
  """One round of digits client data (Dirichlet label skew, seed 1) with each client's one-hot
  ``group`` row (clients grouped by mean label): the exported programs' example inputs."""
  data, _ = _data.digits_clients(clients, batches=batches, batch_size=batch_size, seed=1)
  return {**data, "group": groups_by_label(data["y"], groups)}


def simulate(process: Any, groups: int, *, rounds: int, clients: int, batches: int,
             batch_size: int, models_of: Callable[[Any, np.ndarray], dict[str, dict]],
             alpha: float = 0.5, seed: int = 0, log: Callable[[str], None] | None = print
             ) -> list[dict]:
  """Run ``process`` (``next(state, data)``, ``data["group"]`` one-hot per client) natively for
  ``rounds`` rounds on digits split over ``clients`` (fixed partition and groups, fresh batches
  each round) and evaluate the named models ``models_of(state, examples_per_group)`` on the
  held-out digits, from round 0 (the initial state) on.

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
      data = _data.client_batches(train_x, train_y, parts, batches=batches,
                                  batch_size=batch_size, seed=seed * 1000 + r)
      state, _ = process.next(state, {**data, "group": group})
    scores = {name: {k: float(v) for k, v in _mlp.evaluate(p, test_x, test_y).items()}
              for name, p in models_of(state, examples).items()}
    history.append({"round": r, **list(scores.values())[-1], "models": scores})
    if log:
      log(f"round {r:2d}: " + ", ".join(f"{name} loss {s['loss']:.3f} acc {s['accuracy']:.3f}"
                                         for name, s in scores.items()))
  return history

"""DiLoCo, branch-train-merge, PAPA and the char-LM FedAvg written without faxbridge: a Python
loop over clients, a Python loop over each client's own batches (its real examples only, read as
``examples[i, :count[i]]`` and cut by slicing, the last batch shorter: the padding of an
``fb.Ragged`` never enters), the aggregations as explicit numpy sums over clients, and the server
steps written out by hand (DiLoCo's Nesterov step in numpy, not optax). The digits MLP's loss and
gradient are numpy too (``mlp_value_and_grad``, the backward pass written out); only the
transformer's ``_transformer.loss`` is shared (itself checked against numpy in
``test_examples_algorithms.py``), and optax's AdamW update for DiLoCo's inner steps.

Each ``ref_*_round(state, *client_args)`` returns ``(new_state, metrics)`` with the example's
pytree structure; each ``ref_*_init()`` the initial state. Hyperparameters are restated here, not
imported, so a wrong edit in an example is caught.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from examples import _mlp, _transformer

F32 = np.float32
DILOCO = {"inner_lr": 0.01, "weight_decay": 1e-4, "outer_lr": 0.7, "momentum": 0.9}
BTM = {"branches": 2, "lr": 0.5}
PAPA = {"members": 3, "lr": 0.5, "every": 2, "pull": 0.5}
CHAR_LM_LR = 0.3

_lm_grad = jax.jit(jax.value_and_grad(_transformer.loss))


def mlp_value_and_grad(params: dict, batch: dict) -> tuple[np.float32, dict]:
  """The digits MLP's mean cross-entropy on ``batch`` and its gradient, in float32 numpy with the
  backward pass written out (no JAX: a batch of any size costs no compile):
  ``h = tanh(x w1 + b1)``, ``z = h w2 + b2``, ``loss = mean_j(logsumexp(z_j) - z_j[y_j])``."""
  p = {k: np.asarray(v, F32) for k, v in params.items()}
  x, y = np.asarray(batch["x"], F32), np.asarray(batch["y"])
  h = np.tanh(x @ p["w1"] + p["b1"])
  z = h @ p["w2"] + p["b2"]
  shifted = z - z.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
  n = F32(len(y))
  loss = F32(-np.sum(log_probs[np.arange(len(y)), y]) / n)
  dz = (np.exp(log_probs) - np.eye(z.shape[1], dtype=F32)[y]) / n
  da = (dz @ p["w2"].T) * (F32(1) - h * h)
  grad = {"w1": x.T @ da, "b1": da.sum(axis=0), "w2": h.T @ dz, "b2": dz.sum(axis=0)}
  return loss, {k: v.astype(F32) for k, v in grad.items()}


def own_examples(data) -> list[dict]:
  """Each client's real examples only (an ``fb.Ragged``'s rows ``[i, :count[i]]``, read as plain
  arrays): the references never see the padding."""
  counts = np.asarray(data.count)
  return [{k: np.asarray(v)[i, :m] for k, v in data.examples.items()} for i, m in enumerate(counts)]


def own_batches(examples: dict, batch_size: int) -> list[dict]:
  """A client's examples in order, cut into batches of ``batch_size`` (the last one shorter)."""
  m = len(next(iter(examples.values())))
  return [{k: v[s:s + batch_size] for k, v in examples.items()} for s in range(0, m, batch_size)]


def digit_batches(data, i: int) -> list[dict]:
  """Client ``i``'s own digits batches: its real examples in the data's batch size."""
  return own_batches(own_examples(data)[i], data.batch_size)


def local_sgd(params: dict, batches: list[dict], lr: float) -> tuple[dict, np.float32]:
  """One epoch of SGD on ``_mlp.loss`` over a client's own batches (a Python loop), and the epoch's
  training loss: each example's loss before its batch's step, averaged over the client's examples
  (0 without any)."""
  params = {k: np.asarray(v) for k, v in params.items()}
  total, count = F32(0), 0
  for batch in batches:
    value, g = mlp_value_and_grad(params, batch)
    params = {k: params[k] - F32(lr) * g[k] for k in params}
    total, count = F32(total + F32(value) * F32(len(batch["y"]))), count + len(batch["y"])
  return params, F32(total / F32(max(count, 1)))


def _mean(values: list) -> np.ndarray:
  return (np.sum(np.stack([np.asarray(v) for v in values]), axis=0) / F32(len(values))).astype(F32)


# -- DiLoCo ----------------------------------------------------------------------------------------
def ref_diloco_init() -> dict:
  params = _mlp.init_params()
  return {"params": params, "momentum": {k: np.zeros_like(v) for k, v in params.items()}}


def ref_diloco_round(state: dict, data, nesterov: bool = True) -> tuple[dict, dict]:
  """Inner: AdamW from a fresh state over the client's own batches (numpy gradients, optax's
  AdamW update). Outer: ``g`` the mean of ``theta - theta_i``, ``m <- mu m + g``,
  ``theta <- theta - lr (g + mu m)``."""
  h, params = DILOCO, {k: np.asarray(v) for k, v in state["params"].items()}
  inner = optax.adamw(h["inner_lr"], weight_decay=h["weight_decay"])
  update = jax.jit(inner.update)  # shapes of the params only: one compile

  pseudo, losses = [], []
  for i in range(len(data.count)):
    p, opt_state, value = dict(params), inner.init(params), F32(0)
    for batch in digit_batches(data, i):
      value, g = mlp_value_and_grad(p, batch)
      updates, opt_state = update(g, opt_state, p)
      p = {k: np.asarray(v) for k, v in optax.apply_updates(p, updates).items()}
    pseudo.append({k: params[k] - p[k] for k in params})
    losses.append(value)  # the loss of the last inner step's batch, before that step
  g = {k: _mean([c[k] for c in pseudo]) for k in params}
  mu, lr = F32(h["momentum"]), F32(h["outer_lr"])
  m = {k: mu * np.asarray(state["momentum"][k]) + g[k] for k in params}
  step = {k: g[k] + mu * m[k] if nesterov else m[k] for k in params}
  new = {k: params[k] - lr * step[k] for k in params}
  return {"params": new, "momentum": m}, {"inner_loss": _mean(losses)}


# -- groups of models: branch-train-merge and PAPA -------------------------------------------------
def ref_group_training(models: dict, data: dict, lr: float):
  """Each stacked model FedAvg'd (weights n_i, the clients' real counts) over the clients whose
  one-hot ``data["group"]`` row picks it, each client one epoch of SGD over its own batches; also
  the examples per group and the clients' training loss per example."""
  groups, digits = np.asarray(data["group"]), data["digits"]
  models = {k: np.asarray(v) for k, v in models.items()}
  sums = {k: np.zeros_like(v) for k, v in models.items()}
  examples, losses = np.zeros(groups.shape[1], F32), []
  counts = np.asarray(digits.count).astype(F32)
  for i in range(len(counts)):
    k = int(np.argmax(groups[i]))
    start = {name: v[k] for name, v in models.items()}
    trained, loss = local_sgd(start, digit_batches(digits, i), lr)
    for name in sums:
      sums[name][k] += counts[i] * (trained[name] - start[name])
    examples[k] += counts[i]
    losses.append(loss)
  new = {name: v + sums[name] / examples.reshape((-1,) + (1,) * (v.ndim - 1))
         for name, v in models.items()}
  return new, examples, F32(np.sum(counts * np.stack(losses), dtype=F32) / np.sum(counts, dtype=F32))


def ref_btm_init() -> dict:
  params = _mlp.init_params()
  return {"branches": {k: np.stack([v] * BTM["branches"]) for k, v in params.items()}}


def ref_btm_round(state: dict, data: dict) -> tuple[dict, dict]:
  branches, examples, loss = ref_group_training(state["branches"], data, BTM["lr"])
  share = examples / examples.sum()
  merged = {k: np.sum([share[b] * v[b] for b in range(len(share))], axis=0).astype(F32)
            for k, v in branches.items()}
  return {"branches": branches}, {"merged": merged, "examples_per_branch": examples,
                                  "train_loss": loss}


def ref_papa_init() -> dict:
  members = [_mlp.init_params(seed=j) for j in range(PAPA["members"])]
  return {"population": {k: np.stack([m[k] for m in members]) for k in members[0]},
          "round": np.zeros((), np.int32)}


def ref_papa_round(state: dict, data: dict) -> tuple[dict, dict]:
  population, _, loss = ref_group_training(state["population"], data, PAPA["lr"])
  step = int(state["round"]) + 1
  a = F32(PAPA["pull"] if step % PAPA["every"] == 0 else 0.0)
  avg = {k: _mean(list(v)) for k, v in population.items()}
  pulled = {k: (F32(1) - a) * v + a * avg[k] for k, v in population.items()}
  return {"population": pulled, "round": np.int32(step)}, {"pulled": a, "train_loss": loss}


# -- char LM ---------------------------------------------------------------------------------------
def _lm_value_and_grad(p: dict, windows: np.ndarray, batch_size: int) -> tuple:
  """The mean loss of ``windows`` and its gradient; a shorter (last) batch as the mean of its
  windows' own values and gradients, so that only two shapes are ever compiled."""
  if len(windows) == batch_size:
    return _lm_grad(p, windows)
  each = [_lm_grad(p, w[None]) for w in windows]
  n = F32(len(windows))
  value = F32(np.sum([F32(v) for v, _ in each], dtype=F32) / n)
  return value, {k: np.sum([np.asarray(g[k]) for _, g in each], axis=0, dtype=F32) / n for k in p}


def ref_char_lm_round(params: dict, data, lr: float = CHAR_LM_LR) -> tuple[dict, dict]:
  """FedAvg: one epoch of SGD over each client's own batches of windows (its real windows only,
  the last batch shorter), the deltas and training losses averaged with the clients' real window
  counts as weights."""
  params = {k: np.asarray(v) for k, v in params.items()}
  counts = np.asarray(data.count).astype(F32)
  total = {k: np.zeros_like(v) for k, v in params.items()}
  losses = []
  for i, own in enumerate(own_examples(data)):
    p, loss_sum = dict(params), F32(0)
    for batch in own_batches(own, data.batch_size):
      value, g = _lm_value_and_grad(p, batch["tokens"], data.batch_size)
      p = {k: p[k] - F32(lr) * np.asarray(g[k]) for k in p}
      loss_sum = F32(loss_sum + F32(value) * F32(len(batch["tokens"])))
    for k in params:
      total[k] += counts[i] * (p[k] - params[k])
    losses.append(F32(loss_sum / F32(max(counts[i], 1))))
  weight = np.sum(counts, dtype=F32)
  return ({k: params[k] + total[k] / weight for k in params},
          {"train_loss": F32(np.sum(counts * np.stack(losses), dtype=F32) / weight)})

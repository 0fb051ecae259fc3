"""FedAdam (FedOpt with a server Adam): clients train locally; the server treats the negated mean
update as a gradient and applies Adam, keeping its moments as server state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb
from examples import _mlp

CLIENTS = 8
LOCAL_LR, SERVER_LR, B1, B2, EPS = 0.05, 0.01, 0.9, 0.99, 1e-6


def init_state() -> dict:
  params = _mlp.init_params()
  zeros = jax.tree.map(np.zeros_like, params)
  return {"params": params, "m": zeros, "v": zeros, "step": np.zeros((), np.float32)}


def client_update(params, data):
  trained = _mlp.sgd_epoch(params, data, LOCAL_LR)
  return jax.tree.map(lambda new, old: new - old, trained, params)


def adam(state, grad):
  step = state["step"] + 1.0
  m = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, state["m"], grad)
  v = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g * g, state["v"], grad)
  scale = SERVER_LR * jnp.sqrt(1 - B2**step) / (1 - B1**step)
  params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + EPS), state["params"], m, v)
  return {"params": params, "m": m, "v": v, "step": step}


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def fedadam_round(state, data):
  updates = fb.map(client_update, fb.broadcast(state["params"]), data)
  pseudo_grad = jax.tree.map(jnp.negative, fb.mean(updates))
  update_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(pseudo_grad)))
  return adam(state, pseudo_grad), {"update_norm": update_norm}


@fb.computation()
def initialize():
  return init_state()


computation = fedadam_round
process = fb.IterativeProcess(initialize, fedadam_round)


def example_inputs(clients: int = CLIENTS):
  return init_state(), _mlp.client_data(clients, batches=2, batch_size=8, seed=3)

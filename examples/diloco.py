"""DiLoCo (Douillard et al., 2023): each client takes ``H`` inner AdamW steps from the server
model; the server averages the pseudo-gradients ``start - end`` and applies SGD with Nesterov
momentum to them (the outer optimizer).

The inner AdamW state starts fresh every round (only the model crosses the network, as in
DiLoCo's communication-efficient setting); the outer momentum buffer is server state.
Run ``python -m examples.diloco``: a few rounds on digits, printing held-out loss and accuracy.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

import faxbridge as fb

from . import _cli, _data, _mlp

CLIENTS, BATCHES, BATCH_SIZE = 8, 2, 8  # the exported program's sizes
INNER_LR, WEIGHT_DECAY = 0.01, 1e-4
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9

# optax.sgd(OUTER_LR, OUTER_MOMENTUM, nesterov=True) is this trace followed by a scale by -OUTER_LR;
# the trace is used alone so that the server state is a plain dict of arrays.
_outer_trace = optax.trace(decay=OUTER_MOMENTUM, nesterov=True)
_inner = optax.adamw(INNER_LR, weight_decay=WEIGHT_DECAY)


def init_state() -> dict:
  params = _mlp.init_params()
  return {"params": params, "momentum": jax.tree.map(np.zeros_like, params)}


def inner_steps(params: dict, data: dict):
  """``H`` = the client's number of batches AdamW steps on ``_mlp.loss`` (``lax.scan``), from a
  fresh AdamW state; returns the pseudo-gradient ``params - trained`` and the last batch's loss."""

  def step(carry, batch):
    p, opt_state = carry
    value, grad = jax.value_and_grad(_mlp.loss)(p, batch)
    updates, opt_state = _inner.update(grad, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), value

  batches = {"x": data["x"], "y": data["y"]}
  (trained, _), losses = jax.lax.scan(step, (params, _inner.init(params)), batches)
  return jax.tree.map(lambda start, end: start - end, params, trained), losses[-1]


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def diloco_round(state, data):
  """One outer step: ``g = mean_i (theta - theta_i^H)``, ``m <- mu m + g``,
  ``theta <- theta - lr (g + mu m)`` (Nesterov), and the clients' mean inner loss."""
  pseudo_grads, losses = fb.map(inner_steps, fb.broadcast(state["params"]), data)
  updates, trace = _outer_trace.update(fb.mean(pseudo_grads),
                                       optax.TraceState(trace=state["momentum"]))
  params = jax.tree.map(lambda p, u: p - OUTER_LR * u, state["params"], updates)
  return {"params": params, "momentum": trace.trace}, {"inner_loss": fb.mean(losses)}


@fb.computation()
def initialize():
  return init_state()


computation = diloco_round
process = fb.IterativeProcess(initialize, diloco_round)


def example_inputs(clients: int = CLIENTS):
  data, _ = _data.digits_clients(clients, batches=BATCHES, batch_size=BATCH_SIZE, seed=1)
  return init_state(), data


def main(rounds: int = 8, clients: int = 16, log=print) -> list[dict]:
  """Train natively on digits (8 batches of 16 per client and round: 8 inner AdamW steps) and
  report the held-out loss and accuracy per round."""
  return _mlp.simulate_batches(process, rounds=rounds, clients=clients, batches=8, batch_size=16,
                       params_of=lambda state: state["params"], log=log)


if __name__ == "__main__":
  _cli.run(main)

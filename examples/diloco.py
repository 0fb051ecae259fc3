"""DiLoCo (Douillard et al., 2023): each client takes ``H`` inner AdamW steps from the server
model; the server averages the pseudo-gradients ``start - end`` and applies SGD with Nesterov
momentum to them (the outer optimizer).

The inner AdamW state starts fresh every round (only the model crosses the network, as in
DiLoCo's communication-efficient setting); the outer momentum buffer is server state. Clients hold
their real partitions (an ``fb.Ragged``): a client's ``H`` is its own number of batches (one
epoch, ``fb.fold``; the last batch's loss over its remaining examples only). The outer step
averages the pseudo-gradients uniformly, as DiLoCo averages its workers.
Run ``python -m examples.diloco``: a few rounds on digits, printing held-out loss and accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import faxbridge as fb

from . import _cli, _data, _mlp

CLIENTS, BATCH_SIZE = 8, 8
INNER_LR, WEIGHT_DECAY = 0.01, 1e-4
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9

# optax.sgd(OUTER_LR, OUTER_MOMENTUM, nesterov=True) is this trace followed by a scale by -OUTER_LR;
# the trace is used alone so that the server state is a plain dict of arrays.
_outer_trace = optax.trace(decay=OUTER_MOMENTUM, nesterov=True)
_inner = optax.adamw(INNER_LR, weight_decay=WEIGHT_DECAY)


def init_state() -> dict:
  params = _mlp.init_params()
  return {"params": params, "momentum": jax.tree.map(np.zeros_like, params)}


def inner_steps(params: dict, data: fb.Ragged):
  """``H`` = the client's own number of batches AdamW steps on its masked batch loss
  (``fb.fold``), from a fresh AdamW state; returns the pseudo-gradient ``params - trained`` and
  the last step's batch loss (before that step; 0 for a client with no examples)."""

  def step(carry, batch, mask):
    p, opt_state, _ = carry
    value, grad = jax.value_and_grad(_mlp.masked_loss)(p, batch, mask)
    updates, opt_state = _inner.update(grad, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, value

  init = (params, _inner.init(params), jnp.zeros((), jnp.float32))
  trained, _, last_loss = fb.fold(step, init, data)
  return jax.tree.map(lambda start, end: start - end, params, trained), last_loss


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
  """The initial state and the digits clients of ``_data.example_clients`` (1 to 562 examples,
  padded to 576), in batches of 8."""
  return init_state(), _data.example_clients(clients, batch_size=BATCH_SIZE)


def main(rounds: int = 8, clients: int = 16, log=print) -> list[dict]:
  """Train natively on digits (Dirichlet(0.5); every client one epoch over its own examples in
  batches of 16: as many inner AdamW steps as it has batches) and report the held-out loss and
  accuracy per round."""
  return _mlp.simulate(process, rounds=rounds, clients=clients, batch_size=16,
                       params_of=lambda state: state["params"], log=log)


if __name__ == "__main__":
  _cli.run(main)

"""PAPA, population parameter averaging (Jolicoeur-Martineau et al., 2023), federated: a population
of ``P`` models, each trained (FedAvg) by its own client group, and every ``T`` rounds pulled
toward the population average: ``m_j <- (1 - a) m_j + a mean_l m_l``.

Between pulls the members drift apart on their groups' data (diversity); the pulls keep them
close enough to be averaged. The population average is the model PAPA delivers. The round counter
in the server state decides, inside the traced program, whether this round pulls
(``a`` or 0 via ``jnp.where``): one static program for every round.
Run ``python -m examples.papa``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb

from . import _cli, _mlp, _population

CLIENTS, BATCH_SIZE = 8, 8
MEMBERS, PULL_EVERY, PULL = 3, 2, 0.5
LOCAL_LR = 0.5


def init_state() -> dict:
  """Members start from different seeds (population diversity); round counter 0."""
  return {"population": _population.stack([_mlp.init_params(seed=j) for j in range(MEMBERS)]),
          "round": np.zeros((), np.int32)}


def average(population: dict) -> dict:
  return jax.tree.map(lambda m: jnp.mean(m, axis=0), population)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def papa_round(state, data):
  """Each member FedAvg'd over its group (``data["group"]`` one-hot [P] per client); on every
  ``PULL_EVERY``-th round the members move a fraction ``PULL`` toward their average."""
  population, _, loss = _population.train_groups(state["population"], data, LOCAL_LR)
  step = state["round"] + 1
  a = jnp.where(step % PULL_EVERY == 0, np.float32(PULL), np.float32(0))
  mean = average(population)
  population = jax.tree.map(lambda m, avg: (1 - a) * m + a * avg[None], population, mean)
  return {"population": population, "round": step}, {"pulled": a, "train_loss": loss}


@fb.computation()
def initialize():
  return init_state()


computation = papa_round
process = fb.IterativeProcess(initialize, papa_round)


def example_inputs(clients: int = CLIENTS):
  """The initial state and ``_population.client_data``: 8 clients holding 1 to 562 digits (padded
  to 576, batches of 8) with their groups."""
  return init_state(), _population.client_data(clients, MEMBERS, batch_size=BATCH_SIZE)


def _models(state, _) -> dict:
  members = {f"member{j}": jax.tree.map(lambda m, j=j: m[j], state["population"])
             for j in range(MEMBERS)}
  return {**members, "average": average(state["population"])}


def main(rounds: int = 8, clients: int = 18, log=print) -> list[dict]:
  """Train natively on digits (every client one epoch over its own examples per round, in
  batches of 16) and report the held-out loss and accuracy of each member and of the
  population average (the result) per round."""
  return _population.simulate(process, MEMBERS, rounds=rounds, clients=clients, batch_size=16,
                              models_of=_models, log=log)


if __name__ == "__main__":
  _cli.run(main)

"""Branch-train-merge (Li et al., 2022), federated: ``K`` branches start from one model; each
round every branch is trained (FedAvg) only by its own client group, and the branches are merged
into one model by their groups' example counts.

Groups are data domains: clients ranked by their mean digit label and cut into ``K`` blocks. Each
client gets a one-hot ``group`` row (client data, so the server never sees who belongs where).
The merge ``theta = sum_k N_k theta_k / sum_k N_k`` is computed every round; the last round's is
the result. Run ``python -m examples.branch_train_merge``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import faxbridge as fb

from . import _cli, _mlp, _population

CLIENTS, BATCH_SIZE = 8, 8
BRANCHES = 2
LOCAL_LR = 0.5


def init_state() -> dict:
  """Every branch starts from the same model (the common seed)."""
  return {"branches": _population.stack([_mlp.init_params()] * BRANCHES)}


def merge(branches: dict, examples: jax.Array) -> dict:
  """The example-weighted average of the stacked branches: ``sum_k N_k theta_k / sum_k N_k``."""
  w = examples / jnp.sum(examples)
  return jax.tree.map(lambda b: jnp.tensordot(w, b, axes=1), branches)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def branch_train_merge_round(state, data):
  """Each branch FedAvg'd over its group (``data["group"]`` one-hot [K] per client), then merged."""
  branches, examples, loss = _population.train_groups(state["branches"], data, LOCAL_LR)
  return {"branches": branches}, {"merged": merge(branches, examples),
                                  "examples_per_branch": examples, "train_loss": loss}


@fb.computation()
def initialize():
  return init_state()


computation = branch_train_merge_round
process = fb.IterativeProcess(initialize, branch_train_merge_round)


def example_inputs(clients: int = CLIENTS):
  """The initial state and ``_population.client_data``: 8 clients holding 1 to 562 digits (padded
  to 576, batches of 8) with their groups."""
  return init_state(), _population.client_data(clients, BRANCHES, batch_size=BATCH_SIZE)


def _models(state, examples) -> dict:
  branches = {f"branch{k}": jax.tree.map(lambda b, k=k: b[k], state["branches"])
              for k in range(BRANCHES)}
  return {**branches, "merged": merge(state["branches"], examples)}


def main(rounds: int = 8, clients: int = 16, log=print) -> list[dict]:
  """Train natively on digits (every client one epoch over its own examples per round, in
  batches of 16) and report the held-out loss and accuracy of each branch and of the
  merge (the result) per round."""
  return _population.simulate(process, BRANCHES, rounds=rounds, clients=clients, batch_size=16,
                              models_of=_models, log=log)


if __name__ == "__main__":
  _cli.run(main)

"""FedYogi (FedOpt with Yogi on the server) on digits: clients run local SGD, the server treats the
negated weighted-mean model delta as a gradient and applies ``optax.yogi``; Yogi's moments and step
count are part of the server state. See ``examples/_fedopt.py`` for the round.

Run ``python -m examples.fedyogi`` to train for a few rounds and print the held-out accuracy.
"""

from __future__ import annotations

import numpy as np
import optax

from . import _cli, _fedopt

CLIENTS = 8
LOCAL_LR, SERVER_LR, B1, B2, EPS = 0.05, 0.01, 0.9, 0.99, 1e-3
BATCHES, BATCH_SIZE = 2, 16  # per client and round in example_inputs (export sizes)

process = _fedopt.fedopt_process(optax.yogi(SERVER_LR, b1=B1, b2=B2, eps=EPS), LOCAL_LR, "fedyogi")
initialize, computation = process.initialize, process.next


def example_inputs(clients: int = CLIENTS) -> tuple[dict, dict[str, np.ndarray]]:
  """The initial server state and one round of digits client data (Dirichlet(0.5) label skew)."""
  return _fedopt.example_inputs(process, clients, batches=BATCHES, batch_size=BATCH_SIZE)


def main(rounds: int = 10, clients: int = CLIENTS, log=print) -> list[dict]:
  """Train natively and report the held-out loss and accuracy per round (``_fedopt.train``)."""
  return _fedopt.train(process, rounds=rounds, clients=clients, log=log)


if __name__ == "__main__":
  _cli.run(main)

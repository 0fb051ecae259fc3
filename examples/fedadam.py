"""FedAdam (FedOpt with Adam on the server) on digits: clients run an epoch of local SGD over their own
examples, the server treats the negated weighted-mean model delta as a gradient and applies
``optax.adam``; Adam's moments and step count are part of the server state. See
``examples/_fedopt.py`` for the round.

Run ``python -m examples.fedadam`` to train for a few rounds and print the held-out accuracy.
"""

from __future__ import annotations

import optax

import faxbridge as fb

from . import _cli, _fedopt

CLIENTS = 8
LOCAL_LR, SERVER_LR, B1, B2, EPS = 0.05, 0.01, 0.9, 0.99, 1e-3
BATCH_SIZE = 16

process = _fedopt.fedopt_process(optax.adam(SERVER_LR, b1=B1, b2=B2, eps=EPS), LOCAL_LR, "fedadam")
initialize, computation = process.initialize, process.next


def example_inputs(clients: int = CLIENTS) -> tuple[dict, fb.Ragged]:
  """The initial server state and one round of digits client data (``_fedopt.example_inputs``)."""
  return _fedopt.example_inputs(process, clients, batch_size=BATCH_SIZE)


def main(rounds: int = 10, clients: int = CLIENTS, log=print) -> list[dict]:
  """Train natively and report the held-out loss and accuracy per round (``_fedopt.train``)."""
  return _fedopt.train(process, rounds=rounds, clients=clients, batch_size=BATCH_SIZE, log=log)


if __name__ == "__main__":
  _cli.run(main)

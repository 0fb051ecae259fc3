"""The anchor FedAvg round (``benchmarks/_fedavg_model.py``) in Flower's simulation engine, as Flower
documents it for one machine: a ``ClientApp`` (one virtual SuperNode per client) and a ``ServerApp``
running the message-API ``FedAvg`` strategy, started by ``flwr.simulation.run_simulation`` on the Ray
backend with its default resources (2 CPUs per ClientApp: one actor on this 2-core machine).

Runs in ``.venv-bench`` (``make bench``), started by ``benchmarks/run.py``; reads the inputs that
``fedavg_round.py peers`` wrote and prints one JSON object on its last line (``benchmarks/peer_io.py``).

Flower brings no model code: its clients train with whatever the user writes, here the benchmark's own
JAX client update (2 SGD steps on the client's 2 batches, jitted once per Ray actor) applied to the
weights the server sent. The strategy averages the clients' weights by their ``num-examples`` (32
each): ``mean(w + delta_i) = w + mean(delta_i)``, the same math. Each round's time runs from
``configure_train`` to the end of ``aggregate_train`` (no evaluation: ``fraction_evaluate=0``). The first
round, whose time includes each actor's start and compile, is checked against the reference; a
mismatch ends the run with no round timed.

  .venv-bench/bin/python benchmarks/flower_round.py --inputs DIR --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUTS_ENV = "FAXBRIDGE_PEER_INPUTS"  # the folder of inputs, read by every Ray actor
sys.path.insert(0, str(HERE))

import peer_io  # noqa: E402

_ACTOR: dict = {}  # per Ray actor process: the jitted update and the clients' data (memory-mapped)


def _train_one(params: list, client: int) -> list:
  """One client's round in this actor: the trained weights, in PARAM_NAMES order."""
  if not _ACTOR:
    import _fedavg_model as model
    import jax

    def train(p, x, y):
      delta = model.client_update(p, {"x": x, "y": y})
      return jax.tree.map(lambda w, d: w + d, p, delta)

    _, x, y = peer_io.load(Path(os.environ[INPUTS_ENV]), mmap=True)
    _ACTOR.update(train=jax.jit(train), x=x, y=y)
  p = dict(zip(peer_io.PARAM_NAMES, params))
  new = _ACTOR["train"](p, _ACTOR["x"][client], _ACTOR["y"][client])
  return [new[n].__array__() for n in peer_io.PARAM_NAMES]


def client_app():
  from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
  from flwr.clientapp import ClientApp

  app = ClientApp()

  @app.train()
  def train(msg, context):
    client = int(context.node_config["partition-id"])
    new = _train_one(msg.content["arrays"].to_numpy_ndarrays(), client)
    reply = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 32})})
    return Message(content=reply, reply_to=msg)

  return app


def server_app(clients: int, params: dict, rounds: int, budget_s: float, folder: Path, report: dict):
  from flwr.app import ArrayRecord
  from flwr.serverapp import ServerApp
  from flwr.serverapp.strategy import FedAvg

  class TimedFedAvg(FedAvg):
    """FedAvg that times each round, checks the first against the reference and stops training after
    a mismatch or once ``budget_s`` is spent (at least 3 rounds past the first)."""

    def __init__(self, **kw):
      super().__init__(**kw)
      self.starts: list[float] = []
      self.ends: list[float] = []
      self.stop = False

    def configure_train(self, server_round, arrays, config, grid):
      if self.stop:
        return []
      self.starts.append(time.perf_counter())
      return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      if not replies:  # a round configured with no clients: after a stop
        return None, None
      arrays, metrics = super().aggregate_train(server_round, replies)
      self.ends.append(time.perf_counter())
      report["replies"] = len(replies)
      if server_round == 1:
        got = dict(zip(peer_io.PARAM_NAMES, arrays.to_numpy_ndarrays()))
        report["check"] = peer_io.check(folder, got)
        if not report["check"]["ok"]:
          report["mismatch"] = peer_io.mismatch_reason(report["check"], got, params)
          self.stop = True
      timed = self.ends[1:]
      if len(timed) >= 3 and self.ends[-1] - self.starts[1] > budget_s:
        self.stop = True
      return arrays, metrics

  app = ServerApp()

  @app.main()
  def main(grid, context):
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                           min_available_nodes=clients)
    initial = ArrayRecord([params[n] for n in peer_io.PARAM_NAMES])
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    report["round_s"] = [e - s for s, e in zip(strategy.starts, strategy.ends)]

  return app


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--inputs", type=Path, required=True, help="a folder fedavg_round.py peers wrote")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the first")
  parser.add_argument("--budget-s", type=float, default=60.0)
  ns = parser.parse_args(argv)
  folder = ns.inputs.resolve()
  # Ray's processes start from this environment: they find the inputs and import this module.
  os.environ[INPUTS_ENV] = str(folder)
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("RAY_DEDUP_LOGS", "0")
  import flower_round  # this file as a module: Ray pickles its functions by reference
  from flwr.simulation import run_simulation

  params, x, _ = peer_io.load(folder, mmap=True)
  clients = x.shape[0]
  report: dict = {"clients": clients}
  mem = peer_io.PeakMemory()
  with mem:
    start = time.perf_counter()
    run_simulation(server_app=flower_round.server_app(clients, params, ns.repeats + 1, ns.budget_s,
                                                      folder, report),
                   client_app=flower_round.client_app(), num_supernodes=clients)
    report["simulation_s"] = time.perf_counter() - start
  out = {"clients": clients, "check": report.get("check"), "memory": mem.report(),
         "simulation_s": report["simulation_s"],
         "versions": {p: metadata.version(p) for p in ("flwr", "ray", "jax")}}
  rounds = report.get("round_s", [])
  if not rounds or "check" not in report:
    out["mismatch"] = "no round completed"
  elif "mismatch" in report:
    out["mismatch"] = report["mismatch"]
  else:
    out["first_call_s"] = rounds[0]
    out["times_s"] = rounds[1:]
  print(json.dumps(out))


if __name__ == "__main__":
  main()

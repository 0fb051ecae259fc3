"""The anchor FedAvg round (``benchmarks/_fedavg_model.py``) in pfl 0.6, Apple's simulator, as its
documentation sets it up for one machine: a Keras model in ``pfl.model.tensorflow.TFModel``,
``FederatedAveraging`` on a ``SimulatedBackend`` over a ``FederatedDataset`` of per-user datasets.

Runs in ``.venv-bench`` (``make bench``), started by ``benchmarks/run.py``; reads the inputs that
``fedavg_round.py peers`` wrote and prints one JSON object on its last line (``benchmarks/peer_io.py``).

The same math: an MLP 256-512-10 (Dense ReLU, Dense logits), each user's 32 examples in 2 batches of
16 in order (``local_batch_size=16``, one epoch: 2 SGD steps at ``local_learning_rate=0.1``), the
users' model differences averaged with weight 1 each (pfl's default) and applied by a central SGD
at learning rate 1.0: ``w + mean(w_user - w)``. Every user of the round is in its cohort
(``train_cohort_size`` = users, sampled without reuse), no evaluation.

``--keras 3`` (TF 2.21's default Keras) or ``--keras 2`` (tf-keras, ``TF_USE_LEGACY_KERAS=1``): pfl
keys a model's variables by ``variable.name``, which Keras 3 leaves as ``kernel``/``bias`` for every
Dense layer, so under Keras 3 two of the four variables are lost from its statistics. The first round
is checked against the reference before any is timed; a round that differs is reported as a mismatch
and not timed.

  .venv-bench/bin/python benchmarks/pfl_round.py --inputs DIR --keras 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--inputs", type=Path, required=True, help="a folder fedavg_round.py peers wrote")
  parser.add_argument("--keras", choices=["2", "3"], default="3")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=60.0)
  ns = parser.parse_args(argv)
  # Before TensorFlow is imported: which Keras tf.keras is.
  os.environ["TF_USE_LEGACY_KERAS"] = "1" if ns.keras == "2" else "0"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU, as the other rows
  sys.path.insert(0, str(HERE))
  import peer_io

  out = run(ns.inputs, ns.repeats, ns.budget_s, peer_io)
  out["keras_requested"] = ns.keras
  print(json.dumps(out))


def run(folder: Path, repeats: int, budget_s: float, peer_io) -> dict:
  import logging

  import numpy as np
  import tensorflow as tf
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.callback.base import TrainingProcessCallback
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNTrainHyperParams
  from pfl.metrics import Metrics
  from pfl.model.tensorflow import TFModel

  logging.getLogger("pfl").setLevel(logging.WARNING)
  params, x, y = peer_io.load(folder)
  users, batches, batch_size, features = x.shape
  x_users = x.reshape(users, batches * batch_size, features)  # batch 0 then batch 1, in order
  y_users = y.reshape(users, batches * batch_size)

  keras = tf.keras
  model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(params["w1"].shape[1], "relu"),
                            keras.layers.Dense(params["w2"].shape[1])])
  names = list(peer_io.PARAM_NAMES)  # the Keras weights' order: kernel, bias of each layer
  model.set_weights([params[n] for n in names])
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  pfl_model = TFModel(model=model, metrics={}, central_optimizer=keras.optimizers.SGD(1.0))

  def dataset(user: int) -> Dataset:
    return Dataset(raw_data=[x_users[user], y_users[user]], user_id=user)

  def backend() -> SimulatedBackend:
    sampler = get_user_sampler("minimize_reuse", list(range(users)))
    return SimulatedBackend(training_data=FederatedDataset(dataset, sampler), val_data=None)

  class Clock(TrainingProcessCallback):
    """The time at the start and after each central iteration (= round); stops past the budget."""

    def __init__(self):
      self.stamps: list[float] = []

    def on_train_begin(self, *, model) -> Metrics:
      self.stamps.append(time.perf_counter())
      return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
      self.stamps.append(time.perf_counter())
      rounds = len(self.stamps) - 1
      return rounds >= 3 and self.stamps[-1] - self.stamps[0] > budget_s, Metrics()

  train = NNTrainHyperParams(local_learning_rate=0.1, local_num_epochs=1, local_batch_size=batch_size)

  def rounds(n: int) -> Clock:
    clock = Clock()
    algorithm_params = NNAlgorithmParams(central_num_iterations=n, evaluation_frequency=n + 1,
                                         train_cohort_size=users, val_cohort_size=None)
    FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend(), model=pfl_model,
                             model_train_params=train, model_eval_params=None, callbacks=[clock])
    return clock

  mem = peer_io.PeakMemory()  # from here: the rounds' memory (the inputs and the model are made)
  with mem:
    first = rounds(1)
  got = dict(zip(names, model.get_weights()))
  checked = peer_io.check(folder, got)
  out: dict = {"clients": users, "check": checked, "first_call_s": first.stamps[1] - first.stamps[0],
               "keras": keras.__version__ if hasattr(keras, "__version__") else "",
               "tracked_variables": sorted(pfl_model.variable_map)}
  if not checked["ok"]:
    out["mismatch"] = peer_io.mismatch_reason(checked, got, params) + (
        f"; pfl tracks {len(pfl_model.variable_map)} of the model's {len(model.trainable_variables)} "
        f"trainable variables, by name: {sorted(pfl_model.variable_map)}")
    out["memory"] = mem.report()
    return out
  with mem:
    clock = rounds(repeats)
  out["times_s"] = [float(t) for t in np.diff(clock.stamps)]
  out["memory"] = mem.report()
  return out


if __name__ == "__main__":
  main()

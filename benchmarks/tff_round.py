"""The FedAvg round on TFF 0.87: hand-written in TFF against faxbridge's export, side by side.

Runs in ``.venv-tff`` (TFF 0.87, TF 2.14), started by ``benchmarks/run.py``; it imports nothing
from faxbridge except the TFF runner's own modules (``converters/runtimes/tff/tff_runner``, which
run in .venv-tff) to load the export and build its argument as the runner does. Data comes in
through an ``.npz`` whose keys are the export manifest's input names; results go out as JSON.

The hand-written round is what a TFF user writes for ``benchmarks/_fedavg_model.py``::

  client_update = tff.tensorflow.computation(model, batches -> model delta)  # 2 SGD steps
  round(model@SERVER, data@CLIENTS) =
      federated_map(server_update, (model, federated_mean(
          federated_map(client_update, (federated_broadcast(model), data)))))

Modes (one JSON object on the last line of stdout):

* ``time``: both compiled (a first call each), then timed round-robin; checks both agree.
* ``memory --impl hand|export``: a fresh process: ``ru_maxrss`` of this process and of TFF's
  worker_binary (ended, then read as a child) after data creation and after one round.
* ``profile``: the structure of both computations (intrinsic calls, compiled TF computations,
  selections, structs, lambdas) and per-round time of each.

  .venv-tff/bin/python benchmarks/tff_round.py time --export DIR --inputs in.npz --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "converters" / "runtimes" / "tff"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_federated as tff  # noqa: E402
from tff_runner import processes  # noqa: E402
from tff_runner.computations import Program  # noqa: E402
from tff_runner.values import build_argument  # noqa: E402

LR = 0.1  # as benchmarks/_fedavg_model.py


# -- the hand-written round -------------------------------------------------------------------
def handwritten_round(model_arrays: dict, data_arrays: dict):
  """The round for these shapes, written with tff.tensorflow.computation + federated_computation."""
  model_spec = collections.OrderedDict(
      (k, tff.TensorType(v.dtype, v.shape)) for k, v in sorted(model_arrays.items()))
  data_spec = collections.OrderedDict(
      (k, tff.TensorType(v.dtype, v.shape[1:])) for k, v in sorted(data_arrays.items()))
  batches = data_arrays["x"].shape[1]

  @tff.tensorflow.computation(model_spec, data_spec)
  def client_update(model, data):
    w = collections.OrderedDict(model)
    for b in range(batches):  # one SGD step per batch, unrolled like the JAX round
      with tf.GradientTape() as tape:
        tape.watch(list(w.values()))
        h = tf.nn.relu(data["x"][b] @ w["w1"] + w["b1"])
        logits = h @ w["w2"] + w["b2"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(data["y"][b], logits))
      grads = tape.gradient(loss, w)
      w = collections.OrderedDict((k, w[k] - LR * grads[k]) for k in w)
    return collections.OrderedDict((k, w[k] - model[k]) for k in w)

  @tff.tensorflow.computation(model_spec, model_spec)
  def server_update(model, mean_delta):
    return collections.OrderedDict((k, model[k] + mean_delta[k]) for k in model)

  @tff.federated_computation(tff.FederatedType(model_spec, tff.SERVER),
                             tff.FederatedType(data_spec, tff.CLIENTS))
  def fedavg_round(model, data):
    deltas = tff.federated_map(client_update, (tff.federated_broadcast(model), data))
    return tff.federated_map(server_update, (model, tff.federated_mean(deltas)))

  return fedavg_round


def _split_inputs(block: dict, arrays: dict) -> tuple[dict, dict]:
  """Model and data arrays by the leaf key of each manifest input (``[0, 'w1']`` -> model w1)."""
  model, data = {}, {}
  for entry in block["inputs"]:
    arg, key = entry["path"][0], entry["path"][-1]
    (model if arg == 0 else data)[key] = arrays[entry["name"]]
  return model, data


class Rounds:
  """Both rounds ready to call on the same inputs in TFF's native C++ context."""

  def __init__(self, export_dir: Path, inputs: Path):
    self.program = Program(export_dir)
    block = self.program.blocks["computation"]
    arrays = dict(np.load(inputs))
    model, data = _split_inputs(block, arrays)
    self.clients = next(iter(data.values())).shape[0]
    self.hand = handwritten_round(model, data)
    self.hand_arg = (collections.OrderedDict(sorted(model.items())),
                     [collections.OrderedDict((k, v[i]) for k, v in sorted(data.items()))
                      for i in range(self.clients)])
    self.export_arg, _ = build_argument(self.program.comp.type_signature.parameter,
                                        block["inputs"], arrays)
    self.context = tff.backends.native.create_sync_local_cpp_execution_context()

  def call(self, which: str):
    with tff.framework.get_context_stack().install(self.context):
      if which == "hand":
        return self.hand(*self.hand_arg)
      return self.program.comp(self.export_arg)


def _leaves(value) -> list[np.ndarray]:
  if hasattr(value, "items"):
    return [np.asarray(v) for _, v in sorted(value.items())]
  return [np.asarray(v) for v in value]


def time_mode(rounds: Rounds, repeats: int, budget_s: float, which: list[str]) -> dict:
  first, results = {}, {}
  for name in which:
    start = time.perf_counter()
    results[name] = rounds.call(name)
    first[name] = time.perf_counter() - start
  out: dict = {"clients": rounds.clients, "first_call_s": first, "times_s": {n: [] for n in which}}
  if len(which) == 2:
    a, b = (_leaves(results[n]) for n in which)
    out["max_abs_diff"] = float(max(np.max(np.abs(x - y)) for x, y in zip(a, b)))
  start_all = time.perf_counter()
  for r in range(repeats):
    for name in which:
      start = time.perf_counter()
      rounds.call(name)
      out["times_s"][name].append(time.perf_counter() - start)
    if r >= 2 and time.perf_counter() - start_all > budget_s:
      break
  return out


def _maxrss_mb(who: int) -> float:
  return resource.getrusage(who).ru_maxrss / 1024.0


def memory_mode(export_dir: Path, inputs: Path, which: str) -> dict:
  rounds = Rounds(export_dir, inputs)
  baseline = _maxrss_mb(resource.RUSAGE_SELF)
  rounds.call(which)
  peak = _maxrss_mb(resource.RUSAGE_SELF)
  processes.end_children()  # the worker_binary, reaped: its peak shows in RUSAGE_CHILDREN
  worker = _maxrss_mb(resource.RUSAGE_CHILDREN)
  return {"clients": rounds.clients, "impl": which, "baseline_mb": baseline, "peak_mb": peak,
          "worker_peak_mb": worker, "delta_mb": peak - baseline + worker}


def structure(comp) -> dict:
  """Counts of the building blocks a computation's body evaluates (per round, not per client)."""
  counts: collections.Counter = collections.Counter()
  intrinsics: collections.Counter = collections.Counter()

  def walk(proto):
    kind = proto.WhichOneof("computation")
    counts[kind] += 1
    if kind == "intrinsic":
      intrinsics[proto.intrinsic.uri] += 1
    elif kind == "lambda":
      walk(proto.__getattribute__("lambda").result)
    elif kind == "block":
      for local in proto.block.local:
        walk(local.value)
      walk(proto.block.result)
    elif kind == "call":
      walk(proto.call.function)
      if proto.call.HasField("argument"):
        walk(proto.call.argument)
    elif kind == "struct":
      for e in proto.struct.element:
        walk(e.value)
    elif kind == "selection":
      walk(proto.selection.source)

  from tensorflow_federated.proto.v0 import computation_pb2

  proto = computation_pb2.Computation.FromString(
      tff.framework.serialize_computation(comp).SerializeToString())
  walk(proto)
  return {"nodes": dict(counts), "intrinsics": dict(intrinsics)}


def _tensorflow_protos(comp) -> list:
  """The compiled TF computations inside ``comp`` (proto messages), in the order found."""
  from tensorflow_federated.proto.v0 import computation_pb2

  proto = computation_pb2.Computation.FromString(
      tff.framework.serialize_computation(comp).SerializeToString())
  found = []

  def walk(message):
    if message.DESCRIPTOR.name == "Computation" and message.WhichOneof("computation") == \
        "tensorflow":
      found.append(message)
      return
    for field, value in message.ListFields():
      if field.type == field.TYPE_MESSAGE:
        for item in value if field.label == field.LABEL_REPEATED else [value]:
          walk(item)

  walk(proto)
  return found


def _binding_names(binding) -> list[str]:
  if binding.WhichOneof("binding") == "tensor":
    return [binding.tensor.tensor_name]
  return [n for e in binding.struct.element for n in _binding_names(e)]


def local_graphs(rounds: Rounds, repeats: int = 20) -> dict:
  """Each round's client computation alone: its TF graph run on one client's data in a TF
  session (nodes, median ms per call), to tell the graph's cost from the executor's."""
  model = rounds.hand_arg[0]
  client = rounds.hand_arg[1][0]
  out = {}
  for which, comp in (("hand", rounds.hand), ("export", rounds.program.comp)):
    protos = [p for p in _tensorflow_protos(comp)
              if len(_binding_names(p.tensorflow.parameter)) == len(model) + len(client)]
    tf_proto = protos[0].tensorflow
    graph_def = tf.compat.v1.GraphDef.FromString(tf_proto.graph_def.value)
    names = _binding_names(tf_proto.parameter)
    # Parameter order: the hand-written one takes (model, data), the export (data, model).
    values = list(model.values()) + list(client.values()) if which == "hand" else \
        list(client.values()) + list(model.values())
    graph = tf.Graph()
    with graph.as_default():
      tf.graph_util.import_graph_def(graph_def, name="")
    fetches = _binding_names(tf_proto.result)
    with tf.compat.v1.Session(graph=graph) as sess:
      feed = dict(zip(names, values))
      sess.run(fetches, feed)
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        sess.run(fetches, feed)
        times.append(time.perf_counter() - start)
    ops = collections.Counter(n.op for n in graph_def.node)
    out[which] = {"nodes": len(graph_def.node), "median_ms": 1e3 * float(np.median(times)),
                  "ops": dict(ops.most_common(12))}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", choices=["time", "memory", "profile"])
  parser.add_argument("--export", type=Path, required=True)
  parser.add_argument("--inputs", type=Path, required=True)
  parser.add_argument("--impl", action="append", choices=["hand", "export"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=60.0)
  ns = parser.parse_args()
  processes.install_guards()
  try:
    which = ns.impl or ["hand", "export"]
    if ns.mode == "memory":
      out = memory_mode(ns.export, ns.inputs, which[0])
    else:
      rounds = Rounds(ns.export, ns.inputs)
      out = time_mode(rounds, ns.repeats, ns.budget_s, which)
      if ns.mode == "profile":
        out["structure"] = {"hand": structure(rounds.hand),
                            "export": structure(rounds.program.comp)}
        out["client_graph"] = local_graphs(rounds)
  finally:
    processes.end_children()
  print(json.dumps(out))


if __name__ == "__main__":
  main()

"""Builds real artifacts for testing the TFF runner, in the core environment (TF 2.21, fl 0.5.4).

Plain-op TF 2.21 graphs are wrapped as federated_language ``TensorFlow`` computation protos and
composed with federated intrinsics (the path shown in the interop facts note, "End to end"), then
written as export directories following docs/tff_runner_protocol.md. The numpy references here are
written independently of TF and TFF.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import federated_language as fl
import numpy as np
import tensorflow as tf
from federated_language.proto import computation_pb2 as pb
from google.protobuf import any_pb2
from tensorflow.python.framework import meta_graph

# Ops that TF 2.14 knows with the same attributes (checked on every graph built here).
PLAIN_OPS = frozenset({
    "Placeholder", "Identity", "Const", "NoOp", "MatMul", "Tanh", "Mul", "Sub", "AddV2", "Sum",
    "Mean", "Square", "Transpose", "Cast", "Neg", "RealDiv", "Reshape", "BitwiseXor", "BitwiseOr",
    "LeftShift", "RightShift", "Maximum", "Bitcast", "Pack", "ExpandDims",
})


@dataclass(frozen=True)
class PlainGraph:
  """A GraphDef made of plain TF ops, with its placeholder and result tensor names."""

  graph_def: bytes
  inputs: list[str]
  outputs: list[str]
  ops: frozenset[str]


def plain_graph(fn: Callable, *specs: tf.TensorSpec) -> PlainGraph:
  """Traces ``fn`` with TF 2.21 into a GraphDef TF 2.14 can load.

  Default-valued attributes are stripped (as SavedModel does for forward compatibility), and every
  op must be in ``PLAIN_OPS``: a newer op would only fail later, inside TFF's worker.
  """
  concrete = tf.function(fn, autograph=False).get_concrete_function(*specs)
  meta = tf.compat.v1.MetaGraphDef()
  meta.graph_def.CopyFrom(concrete.graph.as_graph_def())
  meta_graph.strip_graph_default_valued_attrs(meta)
  graph_def = meta.graph_def
  ops = frozenset(node.op for node in graph_def.node)
  if graph_def.library.function or not ops <= PLAIN_OPS:
    raise AssertionError(f"not a plain-op graph: {sorted(ops - PLAIN_OPS)} "
                         f"({len(graph_def.library.function)} library functions)")
  return PlainGraph(graph_def=graph_def.SerializeToString(deterministic=True),
                    inputs=[t.name for t in concrete.inputs],
                    outputs=[t.name for t in concrete.outputs], ops=ops)


# ----------------------------------------------------------------------------------------------
# federated_language computations


def _tensor_leaves(type_: fl.Type | None) -> list[fl.TensorType]:
  if type_ is None:
    return []
  if isinstance(type_, fl.TensorType):
    return [type_]
  if isinstance(type_, fl.StructType):
    return [leaf for _, t in type_.items() for leaf in _tensor_leaves(t)]
  raise TypeError(f"a TF computation takes tensors and structs of them, not {type_}")


def _binding(type_: fl.Type, names: list[str]) -> pb.TensorFlow.Binding:
  """A binding mirroring ``type_``; consumes tensor names in flattening order."""
  if isinstance(type_, fl.TensorType):
    return pb.TensorFlow.Binding(tensor=pb.TensorFlow.TensorBinding(tensor_name=names.pop(0)))
  return pb.TensorFlow.Binding(struct=pb.TensorFlow.StructBinding(
      element=[_binding(t, names) for _, t in type_.items()]))


def tf_computation(fn: Callable, parameter: fl.Type | None,
                   result: fl.Type) -> fl.framework.ConcreteComputation:
  """A TensorFlow computation from ``fn(*flat_parameter_tensors) -> flat result tensors``."""
  specs = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype)) for t in _tensor_leaves(parameter)]

  def flat_fn(*args):
    out = fn(*args)
    return list(out) if isinstance(out, tuple | list) else [out]

  graph = plain_graph(flat_fn, *specs)
  if len(graph.outputs) != len(_tensor_leaves(result)):
    raise AssertionError(f"{fn} returned {len(graph.outputs)} tensors for result type {result}")
  proto = pb.Computation(
      type=fl.FunctionType(parameter, result).to_proto(),
      tensorflow=pb.TensorFlow(
          graph_def=any_pb2.Any(type_url="type.googleapis.com/tensorflow.GraphDef",
                                value=graph.graph_def),
          parameter=_binding(parameter, list(graph.inputs)) if parameter is not None else None,
          result=_binding(result, list(graph.outputs))))
  return fl.framework.ConcreteComputation.from_proto(proto)


F32 = np.float32
DIM, EXAMPLES, LR = 3, 4, 0.5
PARAMS = fl.TensorType(F32, [DIM])
DATA = fl.StructType([("x", fl.TensorType(F32, [EXAMPLES, DIM])),
                      ("y", fl.TensorType(F32, [EXAMPLES])),
                      ("weight", fl.TensorType(F32)), ("count", fl.TensorType(np.int32))])
CLIENT_OUT = fl.StructType([("delta", PARAMS), ("loss", fl.TensorType(F32)),
                            ("weight", fl.TensorType(F32)), ("count", fl.TensorType(np.int32))])


def _client_step(w, x, y, weight, count):
  """One gradient step of a tanh regression on the client's data; also passes weight and count."""
  pred = tf.tanh(tf.reshape(tf.matmul(x, tf.reshape(w, [DIM, 1])), [EXAMPLES]))
  err = pred - y
  loss = tf.reduce_mean(err * err)
  grad_pred = (2.0 / EXAMPLES) * err * (1.0 - pred * pred)
  grad = tf.reshape(tf.matmul(tf.transpose(x), tf.reshape(grad_pred, [EXAMPLES, 1])), [DIM])
  return -LR * grad, loss, tf.identity(weight), tf.identity(count)


def _client_step_np(w, x, y):
  pred = np.tanh(x @ w)
  err = pred - y
  grad = x.T @ ((2.0 / EXAMPLES) * err * (1.0 - pred**2))
  return -LR * grad, np.mean(err**2)


def build_round(secure: bool) -> fl.framework.ConcreteComputation:
  """``(<params@SERVER, {data}@CLIENTS> -> <params@SERVER, metrics@SERVER>)``, MapReduce-shaped.

  Broadcast, zip, map, apply, weighted and plain mean, sum, max, min; with ``secure`` also a secure sum of the
  clients' int32 counts (bitwidth 8), which only TFF's test context runs.
  """
  client = tf_computation(_client_step, fl.StructType([("w", PARAMS), ("data", DATA)]), CLIENT_OUT)
  server = tf_computation(lambda w, d: w + d, fl.StructType([("w", PARAMS), ("d", PARAMS)]), PARAMS)

  @fl.federated_computation(fl.FederatedType(PARAMS, fl.SERVER), fl.FederatedType(DATA, fl.CLIENTS))
  def round_(params, data):
    out = fl.federated_map(client, fl.federated_zip(
        {"w": fl.federated_broadcast(params), "data": data}))
    mean_delta = fl.federated_mean(out.delta, out.weight)
    new_params = fl.federated_map(server, fl.federated_zip({"w": params, "d": mean_delta}))
    metrics = {"loss": fl.federated_mean(out.loss), "loss_sum": fl.federated_sum(out.loss),
               "loss_max": fl.federated_max(out.loss), "count_min": fl.federated_min(out.count)}
    if secure:
      metrics["count"] = fl.federated_secure_sum_bitwidth(out.count, 8)
    return new_params, fl.federated_zip(metrics)

  return round_


def round_reference(params: np.ndarray, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """numpy reference of ``build_round``: outputs by manifest name."""
  steps = [_client_step_np(params.astype(np.float64), x, y) for x, y in zip(data["x"], data["y"])]
  deltas = np.stack([d for d, _ in steps])
  losses = np.array([loss for _, loss in steps])
  w = data["weight"].astype(np.float64)
  return {"params": params + (w[:, None] * deltas).sum(0) / w.sum(),
          "metrics/loss": losses.mean(), "metrics/loss_sum": losses.sum(),
          "metrics/loss_max": losses.max(), "metrics/count_min": data["count"].min(),
          "metrics/count": data["count"].sum()}


def round_inputs(num_clients: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "params": rng.normal(size=DIM).astype(F32),
      "data/x": rng.normal(size=(num_clients, EXAMPLES, DIM)).astype(F32),
      "data/y": rng.uniform(-0.9, 0.9, size=(num_clients, EXAMPLES)).astype(F32),
      "data/weight": rng.uniform(0.5, 2.0, size=num_clients).astype(F32),
      "data/count": rng.integers(1, 20, size=num_clients).astype(np.int32),
  }


def _leaf(name: str, placement: str | None, type_: fl.TensorType, path: Sequence) -> dict:
  return {"name": name, "placement": placement, "dtype": np.dtype(type_.dtype).name,
          "shape": list(type_.shape), "path": list(path)}


def round_signature(comp: fl.framework.ConcreteComputation, secure: bool) -> dict:
  """The manifest signature block of ``build_round``'s computation (protocol version 1)."""
  inputs = [_leaf("params", "SERVER", PARAMS, [0])] + [
      _leaf(f"data/{name}", "CLIENTS", t, [1, name]) for name, t in DATA.items()]
  metrics = [("loss", F32), ("loss_sum", F32), ("loss_max", F32), ("count_min", np.int32)]
  metrics += [("count", np.int32)] if secure else []
  outputs = [_leaf("params", "SERVER", PARAMS, [0])] + [
      _leaf(f"metrics/{name}", "SERVER", fl.TensorType(dtype), [1, name])
      for name, dtype in metrics]
  return {"type_signature": str(comp.type_signature), "inputs": inputs, "outputs": outputs}


def write_computation(export_dir: Path, comp: fl.framework.ConcreteComputation,
                      signature: dict) -> Path:
  export_dir.mkdir(parents=True)
  (export_dir / "computation.pb").write_bytes(comp.to_proto().SerializeToString(deterministic=True))
  (export_dir / "manifest.json").write_text(json.dumps(signature, indent=1))
  return export_dir


def build_initialize(init: np.ndarray) -> fl.framework.ConcreteComputation:
  """``( -> params@SERVER)``: the constant ``init`` placed at the server."""
  const = tf_computation(lambda: tf.constant(init), None, PARAMS)

  @fl.federated_computation()
  def initialize():
    return fl.federated_eval(const, fl.SERVER)

  return initialize


def write_iterative(export_dir: Path, init: np.ndarray, secure: bool = False) -> Path:
  """An iterative process: initialize.pb, next.pb (``build_round``) and their manifest blocks."""
  initialize, next_ = build_initialize(init), build_round(secure)
  next_block = round_signature(next_, secure)
  # The state (element 0 of next's parameter) is fed back by the runner, not read from the npz.
  next_block["inputs"] = [e for e in next_block["inputs"] if e["path"][0] != 0]
  init_block = {"type_signature": str(initialize.type_signature),
                "inputs": [], "outputs": [_leaf("params", "SERVER", PARAMS, [])]}
  export_dir.mkdir(parents=True)
  for name, comp in (("initialize", initialize), ("next", next_)):
    (export_dir / f"{name}.pb").write_bytes(comp.to_proto().SerializeToString(deterministic=True))
  (export_dir / "manifest.json").write_text(
      json.dumps({"initialize": init_block, "next": next_block}, indent=1))
  return export_dir


def build_client_outputs() -> fl.framework.ConcreteComputation:
  """``(<params@SERVER, {data}@CLIENTS> -> <{delta, loss}@CLIENTS, params@CLIENTS (all equal)>)``.

  Exercises client-placed results: the runner stacks them on a leading client axis.
  """
  client = tf_computation(_client_step, fl.StructType([("w", PARAMS), ("data", DATA)]), CLIENT_OUT)

  @fl.federated_computation(fl.FederatedType(PARAMS, fl.SERVER), fl.FederatedType(DATA, fl.CLIENTS))
  def per_client(params, data):
    sent = fl.federated_broadcast(params)
    out = fl.federated_map(client, fl.federated_zip({"w": sent, "data": data}))
    return out, sent

  return per_client


def client_outputs_signature(comp: fl.framework.ConcreteComputation) -> dict:
  inputs = round_signature(comp, secure=False)["inputs"]
  outputs = [_leaf(f"clients/{name}", "CLIENTS", t, [0, name]) for name, t in CLIENT_OUT.items()]
  outputs.append(_leaf("broadcast", "CLIENTS", PARAMS, [1]))
  return {"type_signature": str(comp.type_signature), "inputs": inputs, "outputs": outputs}


def client_outputs_reference(params: np.ndarray, data: dict[str, np.ndarray]) -> dict:
  steps = [_client_step_np(params.astype(np.float64), x, y) for x, y in zip(data["x"], data["y"])]
  return {"clients/delta": np.stack([d for d, _ in steps]),
          "clients/loss": np.array([loss for _, loss in steps]),
          "clients/weight": data["weight"], "clients/count": data["count"], "broadcast": params}


# ----------------------------------------------------------------------------------------------
# Client counts that no input carries (docs/tff_runner_protocol.md, "Number of clients")

SQ_OUT = fl.StructType([("sq", fl.TensorType(F32)), ("one", fl.TensorType(np.int32))])


def build_broadcast_only(secure: bool) -> fl.framework.ConcreteComputation:
  """``(<params@SERVER> -> <total, count, mean>@SERVER)``: no CLIENTS-placed input, so only the
  manifest's ``clients`` tells TFF how many clients the broadcast reaches. With ``secure`` the count
  is a secure sum (TFF's test context)."""
  client = tf_computation(lambda w: (tf.reduce_sum(w * w), tf.constant(1, tf.int32)), PARAMS,
                          SQ_OUT)

  @fl.federated_computation(fl.StructType([("params", fl.FederatedType(PARAMS, fl.SERVER))]))
  def broadcast_only(arg):
    out = fl.federated_map(client, fl.federated_broadcast(arg.params))
    count = (fl.federated_secure_sum_bitwidth(out.one, 8) if secure
             else fl.federated_sum(out.one))
    return fl.federated_zip({"total": fl.federated_sum(out.sq), "count": count,
                             "mean": fl.federated_mean(out.sq)})

  return broadcast_only


def broadcast_only_signature(comp: fl.framework.ConcreteComputation,
                             clients: int | None) -> dict:
  """The manifest as the exporter writes it: ``{"computation": block}``, ``clients`` in the block
  (left out when None)."""
  block = {"type_signature": str(comp.type_signature),
           "inputs": [_leaf("params", "SERVER", PARAMS, ["params"])],
           "outputs": [_leaf("total", "SERVER", fl.TensorType(F32), ["total"]),
                       _leaf("count", "SERVER", fl.TensorType(np.int32), ["count"]),
                       _leaf("mean", "SERVER", fl.TensorType(F32), ["mean"])]}
  if clients is not None:
    block["clients"] = clients
  return {"computation": block}


def broadcast_only_reference(params: np.ndarray, clients: int) -> dict[str, np.ndarray]:
  sq = np.sum(params.astype(np.float64) ** 2)
  return {"total": clients * sq, "count": np.int32(clients), "mean": sq}


def write_counting_process(export_dir: Path, init: np.ndarray, init_clients: int,
                           next_clients: int) -> Path:
  """An iterative process whose CLIENTS values all come from the server, so both blocks need their
  own ``clients``: ``initialize`` sums ``init`` over its clients; ``next(state, scale)`` broadcasts
  the state and returns ``<scale * (sum over clients of state), number of clients>``."""
  const = tf_computation(lambda: tf.constant(init), None, PARAMS)

  @fl.federated_computation()
  def initialize():
    return fl.federated_sum(fl.federated_eval(const, fl.CLIENTS))

  pair = fl.StructType([("w", PARAMS), ("one", fl.TensorType(np.int32))])
  client = tf_computation(lambda w: (tf.identity(w), tf.constant(1, tf.int32)), PARAMS, pair)
  scale = tf_computation(lambda t, s: t * s, fl.StructType([("t", PARAMS), ("s", fl.TensorType(F32))]),
                         PARAMS)

  @fl.federated_computation(fl.FederatedType(PARAMS, fl.SERVER),
                            fl.FederatedType(fl.TensorType(F32), fl.SERVER))
  def next_(state, s):
    out = fl.federated_map(client, fl.federated_broadcast(state))
    total = fl.federated_sum(out.w)
    return fl.federated_map(scale, fl.federated_zip({"t": total, "s": s})), fl.federated_sum(out.one)

  init_block = {"type_signature": str(initialize.type_signature), "clients": init_clients,
                "inputs": [], "outputs": [_leaf("state", "SERVER", PARAMS, [])]}
  next_block = {"type_signature": str(next_.type_signature), "clients": next_clients,
                "inputs": [_leaf("scale", "SERVER", fl.TensorType(F32), [1])],
                "outputs": [_leaf("state", "SERVER", PARAMS, [0]),
                            _leaf("count", "SERVER", fl.TensorType(np.int32), [1])]}
  export_dir.mkdir(parents=True)
  for name, comp in (("initialize", initialize), ("next", next_)):
    (export_dir / f"{name}.pb").write_bytes(comp.to_proto().SerializeToString(deterministic=True))
  (export_dir / "manifest.json").write_text(
      json.dumps({"kind": "iterative_process", "initialize": init_block, "next": next_block},
                 indent=1))
  return export_dir

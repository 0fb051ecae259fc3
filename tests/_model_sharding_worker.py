"""The 8-device side of tests/test_model_sharding.py: ``python _model_sharding_worker.py CASES OUT.json``
(run through ``tests/eight_devices.py``, which sets the 8 host devices).

Programs with model-sharded weights, run by faxbridge on a (``clients``, ``model``) mesh (and one
with a ``data`` axis), under both execution strategies, and the same programs written without
faxbridge: plain JAX on one device (the answer) and drjax 0.2.1 on the same mesh (the memory to
beat). For each it reports the round's values and gradients next to the answer's, the shardings of
its outputs, and the compiled per-device memory (``memory_analysis``: arguments, outputs,
temporaries). CASES is ``mlp`` (quick: issue 20's table) or ``transformer`` (slow).
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import drjax
import jax
import jax.numpy as jnp
import numpy as np

import faxbridge as fb
from benchmarks.transformer_model import Transformer, megatron_specs

P = jax.sharding.PartitionSpec
NS = jax.sharding.NamedSharding
CLIENTS = 8
STRATEGIES = {"vmap": "vmap", "stream": "auto"}  # auto on CPU: the scan over blocks of 8 clients


# -- the programs, written once for one client -------------------------------------------------------
def mlp_params(rng, d=512, h=512) -> dict:
  return {"w1": (rng.normal(size=(d, h)) / np.sqrt(d)).astype(np.float32),
          "w2": (rng.normal(size=(h, d)) / np.sqrt(h)).astype(np.float32)}


def mlp_loss(p: dict, x: jax.Array) -> jax.Array:
  """An autoencoder's squared error: ``relu(x w1) w2`` against ``x``."""
  return jnp.mean((jax.nn.relu(x @ p["w1"]) @ p["w2"] - x) ** 2)


# The transformer (benchmarks/transformer_model.py, shared with the big-model benchmark), Megatron-style.
# Per client 2 windows of 2 tokens: the activations (replicated over ``model``, as Megatron keeps the
# residual stream) stay under 1% of the weights, so per-device memory can be the unsharded figure over
# the model axis; with 4 x 8 tokens they are a third of it on the 1 x 8 mesh (drjax's too).
SMALL = Transformer(layers=4, d=128, heads=8, f=1024, t=2, vocab=32, batch=2)
transformer_params, transformer_loss, transformer_specs = SMALL.params, SMALL.loss, megatron_specs


def local_update(loss):
  """One client's work: one SGD step on its data."""
  def update(p, data):
    g = jax.grad(loss)(p, data)
    return jax.tree.map(lambda w, gw: w - 0.1 * gw, p, g)
  return update


# -- the same round three ways --------------------------------------------------------------------
def faxbridge_round(loss, mesh, strategy):
  """FedAvg: broadcast the weights, one local step per client, the mean of the clients' weights."""
  def round_(params, data):
    return fb.mean(fb.map(local_update(loss), fb.broadcast(params), data))
  return fb.computation(round_, in_placements=(fb.SERVER, fb.CLIENTS), mesh=mesh, strategy=strategy)


def faxbridge_loss(loss, mesh, strategy):
  """The clients' mean loss, differentiated from outside (its transpose: broadcast -> sum)."""
  def fed_loss(params, data):
    return fb.mean(fb.map(loss, fb.broadcast(params), data))
  return fb.computation(fed_loss, in_placements=(fb.SERVER, fb.CLIENTS), mesh=mesh, strategy=strategy)


def drjax_round(loss, mesh):
  @drjax.program(placements={"clients": CLIENTS})
  def round_(params, data):
    return drjax.reduce_mean(drjax.map_fn(local_update(loss), (drjax.broadcast(params, mesh=mesh), data),
                                          mesh=mesh))
  return round_


def plain_round(loss):
  """The answer: plain JAX on one device, a Python loop over the clients."""
  def round_(params, data):
    updated = [local_update(loss)(params, data[i]) for i in range(CLIENTS)]
    return jax.tree.map(lambda *ws: sum(ws) / CLIENTS, *updated)
  return jax.jit(round_)


def plain_grad(loss):
  return jax.jit(jax.grad(lambda p, data: sum(loss(p, data[i]) for i in range(CLIENTS)) / CLIENTS))


# -- measuring --------------------------------------------------------------------------------------
def compiled(fn, *args, options=None):
  """``fn`` compiled under an outer ``jax.jit`` (with XLA ``options``) for ``args``, and its
  per-device bytes (one device's share of a sharded program)."""
  return _measured(jax.jit(fn, compiler_options=options).lower(*args))


def _measured(lowered):
  exe = lowered.compile()
  m = exe.memory_analysis()
  return exe, {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
               "temporaries": int(m.temp_size_in_bytes)}


def max_diff(got, want) -> float:
  return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def specs(out) -> list:
  """Each leaf's PartitionSpec, trailing Nones dropped (``P('model', None)`` is ``P('model',)``)."""
  def one(leaf):
    spec = list(leaf.sharding.spec)
    while spec and spec[-1] is None:
      spec.pop()
    return str(P(*spec))
  return [one(leaf) for leaf in jax.tree.leaves(out)]


def shard_bytes(*trees) -> int:
  """The bytes of one device's shard of every leaf: what a program's arguments take per device."""
  return sum(leaf.addressable_shards[0].data.nbytes for t in trees for leaf in jax.tree.leaves(t))


def mesh_of(shape: dict) -> jax.sharding.Mesh:
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto)


def case(loss, params, data, param_specs, shape: dict, data_spec=None, direct=False) -> dict:
  """One mesh: faxbridge (both strategies) and drjax against the one-device answer.

  The rounds run as compiled for ``memory_analysis`` under an outer ``jax.jit`` (``memory``, XLA's
  default options, and drjax's the same); ``own_memory`` is the round as its own call compiles it
  (``Computation.lower``: with ``fb.compiler_options()``), beside drjax under those options
  (``drjax.own_memory``). With ``direct``, the rounds are also called as they are (the
  computation places its inputs itself).
  """
  mesh = mesh_of(shape)
  w = jax.device_put(params, jax.tree.map(lambda s: NS(mesh, s), param_specs))
  x = jax.device_put(data, NS(mesh, P("clients") if data_spec is None else data_spec))
  want, want_grad = plain_round(loss)(params, data), plain_grad(loss)(params, data)
  out: dict = {"mesh": shape, "model": shape.get("model", 1), "shard_bytes": shard_bytes(w, x),
               "param_specs": specs(w)}
  for name, strategy in STRATEGIES.items():
    rnd = faxbridge_round(loss, mesh, strategy)
    exe, mem = compiled(rnd, w, x)
    got = exe(w, x)
    grad = jax.grad(faxbridge_loss(loss, mesh, strategy))(w, x)
    out[name] = {"strategy": str(rnd.strategy_for(w, x)), "specs": specs(got), "grad_specs": specs(grad),
                 "value_diff": max_diff(got, want), "grad_diff": max_diff(grad, want_grad),
                 "memory": mem, "own_memory": _measured(rnd.lower(w, x))[1]}
    if direct:
      called = rnd(w, x)
      out[name].update(direct_specs=specs(called), direct_diff=max_diff(called, want))
  with jax.set_mesh(mesh):  # drjax reads the ambient mesh where it is not given one
    exe, mem = compiled(drjax_round(loss, mesh), w, x)
    got = exe(w, x)
    out["drjax"] = {"specs": specs(got), "value_diff": max_diff(got, want), "memory": mem,
                    "own_memory": compiled(drjax_round(loss, mesh), w, x,
                                           options=fb.compiler_options())[1]}
  return out


def unsharded(loss, params, data) -> dict:
  """The per-device memory of the same rounds on one device, no mesh."""
  return {name: compiled(faxbridge_round(loss, None, strategy), params, data)[1]
          for name, strategy in STRATEGIES.items()}


def constraint_inside_client_work() -> dict:
  """A sharding constraint written for one client (the hidden layer over ``model``): under the vmap
  strategy the lowered program constrains the clients' stacked values with the clients axis in
  front, ``[{"clients"}, {}, {"model"}]`` (``fb.map`` is SPMD over ``clients``); the value is
  unchanged."""
  rng = np.random.default_rng(2)
  params, data = mlp_params(rng), rng.normal(size=(CLIENTS, 32, 512)).astype(np.float32)
  mesh = mesh_of({"clients": 2, "model": 4})

  def loss(p, x):
    h = jax.lax.with_sharding_constraint(jax.nn.relu(x @ p["w1"]), NS(mesh, P(None, "model")))
    return jnp.mean((h @ p["w2"] - x) ** 2)

  rnd = faxbridge_round(loss, mesh, "vmap")
  text = jax.jit(rnd).lower(params, data).as_text()
  return {"constraints": sorted(set(re.findall(r"sharding_constraint %\w+ <@mesh, (\[.*?\])> : "
                                               r"tensor<8x32x512xf32>", text))),
          "value_diff": max_diff(rnd(params, data), plain_round(loss)(params, data))}


def mlp_cases() -> dict:
  """Issue 20's table: an MLP (w1 by columns, w2 by rows) on a 2 x 4 mesh, and a data axis."""
  rng = np.random.default_rng(0)
  params, data = mlp_params(rng), rng.normal(size=(CLIENTS, 32, 512)).astype(np.float32)
  param_specs = {"w1": P(None, "model"), "w2": P("model", None)}
  return {"unsharded": unsharded(mlp_loss, params, data), "inside": constraint_inside_client_work(),
          "cases": [case(mlp_loss, params, data, param_specs, {"clients": 2, "model": 4}, direct=True),
                    case(mlp_loss, params, data, param_specs, {"clients": 2, "data": 2, "model": 2},
                         P("clients", "data"))],
          "outer_jit_with_options": outer_jit_with_options(params, data, param_specs)}


def outer_jit_with_options(params, data, param_specs) -> dict:
  """The streamed MLP round on the data-axis mesh under a user's ``jax.jit`` given
  ``fb.compiler_options()``, beside the round's own compilation: the same per-device bytes."""
  mesh = mesh_of({"clients": 2, "data": 2, "model": 2})
  w = jax.device_put(params, jax.tree.map(lambda s: NS(mesh, s), param_specs))
  x = jax.device_put(data, NS(mesh, P("clients", "data")))
  rnd = faxbridge_round(mlp_loss, mesh, "auto")
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (w, x))
  return {"outer": compiled(rnd, w, x, options=fb.compiler_options())[1],
          "own": _measured(rnd.lower(w, x))[1], "options": fb.compiler_options(),
          "own_from_shapes": _measured(rnd.lower(*shapes))[1]}


def transformer_cases() -> dict:
  rng = np.random.default_rng(1)
  params = transformer_params(rng)
  data = SMALL.data(rng, CLIENTS)
  param_specs = transformer_specs(params)
  meshes = [{"clients": 2, "model": 4}, {"clients": 4, "model": 2}, {"clients": 1, "model": 8}]
  cases = [case(transformer_loss, params, data, param_specs, shape) for shape in meshes]
  cases.append(case(transformer_loss, params, data, param_specs,
                    {"clients": 2, "data": 2, "model": 2}, P("clients", "data")))
  return {"unsharded": unsharded(transformer_loss, params, data), "cases": cases,
          "parameters": sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))}


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  which, out_path = sys.argv[1], sys.argv[2]
  result = {"mlp": mlp_cases, "transformer": transformer_cases}[which]()
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)

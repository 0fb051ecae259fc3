"""One process of the multi-host test (tests/test_distributed.py): ``python _distributed_worker.py
PROCESS_ID NUM_PROCESSES PORT OUT.npz``.

Each process has 2 CPU devices; the mesh spans every process' devices with a ``clients`` axis. The
process runs one FedAvg round (examples.fedavg) and writes the outputs, as this process sees them,
to OUT.npz with the mesh and sharding facts the test checks; then the same round on a (``clients``,
``model``) mesh with model-sharded weights (its outputs gathered whole, with their specs).
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.experimental.multihost_utils
import numpy as np


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=60,
  )
  import faxbridge as fb
  from examples import fedavg

  mesh = jax.make_mesh((len(jax.devices()),), ("clients",))
  comp = fb.computation(
      fedavg.computation.fn, in_placements=fedavg.computation.in_placements, mesh=mesh
  )
  out = comp(*fedavg.example_inputs())
  leaves, _ = jax.tree_util.tree_flatten_with_path(out)
  result = {
      jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)) for path, leaf in leaves
  }
  result["_global_devices"] = np.asarray(len(jax.devices()))
  result["_local_devices"] = np.asarray(len(jax.local_devices()))
  result["_replicated"] = np.asarray(all(leaf.sharding.is_fully_replicated for _, leaf in leaves))
  result["_strategy"] = np.asarray(str(comp.strategy_for(*fedavg.example_inputs())))

  # The same round on a (clients, model) mesh, each process holding one clients group: w1 split by
  # columns, w2 by rows over `model`, placed from the host data every process has.
  P = jax.sharding.PartitionSpec
  mesh2 = jax.make_mesh((num_processes, 2), ("clients", "model"),
                        axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params, data = fedavg.example_inputs()
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
  params = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh2, specs[k])) for k, v in params.items()}
  comp2 = fb.computation(fedavg.computation.fn, in_placements=fedavg.computation.in_placements,
                         mesh=mesh2)
  new_params, _ = comp2(params, data)
  for k, leaf in new_params.items():
    whole = jax.experimental.multihost_utils.process_allgather(leaf, tiled=True)
    result[f"_model[{k!r}]"] = np.asarray(whole)
    result[f"_model_spec[{k!r}]"] = np.asarray(str(tuple(leaf.sharding.spec)))
  np.savez(out_path, **result)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

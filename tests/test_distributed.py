"""Multi-host execution through jax.distributed: two local CPU processes (2 devices each, a loopback
coordinator) run one FedAvg round over a mesh spanning all 4 devices, as clients and as (clients,
model) with model-sharded weights; the results equal the single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from examples import fedavg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_distributed_worker.py")
PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path) -> list[dict]:
  port = _free_port()
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  outs = [tmp_path / f"process{i}.npz" for i in range(PROCESSES)]
  logs = [tmp_path / f"process{i}.log" for i in range(PROCESSES)]
  procs = []
  try:
    for i in range(PROCESSES):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(i), str(PROCESSES), str(port), str(outs[i])],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ))
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:  # never leave a worker behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, code in enumerate(codes):
    assert code == 0, logs[i].read_text()[-4000:]
  return [dict(np.load(out)) for out in outs]


@pytest.mark.slow  # a multi-process run: two fresh Pythons, a coordinator, gloo collectives
@pytest.mark.timeout(300)
def test_fedavg_round_across_two_processes_equals_the_single_process_run(tmp_path):
  results = _run_workers(tmp_path)
  params, loss = fedavg.computation(*fedavg.example_inputs())
  leaves, _ = jax.tree_util.tree_flatten_with_path((params, loss))
  want = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
  for i, got in enumerate(results):
    assert int(got["_global_devices"]) == 4 and int(got["_local_devices"]) == 2, i
    assert bool(got["_replicated"]), i  # SERVER outputs are replicated over both processes
    # The default strategy on CPU: each device streams its clients inside shard_map.
    assert str(got["_strategy"]) == "('stream', 8)", i
    model = {k for k in got if k.startswith("_model")}
    assert set(got) - {"_global_devices", "_local_devices", "_replicated", "_strategy"} - model == set(want)
    # On a (clients, model) mesh across the processes: equal, and the weights stay model-sharded.
    for name in ("w1", "b1", "w2", "b2"):
      np.testing.assert_allclose(got[f"_model[{name!r}]"], want[f"[0][{name!r}]"], rtol=1e-5, atol=1e-6)
    assert str(got["_model_spec['w1']"]) == "(None, 'model')", i
    assert str(got["_model_spec['w2']"]).startswith("('model',"), i
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{i}{key}")
  # The round changed the model: the comparison is not between two copies of the input.
  assert not np.allclose(want["[0]['w1']"], fedavg.example_inputs()[0]["w1"])

"""The ``graph`` subcommand: plain-TF GraphDefs run in TF 2.14 (TFF is not imported)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import ProtocolError, error_text


def _tensor_name(name: str) -> str:
  return name if ":" in name else f"{name}:0"


def run_graph_jobs(jobs: list[dict], inputs: dict[str, np.ndarray], base: Path,
                   default_graph: str | None,
                   prefix: bool = True) -> tuple[dict[str, np.ndarray], list[dict]]:
  """Runs each job's GraphDef in its own tf.Graph and Session; returns outputs and job statuses.

  Outputs are keyed ``"{job index}/{name}"``, or just ``name`` without ``prefix`` (one job). A
  failing job is recorded in its status and the others still run.
  """
  import tensorflow as tf  # here, so that the caller can time the import apart

  outputs: dict[str, np.ndarray] = {}
  statuses: list[dict[str, Any]] = []
  cache: dict[Path, Any] = {}  # jobs often share one graph file: parse it once
  for i, job in enumerate(jobs):
    start = time.perf_counter()
    try:
      graph_file = job.get("graph", default_graph)
      if graph_file is None:
        raise ProtocolError(f"job {i} names no graph and no --graph was given")
      path = base / graph_file
      if path not in cache:
        cache[path] = tf.compat.v1.GraphDef.FromString(path.read_bytes())
      graph = tf.Graph()
      with graph.as_default():
        tf.graph_util.import_graph_def(cache[path], name="")
      feeds = {}
      for tensor, key in job.get("inputs", {}).items():
        if key not in inputs:
          raise ProtocolError(f"job {i}: input {tensor!r} names npz key {key!r}, which is absent")
        feeds[graph.get_tensor_by_name(_tensor_name(tensor))] = inputs[key]
      names = list(job["outputs"])
      fetches = [graph.get_tensor_by_name(_tensor_name(n)) for n in names]
      with tf.compat.v1.Session(graph=graph) as session:
        values = session.run(fetches, feed_dict=feeds)
      for name, value in zip(names, values):
        outputs[f"{i}/{name}" if prefix else name] = np.asarray(value)
      statuses.append({"ok": True, "error": None, "seconds": time.perf_counter() - start})
    except Exception as e:
      statuses.append({"ok": False, "error": error_text(e),
                       "seconds": time.perf_counter() - start})
  return outputs, statuses

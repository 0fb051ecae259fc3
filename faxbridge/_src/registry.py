"""The export targets and the runtimes that execute them: one table each, read by export, verify
and the CLI.

A target is ``export(program, example_args, out_dir, **options) -> manifest part``; a runtime is
``run(export_dir, manifest, inputs, rounds) -> RuntimeResult``. Their modules are imported on first
use (TensorFlow, federated_language and IREE take seconds to import), so the entries name them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class RuntimeResult:
  """What a runtime returns: outputs by name (``round{r}/NAME`` for iterative processes), and
  named extra result sets to compare the same way (e.g. TFF's MapReduceForm rebuild)."""

  outputs: dict[str, np.ndarray]
  extra_outputs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Entry:
  """A target or runtime: where its function lives, and what it needs to be installed."""

  name: str
  function: str  # "module:function", imported on first use
  summary: str
  reads: tuple[str, ...] = ()  # runtimes: the targets whose exports they execute
  needs: str = ""  # how to install what it needs, when that is not the core environment

  def load(self) -> Callable[..., Any]:
    module, fn = self.function.split(":")
    return getattr(importlib.import_module(module), fn)


TARGETS: dict[str, Entry] = {e.name: e for e in (
    Entry("tff", "faxbridge.converters.tff.export:export_tff",
          "federated_language computation protos (TFF 0.87), plain-TF or XLA local computations"),
    Entry("stablehlo", "faxbridge.converters.stablehlo.export:export_stablehlo",
          "a StableHLO module per piece and plan.json"),
    Entry("tflite", "faxbridge.converters.tflite.export:export_tflite",
          "a TFLite model per piece (builtins only) and plan.json"),
)}

RUNTIMES: dict[str, Entry] = {e.name: e for e in (
    Entry("tff", "faxbridge.converters.runtimes.tff.verify:verify_run",
          "TensorFlow Federated 0.87's native context, in .venv-tff", reads=("tff",),
          needs="make .venv-tff/.ready"),
    Entry("iree", "faxbridge.converters.runtimes.iree:verify_run",
          "IREE (llvm-cpu, local-task), orchestrated from plan.json", reads=("stablehlo",)),
    Entry("litert", "faxbridge.converters.runtimes.litert:verify_run",
          "LiteRT's builtin kernels, orchestrated from plan.json", reads=("tflite",)),
    Entry("jax", "faxbridge.converters.runtimes.jax_export:verify_run",
          "jax.export pieces reloaded in a fresh process, orchestrated from plan.json",
          reads=("stablehlo",)),
)}


def lookup(table: dict[str, Entry], name: str, what: str, error: type[Exception]) -> Entry:
  if name not in table:
    raise error(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
  return table[name]


__all__ = ["RUNTIMES", "TARGETS", "Entry", "RuntimeResult", "lookup"]

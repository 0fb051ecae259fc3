"""``fb.verify``: run an export on its target runtime and natively on the same inputs, and compare.

Before anything runs, every file is checked against the sha256 in the manifest; a tampered export
is reported and nothing is executed. The native side is the ``jax.export`` artifact stored in the
export (the computation itself, compiled by XLA), so an export verifies without its Python source.

Tolerance (documented contract): float outputs must satisfy ``|runtime - native| <= atol + rtol *
|native|`` elementwise with ``rtol = 1e-5`` and ``atol = 1e-6`` (float32 rounding differs between
XLA, TensorFlow and TFLite kernels; ``atol`` covers values that cancel to about zero). Integer and
boolean outputs must be equal.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from faxbridge import registry
from faxbridge.errors import VerificationError
from faxbridge.export import read_manifest, sha256
from faxbridge.registry import RuntimeResult

RTOL, ATOL = 1e-5, 1e-6


@dataclasses.dataclass(frozen=True)
class OutputCheck:
  name: str
  max_abs: float
  max_rel: float
  ok: bool


@dataclasses.dataclass
class VerificationReport:
  """Per output, the largest absolute and relative difference between runtime and native."""

  export_dir: str
  runtime: str
  checks: list[OutputCheck]
  extra_checks: dict[str, list[OutputCheck]]
  info: dict[str, Any]

  @property
  def ok(self) -> bool:
    return all(c.ok for c in self.checks) and all(
        c.ok for checks in self.extra_checks.values() for c in checks)

  @property
  def max_abs(self) -> float:
    return max((c.max_abs for c in self.checks), default=0.0)

  @property
  def max_rel(self) -> float:
    return max((c.max_rel for c in self.checks), default=0.0)

  def raise_if_failed(self) -> VerificationReport:
    if not self.ok:
      raise VerificationError(f"verification failed:\n{self}")
    return self

  def __str__(self) -> str:
    lines = [f"{self.export_dir} on {self.runtime}: {'OK' if self.ok else 'MISMATCH'} "
             f"(rtol={RTOL}, atol={ATOL})",
             f"  {'output':40s} {'max abs err':>12s} {'max rel err':>12s}"]
    for label, checks in [("", self.checks), *self.extra_checks.items()]:
      if label:
        lines.append(f"  [{label}]")
      for c in checks:
        mark = "" if c.ok else "  <-- exceeds tolerance"
        lines.append(f"  {c.name:40s} {c.max_abs:12.3g} {c.max_rel:12.3g}{mark}")
    for key, value in sorted(self.info.items()):
      lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def check_files(export_dir: Path, manifest: dict) -> None:
  """Every file listed has its sha256; anything unlisted or missing is refused."""
  problems = []
  for rel, digest in sorted(manifest.get("files", {}).items()):
    path = export_dir / rel
    if not path.is_file():
      problems.append(f"{rel}: missing")
    elif sha256(path) != digest:
      problems.append(f"{rel}: sha256 mismatch (manifest {digest[:12]}..., file "
                      f"{sha256(path)[:12]}...)")
  listed = set(manifest.get("files", {})) | {"manifest.json"}
  for path in sorted(export_dir.rglob("*")):
    rel = str(path.relative_to(export_dir))
    if path.is_file() and rel not in listed:
      problems.append(f"{rel}: not in the manifest")
  if problems:
    raise VerificationError(
        f"{export_dir} does not match its manifest, so nothing was run:\n  " + "\n  ".join(problems))


def compare(name: str, native, other, rtol: float = RTOL, atol: float = ATOL) -> OutputCheck:
  a, b = np.asarray(native), np.asarray(other)
  if a.shape != b.shape:
    return OutputCheck(name, float("inf"), float("inf"), False)
  if a.dtype.kind in "biu" or a.dtype == bool:
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    max_abs = float(diff.max(initial=0))
    return OutputCheck(name, max_abs, max_abs / max(float(np.abs(a).max(initial=1)), 1.0),
                       max_abs == 0)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  diff = np.abs(a64 - b64)
  rel = diff / np.maximum(np.abs(a64), np.finfo(np.float32).tiny)
  ok = bool(np.all(diff <= atol + rtol * np.abs(a64)))
  return OutputCheck(name, float(diff.max(initial=0)), float(rel.max(initial=0)), ok)


def _blocks(manifest: dict) -> tuple[dict, dict | None]:
  if manifest["kind"] == "iterative_process":
    return manifest["next"], manifest["initialize"]
  return manifest["computation"], None


def _named_inputs(block: dict, args, inputs: Mapping | None) -> dict[str, np.ndarray]:
  specs = block["inputs"]
  if inputs is not None:
    missing = [s["name"] for s in specs if s["name"] not in inputs]
    if missing:
      raise VerificationError(f"inputs lack {missing}; expected names {[s['name'] for s in specs]}")
    flat = [inputs[s["name"]] for s in specs]
  else:
    flat = jax.tree.leaves(args)
    if len(flat) != len(specs):
      raise VerificationError(f"got {len(flat)} input leaves, the export takes {len(specs)}: "
                              f"{[s['name'] for s in specs]}")
  out = {}
  for spec, value in zip(specs, flat):
    value = np.asarray(value)
    if value.dtype != np.dtype(spec["dtype"]):
      raise VerificationError(f"input {spec['name']} has dtype {value.dtype}, the export takes "
                              f"{spec['dtype']}")
    out[spec["name"]] = value
  return out


def _load_native(export_dir: Path, manifest: dict, name: str):
  return jax.export.deserialize(bytearray((export_dir / manifest["native"][name]).read_bytes()))


def native_outputs(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
                   rounds: int) -> dict[str, np.ndarray]:
  """Run the stored jax.export artifact(s): outputs keyed as the runtimes key theirs."""
  block, init_block = _blocks(manifest)
  if init_block is None:
    exported = _load_native(export_dir, manifest, "computation")
    flat = [inputs[s["name"]] for s in block["inputs"]]
    args, _ = jax.tree.unflatten(exported.in_tree, flat)
    leaves = jax.tree.leaves(exported.call(*args))
    return {s["name"]: np.asarray(v) for s, v in zip(block["outputs"], leaves)}
  init = _load_native(export_dir, manifest, "initialize")
  nxt = _load_native(export_dir, manifest, "next")
  state = init.call()
  out = {f"initialize/{s['name']}": np.asarray(v)
         for s, v in zip(init_block["outputs"], jax.tree.leaves(state))}
  rest = [inputs[s["name"]] for s in block["inputs"]]
  for r in range(1, rounds + 1):
    (args, _) = jax.tree.unflatten(nxt.in_tree, [*jax.tree.leaves(state), *rest])
    result = nxt.call(*args)
    out.update({f"round{r}/{s['name']}": np.asarray(v)
                for s, v in zip(block["outputs"], jax.tree.leaves(result))})
    state = result[0] if isinstance(result, tuple) else result
  return out


def _runtime(name: str):
  return registry.lookup(registry.RUNTIMES, name, "runtime", VerificationError).load()


def run_on_runtime(export_dir: str | os.PathLike, runtime: str, inputs: Mapping[str, np.ndarray],
                   rounds: int = 1) -> RuntimeResult:
  """Run an export on ``runtime`` alone (no native side, no comparison): its outputs by name.

  ``inputs`` are leaves by manifest name; outputs are keyed as :func:`verify` keys them (``NAME``,
  or ``initialize/NAME`` and ``round{r}/NAME``). The export's files are checked first.
  """
  export_dir = Path(export_dir).resolve()
  manifest = read_manifest(export_dir)
  check_files(export_dir, manifest)
  block, _ = _blocks(manifest)
  named = _named_inputs(block, (), dict(inputs))
  rounds = rounds if manifest["kind"] == "iterative_process" else 0
  return _runtime(runtime)(export_dir, manifest, named, rounds)


def verify(
    export_dir: str | os.PathLike,
    *args: Any,
    runtime: str = "tff",
    inputs: Mapping[str, np.ndarray] | None = None,
    rounds: int = 5,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> VerificationReport:
  """Run ``export_dir`` on ``runtime`` and natively with the same inputs; compare every output.

  Inputs are the computation's arguments as a pytree (``*args``; for an iterative process the
  arguments of ``next`` after the state) or leaves by manifest name (``inputs=``). An iterative
  process runs ``rounds`` rounds on both sides and every round's outputs are compared.

  Raises:
    VerificationError: the export does not match its manifest (nothing runs), inputs do not fit,
      or the runtime is missing (the message names the command that sets it up).
  """
  export_dir = Path(export_dir).resolve()
  manifest = read_manifest(export_dir)
  check_files(export_dir, manifest)
  block, _ = _blocks(manifest)
  named = _named_inputs(block, args, inputs)
  rounds = rounds if manifest["kind"] == "iterative_process" else 0
  result = _runtime(runtime)(export_dir, manifest, named, rounds)
  expected = native_outputs(export_dir, manifest, named, rounds)
  checks = [compare(k, v, result.outputs.get(k, np.full(np.shape(v), np.nan)), rtol, atol)
            for k, v in expected.items()]
  extra = {label: [compare(k, v, outs.get(k, np.full(np.shape(v), np.nan)), rtol, atol)
                   for k, v in expected.items()]
           for label, outs in result.extra_outputs.items()}
  return VerificationReport(str(export_dir), runtime, checks, extra, result.info)

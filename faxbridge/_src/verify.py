"""``fb.verify``: run an export on its target runtime and natively on the same inputs, and compare.

Before anything runs, the export is read as untrusted input (``export_reader``): its manifest valid
under its schema, every file contained in it and pinned by its sha256; a damaged, tampered or
hostile export is reported and nothing is executed. The native side is the ``jax.export`` artifact
stored in the export (the computation itself, compiled by XLA), so an export verifies without its
Python source.

Tolerance (documented contract): float outputs must satisfy ``|runtime - native| <= atol + rtol *
|native|`` elementwise with ``rtol = 1e-5`` and ``atol = 1e-6`` (float32 rounding differs between
XLA, TensorFlow and TFLite kernels; ``atol`` covers values that cancel to about zero). Each output's
``max_ratio`` is its margin against that bound (the largest ``|runtime - native| / (atol + rtol *
|native|)``; at most 1 passes), so a relative error above ``rtol`` that ``atol`` covers reads as the
pass it is. Integer and
boolean outputs must be equal. An output must also have the native dtype and shape (a float ``3.0``
is not an integer ``3``), and every native output must come back from the runtime: anything else
fails that output with the reason in the report.

Inputs are checked against the manifest (names, dtypes, per-client shapes, one number of clients)
before any runtime starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from faxbridge._src import registry, render, signing
from faxbridge._src.errors import VerificationError
from faxbridge._src.events import emit
from faxbridge._src.export import ANY_CLIENTS
from faxbridge._src.export_reader import check_files, contained_file, read_export_manifest
from faxbridge._src.form import run_program
from faxbridge._src.registry import RuntimeResult

RTOL, ATOL = 1e-5, 1e-6
# The dtypes JAX makes only with jax_enable_x64 on (32-bit otherwise).
WIDE_DTYPES = ("float64", "complex128", "int64", "uint64")


@dataclasses.dataclass(frozen=True)
class OutputCheck:
  """One output compared: the largest absolute and relative difference from native, and
  ``max_ratio``, the largest ``|runtime - native| / (atol + rtol * |native|)`` over its elements
  (its margin against the tolerance: a float output passes when it is at most 1; integers and
  booleans have no slack, so it is 0 when they are equal and infinite when not)."""

  name: str
  max_abs: float
  max_rel: float
  max_ratio: float
  ok: bool
  problem: str = ""  # why it failed other than by tolerance: dtype, shape, missing, unexpected


@dataclasses.dataclass
class VerificationReport:
  """Every output of one run on a runtime compared with native, and of each further run the
  runtime made (``extra_checks``, e.g. TFF's round rebuilt from its MapReduceForm).

  ``info`` is what the runtime tells the reader, by label (``{"execution context": "..."}``);
  ``labels`` names outputs as the user indexes them (``out_0_w1`` -> ``out[0]['w1']``); ``rounds``
  is 0 for a computation. Printed, it is the report the command line prints (one renderer:
  :func:`faxbridge._src.render.verification_text`).
  """

  export_dir: str
  runtime: str
  checks: list[OutputCheck]
  extra_checks: dict[str, list[OutputCheck]]
  info: dict[str, Any]
  rounds: int = 0
  rtol: float = RTOL
  atol: float = ATOL
  labels: dict[str, str] = dataclasses.field(default_factory=dict)

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

  @property
  def max_ratio(self) -> float:
    """The smallest margin of any comparison against the tolerance (at most 1: all pass)."""
    return max((c.max_ratio for c in self.all_checks()), default=0.0)

  def all_checks(self) -> list[OutputCheck]:
    """Every comparison: the runtime's outputs, then each further run's."""
    return [*self.checks, *(c for checks in self.extra_checks.values() for c in checks)]

  def raise_if_failed(self) -> VerificationReport:
    if not self.ok:
      raise VerificationError(f"verification failed:\n{self}")
    return self

  def __str__(self) -> str:
    return render.verification_text(self)


def compare(name: str, native: Any, other: Any, rtol: float = RTOL,
            atol: float = ATOL) -> OutputCheck:
  """One output: ``other`` (the runtime's) against ``native``.

  Dtypes and shapes must be equal (a runtime that returns float ``3.0`` for an integer ``3`` is not
  computing the same program); integers and booleans must then be equal, floats within
  ``atol + rtol * |native|``. NaN matches NaN and an infinity the same infinity, as the native
  program computed them.
  """
  a, b = np.asarray(native), np.asarray(other)
  inf = float("inf")
  if a.dtype != b.dtype:
    return OutputCheck(name, inf, inf, inf, False, f"dtype {b.dtype}, native {a.dtype}")
  if a.shape != b.shape:
    return OutputCheck(name, inf, inf, inf, False, f"shape {b.shape}, native {a.shape}")
  if a.dtype.kind not in "fc":
    # Exact: differences are reported in float64 only to size them (uint64 cannot go via int64).
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    max_abs = float(diff.max(initial=0))
    scale = max(float(np.abs(a.astype(np.float64)).max(initial=1)), 1.0)
    equal = bool(np.array_equal(a, b))
    return OutputCheck(name, max_abs, max_abs / scale, 0.0 if equal else inf, equal)
  wide = np.complex128 if a.dtype.kind == "c" else np.float64
  a64, b64 = a.astype(wide), b.astype(wide)
  same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
  with np.errstate(invalid="ignore", over="ignore"):
    diff = np.where(same, 0.0, np.abs(a64 - b64))
  diff = np.where(np.isnan(diff), np.inf, diff)  # NaN against a number: as far off as it gets
  # An infinite native value allows no slack (else atol + rtol * inf would accept anything).
  bound = atol + rtol * np.where(np.isfinite(a64), np.abs(a64), 0.0)
  ok = bool(np.all(diff <= bound))
  with np.errstate(invalid="ignore", divide="ignore"):
    rel = diff / np.maximum(np.abs(a64), np.finfo(np.float32).tiny)
    # 0 / 0 (an exact match with no slack: atol = rtol = 0) is no miss; x / 0 for x > 0 is inf.
    ratio = np.where(diff == 0, 0.0, diff / bound)
  return OutputCheck(name, float(diff.max(initial=0)), float(np.nanmax(rel, initial=0)),
                     float(ratio.max(initial=0)), ok)


def compare_all(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                rtol: float = RTOL, atol: float = ATOL) -> list[OutputCheck]:
  """Every native output against the runtime's; one it did not return fails as missing, and one
  the native program has no such output fails as unexpected (a runtime keyed them differently)."""
  inf = float("inf")
  checks = [compare(k, v, got[k], rtol, atol) if k in got else
            OutputCheck(k, inf, inf, inf, False, "missing: the runtime returned no such output")
            for k, v in expected.items()]
  checks += [OutputCheck(k, inf, inf, inf, False, "unexpected: not a native output")
             for k in got if k not in expected]
  return checks


def signature_blocks(manifest: dict) -> tuple[dict, dict | None]:
  """The manifest blocks whose inputs a caller passes: ``computation``'s, or ``next``'s (after
  the state) with ``initialize``'s second."""
  if manifest["kind"] == "iterative_process":
    return manifest["next"], manifest["initialize"]
  return manifest["computation"], None


def _named_inputs(block: dict, args: Any, inputs: Mapping | None) -> dict[str, np.ndarray]:
  """The inputs by manifest name, checked against the manifest before anything runs.

  Names must be exactly the manifest's, dtypes equal, SERVER values of the manifest's shape, and
  CLIENTS values of ``(clients, *per-client shape)`` with one number of clients for all of them.

  Raises:
    VerificationError: naming the first input that does not fit and what the export takes.
  """
  specs = block["inputs"]
  names = [s["name"] for s in specs]
  if inputs is not None:
    unknown = sorted(set(inputs) - set(names))
    if unknown:
      raise VerificationError(f"unknown input(s) {unknown}; the export takes {names}")
    missing = [n for n in names if n not in inputs]
    if missing:
      raise VerificationError(f"missing input(s) {missing}: the inputs lack them; the export "
                              f"takes {names}")
    flat = [inputs[n] for n in names]
  else:
    flat = jax.tree.leaves(args)
    if len(flat) != len(specs):
      raise VerificationError(f"got {len(flat)} input leaves, the export takes {len(specs)}: "
                              f"{names}")
  out, clients = {}, {}
  for spec, value in zip(specs, flat):
    if type(value) in (bool, int, float, complex):  # not np.float64, a float subclass
      # A Python scalar has no dtype of its own (JAX types it weakly, and so did the export).
      value = np.asarray(value, dtype=np.dtype(spec["dtype"]))
    name, shape, value = spec["name"], tuple(spec["shape"]), np.asarray(value)
    if value.dtype != np.dtype(spec["dtype"]):
      raise VerificationError(f"input {name!r} has dtype {value.dtype}, the export takes "
                              f"{spec['dtype']}")
    if spec.get("placement") == "CLIENTS":
      if value.shape[1:] != shape or value.ndim != len(shape) + 1:
        raise VerificationError(
            f"input {name!r} (CLIENTS) has shape {value.shape}, the export takes (clients, "
            f"{', '.join(map(str, shape))}{',' if len(shape) == 1 else ''}): a leading clients "
            f"axis, then {shape} per client")
      clients[name] = value.shape[0]
    elif value.shape != shape:
      raise VerificationError(f"input {name!r} ({spec.get('placement', 'SERVER')}) has shape "
                              f"{value.shape}, the export takes {shape}")
    out[name] = value
  if len(set(clients.values())) > 1:
    raise VerificationError("CLIENTS inputs disagree on the number of clients: "
                            + ", ".join(f"{n!r} has {c}" for n, c in clients.items()))
  return out


def _check_native_shapes(export_dir: Path, manifest: dict, named: dict[str, np.ndarray]) -> None:
  """The stored native program was exported for fixed shapes (the example's number of clients):
  refuse other shapes here, before a runtime starts, rather than fail after it ran."""
  block, init_block = signature_blocks(manifest)
  exported = _load_native(export_dir, manifest, "next" if init_block is not None else "computation")
  avals = exported.in_avals[len(exported.in_avals) - len(block["inputs"]):]
  for spec, aval in zip(block["inputs"], avals):
    want, got = tuple(aval.shape), named[spec["name"]].shape
    if all(isinstance(d, int) for d in want) and got != want:
      clients = f" ({want[0]} clients)" if spec.get("placement") == "CLIENTS" and want else ""
      raise VerificationError(
          f"input {spec['name']!r} has shape {got}, the export's native program was made for "
          f"{want}{clients}; verify runs it, so inputs must have its shapes (run_on_runtime "
          "runs the runtime alone for other client counts)")


def _load_native(export_dir: Path, manifest: dict, name: str, block: str = "native"):
  path = contained_file(export_dir, manifest[block][name], f"manifest.json $.{block}.{name}")
  try:
    return jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # a pinned file of another kind (its sha256 matched: written so)
    raise VerificationError(f"{path} is not a jax.export serialization ({type(e).__name__}); the "
                            "export's native program cannot be run") from None


def native_outputs(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
                   rounds: int, clients: Mapping[str, Sequence[int]] | None = None
                   ) -> dict[str, np.ndarray]:
  """Run the stored jax.export artifact(s) of the whole computation(s), rounds fed back as the
  manifest's ``state`` links say: outputs keyed as the runtimes key theirs.

  ``clients``: invocations (``computation``, ``initialize``, ``round{r}``) to run on some of the
  clients only, with the indices of those clients (``RuntimeResult.clients``): each runs on exactly
  their data, with the export's native program for any number of clients, and the state flows on
  from it.
  """
  names = ("computation",) if manifest["kind"] == "computation" else ("initialize", "next")
  loaded = {name: _load_native(export_dir, manifest, name) for name in names}
  state_names = [link["to"] for link in manifest.get("state", {}).get("initialize_to_next", [])]
  rounds_run = iter(range(1, rounds + 1))

  def run(name: str, named: dict) -> dict:
    block = manifest[name]
    order = [*(state_names if name == "next" else ()), *(s["name"] for s in block["inputs"])]
    invocation = f"round{next(rounds_run)}" if name == "next" else name
    exported = loaded[name]
    if clients and invocation in clients:
      named, exported = _on_clients(export_dir, manifest, name, invocation, named,
                                    list(clients[invocation]), exported)
    args, _ = jax.tree.unflatten(exported.in_tree, [named[n] for n in order])
    leaves = jax.tree.leaves(exported.call(*args))
    return {s["name"]: np.asarray(v) for s, v in zip(block["outputs"], leaves)}

  emit("verify.native", "running natively (XLA)")
  return run_program(manifest["kind"], run, inputs, rounds, manifest.get("state"), who="native")


def _on_clients(export_dir: Path, manifest: dict, name: str, invocation: str, named: dict,
                indices: list[int], full: Any) -> tuple[dict, Any]:
  """The inputs of ``invocation`` restricted to the clients ``indices`` (a runtime's report of
  which clients it aggregated, checked here), and the native program to run them with: ``full``
  for all clients, else the export's program for any number of clients.

  Raises:
    VerificationError: the indices are not distinct clients of the inputs in increasing order,
      ``name`` has no CLIENTS input, or the export has no native program for another number of
      clients.
  """
  specs = [s for s in manifest[name]["inputs"] if s.get("placement") == "CLIENTS"]
  if not specs:
    raise VerificationError(f"the runtime ran {invocation} on clients {indices} only, but {name} "
                            "takes no CLIENTS input to run them on")
  total = int(named[specs[0]["name"]].shape[0])
  valid = all(type(i) is int for i in indices) and indices == sorted(set(indices))
  if not indices or not valid or not 0 <= indices[0] <= indices[-1] < total:
    raise VerificationError(f"the runtime reports that it ran {invocation} on clients {indices}: "
                            f"not distinct clients of 0..{total - 1} in increasing order")
  if indices == list(range(total)):
    return named, full
  if name not in manifest.get(ANY_CLIENTS, {}):
    raise VerificationError(
        f"the runtime ran {invocation} on {len(indices)} of the {total} clients ({indices}), and "
        f"the export holds no native program of {name} for a number of clients other than {total} "
        f"(manifest.json ${ANY_CLIENTS}), so that round cannot be checked against native")
  restricted = {**named, **{s["name"]: named[s["name"]][indices] for s in specs}}
  return restricted, _load_native(export_dir, manifest, name, ANY_CLIENTS)


def chosen_runtime(manifest: dict, name: str | None) -> registry.Runtime:
  """The runtime called ``name``; None: the first runtime that reads the export's target.

  Raises:
    VerificationError: an unknown runtime (listing the known ones), one that does not read the
      export's target (naming those that do), or none reads the target.
  """
  target = manifest.get("target")
  readers = registry.readers(target) if target else []
  if name is not None:
    chosen = registry.runtime(name)
    if chosen not in readers:
      can = (f"the runtimes that read it: {', '.join(r.name for r in readers)}" if readers
             else "no registered runtime reads it")
      raise VerificationError(f"runtime {name!r} does not read exports of target {target!r}; {can}")
    return chosen
  if not readers:
    raise VerificationError(f"no registered runtime reads exports of target {target!r} (known "
                            f"runtimes: {', '.join(registry.runtimes()) or 'none'})")
  return readers[0]


def _run(runtime: registry.Runtime, export_dir: Path, manifest: dict, named: dict[str, np.ndarray],
         rounds: int, options: Mapping[str, Any]) -> RuntimeResult:
  emit("verify.load", f"loading runtime {runtime.name}", runtime=runtime.name)
  run = runtime.load()
  emit("verify.runtime", f"running on {runtime.name}", runtime=runtime.name)
  return run(export_dir, manifest, named, rounds, **options)


def run_on_runtime(export_dir: str | os.PathLike, runtime: str | None,
                   inputs: Mapping[str, np.ndarray], rounds: int = 1,
                   trust: str | os.PathLike | None = None, **options: Any) -> RuntimeResult:
  """Run an export on ``runtime`` alone (no native side, no comparison): its outputs by name.

  ``inputs`` are leaves by manifest name; outputs are keyed as :func:`verify` keys them (``NAME``,
  or ``initialize/NAME`` and ``round{r}/NAME``). The export's signature (with ``trust``, as
  :func:`verify` checks it) and files are checked first. ``options``: the runtime's own (as for
  :func:`verify`).
  """
  export_dir = Path(export_dir).resolve()
  signed = None if trust is None else signing.check_signature(export_dir, trust)
  manifest = read_export_manifest(export_dir, signed)
  check_files(export_dir, manifest)
  block, _ = signature_blocks(manifest)
  named = _named_inputs(block, (), dict(inputs))
  rounds = rounds if manifest["kind"] == "iterative_process" else 0
  chosen = chosen_runtime(manifest, runtime)
  return _run(chosen, export_dir, manifest, named, rounds, chosen.check_options(options))


def verify(
    export_dir: str | os.PathLike,
    *args: Any,
    runtime: str | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    rounds: int = 5,
    rtol: float = RTOL,
    atol: float = ATOL,
    trust: str | os.PathLike | None = None,
    **options: Any,
) -> VerificationReport:
  """Run ``export_dir`` on ``runtime`` and natively with the same inputs; compare every output.

  An output passes when ``|runtime - native| <= atol + rtol * |native|`` elementwise (floats;
  ``rtol=1e-5``, ``atol=1e-6``), or is equal (integers, booleans), with the native dtype and
  shape. The native side is the export's stored ``native/`` program. ``runtime`` is a registered
  runtime (``faxbridge targets`` lists them; built in: ``"tff"`` reads the tff target, ``"iree"``
  and ``"jax"`` the stablehlo target, ``"litert"`` the tflite target); None: the first runtime
  that reads the export's target.

  Inputs are the computation's arguments as a pytree (``*args``; for an iterative process the
  arguments of ``next`` after the state) or leaves by manifest name (``inputs=``). An iterative
  process runs ``rounds`` rounds on both sides and every round's outputs are compared.

  ``trust``: an Ed25519 public key file (``fb.keygen`` writes a pair). The export must then carry
  that key's signature of its manifest (``fb.export(..., sign_with=PRIVATE_KEY)``), checked
  before anything else of the export is read; None: a signature, if any, is not checked
  (docs/security.md says what each guarantees).

  ``options``: the runtime's own options (``faxbridge targets`` lists them; e.g. the ``flower``
  runtime's ``min_clients=3``), checked before anything runs. A runtime that ran an invocation on
  some of the clients only (a federation's round completed over the nodes that replied) says which
  (``RuntimeResult.clients``); that invocation is compared with the native program run on exactly
  those clients' data, and the state flows on from it on both sides.

  Returns:
    A report: ``ok``, per output ``checks`` (name, max absolute and relative error, ``max_ratio``:
    the margin against the tolerance, ok), the runtime's further runs (``extra_checks``) and notes
    (``info``); printed, the report ``faxbridge verify`` prints.

  Example:
    >>> total = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
    >>> x = np.arange(6, dtype=np.float32).reshape(3, 2)  # 3 clients
    >>> out = fb.export(total, x, target="stablehlo", out_dir="total_iree")
    >>> report = fb.verify(out, x, runtime="iree")
    >>> report.ok, [(c.name, c.max_abs) for c in report.checks]
    (True, [('out', 0.0)])

  Raises:
    VerificationError: no export or manifest there, with ``trust`` the export is unsigned or not
      signed by that key (nothing else is read), the export does not match its manifest
      (nothing runs), inputs do not fit (names, dtypes, shapes, numbers of clients: nothing runs),
      or the runtime is missing (the message names the command that sets it up), or an unknown
      option. A mismatch of outputs is not raised: it is the report's ``ok`` (``raise_if_failed``
      raises it).
    RoundFailedError: (a VerificationError) a round failed on the runtime after it started (a
      node of a federation dropped out): the message says where the last completed round's state
      is kept, to resume from.
  """
  export_dir = Path(export_dir).resolve()
  trusted = None if trust is None else signing.load_public_key(trust)
  # With trust, the manifest parsed is the bytes the signature was checked on (no second read).
  signed = None if trusted is None else signing.check_signature(export_dir, trusted)
  manifest = read_export_manifest(export_dir, signed)
  check_files(export_dir, manifest)
  block, _ = signature_blocks(manifest)
  named = _named_inputs(block, args, inputs)
  _check_native_shapes(export_dir, manifest, named)
  wide = [n for n, v in named.items() if v.dtype.name in WIDE_DTYPES]
  if wide and not jax.config.jax_enable_x64:
    # The native program (here) and runtime 'jax' would fail deep inside jax.export on these.
    raise VerificationError(f"the export takes 64-bit input(s) {wide} but jax_enable_x64 is off "
                            "in this process; run with JAX_ENABLE_X64=1")
  if manifest["kind"] == "iterative_process" and rounds < 1:
    raise VerificationError(f"rounds={rounds}: an iterative process runs at least 1 round")
  rounds = rounds if manifest["kind"] == "iterative_process" else 0
  chosen = chosen_runtime(manifest, runtime)  # an unknown runtime is refused before anything runs
  options = chosen.check_options(options)  # and so is an option it does not take
  result = _run(chosen, export_dir, manifest, named, rounds, options)
  expected = native_outputs(export_dir, manifest, named, rounds, result.clients)
  checks = compare_all(expected, result.outputs, rtol, atol)
  extra = {label: compare_all(expected, outs, rtol, atol)
           for label, outs in result.extra_outputs.items()}
  info = dict(result.info)
  if result.clients:
    info["native side"] = "; ".join(f"{inv} run on clients {list(ix)} only, as the runtime ran it"
                                    for inv, ix in result.clients.items())
  if trusted is not None:
    info["signature"] = f"verified, Ed25519 key {signing.fingerprint(trusted)}"
  return VerificationReport(str(export_dir), chosen.name, checks, extra, info, rounds=rounds,
                            rtol=rtol, atol=atol, labels=render.output_labels(manifest))

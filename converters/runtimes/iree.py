"""``fb.verify(..., runtime="iree")``: compile each StableHLO piece with IREE and run a round.

Each piece's StableHLO text (``.mlir``) is compiled by ``iree.compiler`` for ``llvm-cpu`` (a
generic CPU, so a compiled module runs on any x86-64/arm64 host alike) and run by ``iree.runtime``
on the ``local-task`` driver; ``faxbridge.converters.plan.run_plan`` orchestrates the round from ``plan.json``
alone. Compiled ``.vmfb`` modules are cached by content hash in a temporary directory (never in
the export, whose files the manifest pins): ``$FAXBRIDGE_IREE_CACHE`` or
``<tmp>/faxbridge-iree-cache``.

Clients with their own data sizes (``fb.ragged``): a client piece's examples have a dynamic axis 0
in its module, so the one module compiled per piece runs every client on its own rows (``run_plan``
pads them to whole batches, ``faxbridge.converters.plan.own_rows``); no size compiles anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from faxbridge.converters.plan import load_plan, piece_file, pieces, run_plan
from faxbridge.extend import RuntimeResult, VerificationError, importable

FORMAT = "stablehlo_text"
COMPILE_FLAGS = ("--iree-llvmcpu-target-cpu=generic",)


def available() -> tuple[bool, str]:
  """The registry's availability probe: IREE's compiler and runtime importable here."""
  return importable("iree.compiler", "iree.runtime")


def _cache_dir() -> Path:
  path = Path(os.environ.get("FAXBRIDGE_IREE_CACHE") or Path(tempfile.gettempdir()) /
              "faxbridge-iree-cache")
  path.mkdir(parents=True, exist_ok=True)
  return path


def compile_stablehlo(text: str, where: str = "module") -> bytes:
  """The IREE ``.vmfb`` of a StableHLO module's text (cached by the text, flags and IREE version).

  Raises:
    VerificationError: IREE rejects the module (its diagnostics are included).
  """
  import iree.compiler as ic

  # A .vmfb is only valid for the compiler that wrote it and a runtime that reads its format.
  versions = [importlib.metadata.version(p) for p in ("iree-base-compiler", "iree-base-runtime")]
  key = hashlib.sha256("\0".join([text, *COMPILE_FLAGS, *versions]).encode()).hexdigest()
  cached = _cache_dir() / f"{key}.vmfb"
  if cached.is_file():
    return cached.read_bytes()
  with _one_compiler(key):
    if cached.is_file():  # made while this process waited
      return cached.read_bytes()
    try:
      vmfb = ic.compile_str(text, target_backends=["llvm-cpu"], input_type="stablehlo",
                            extra_args=list(COMPILE_FLAGS))
    except Exception as e:  # CompilerToolError carries IREE's diagnostics, then its command line
      errors = [line.split(" error: ", 1)[-1].strip() for line in str(e).splitlines()
                if " error: " in line or line.startswith("error:")]
      reason = "; ".join(errors[:3]) if errors else str(e).strip().splitlines()[0]
      raise VerificationError(f"IREE cannot compile {where}: {reason}") from e
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(vmfb)
    os.replace(tmp, cached)  # atomic: a reader never sees half an entry
  return vmfb


@contextlib.contextmanager
def _one_compiler(key: str) -> Iterator[None]:
  """Held while cache entry ``key`` is compiled, so that processes wanting the same module at
  once (the nodes of a local Flower deployment, pytest's workers) wait for the first instead of
  each compiling it. Where there is no ``fcntl`` (not POSIX) each compiles, as before."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  with open(_cache_dir() / f"{key}.lock", "wb") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    yield


PieceFunction = Callable[[list[np.ndarray]], list[np.ndarray]]


@functools.cache
def _config():
  """The one ``local-task`` configuration (its VM instance and task pool) all pieces share."""
  import iree.runtime as ireert

  return ireert.Config("local-task")


def load_piece(text: bytes, piece: dict, where: str) -> PieceFunction:
  """One piece's StableHLO text (its bytes, already read and checked by the caller), compiled
  (or found in the cache) and loaded on ``local-task``: a function of its arguments in the plan's
  input order, returning its outputs in the plan's order.

  Raises:
    VerificationError: not UTF-8 text, or IREE cannot compile it.
  """
  import iree.runtime as ireert

  try:
    source = text.decode()
  except UnicodeDecodeError:
    raise VerificationError(f"{where}: not StableHLO text (not UTF-8)") from None
  config = _config()
  module = ireert.VmModule.copy_buffer(config.vm_instance, compile_stablehlo(source, where))
  context = ireert.SystemContext(vm_modules=[module], config=config)
  function = context.modules[module.name]["main"]

  def call(args: list[np.ndarray]) -> list[np.ndarray]:
    result = function(*args)
    result = result if isinstance(result, tuple | list) else [result]
    return [np.asarray(r.to_host() if hasattr(r, "to_host") else r) for r in result]

  call.context = context  # type: ignore[attr-defined]  # the module lives as long as its function
  return call


class _Modules:
  """Loaded IREE modules of an export, one system context per piece."""

  def __init__(self, export_dir: Path, plan: dict):
    self.functions = {}
    for piece in pieces(plan):
      if FORMAT not in piece["files"]:
        raise VerificationError(f"{export_dir}: piece {piece['name']} has no StableHLO "
                                "(export with --target=stablehlo to run on IREE)")
      rel = piece["files"][FORMAT]
      self.functions[rel] = load_piece(piece_file(export_dir, piece, FORMAT).read_bytes(), piece, rel)

  def __call__(self, piece: dict, args: list[np.ndarray]) -> list[np.ndarray]:
    return self.functions[piece["files"][FORMAT]](args)


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
               rounds: int) -> RuntimeResult:
  """Run the export's round(s) on IREE from ``plan.json``: outputs keyed as ``fb.verify`` keys them."""
  plan = load_plan(export_dir)
  try:
    import iree.compiler
    import iree.runtime  # noqa: F401
  except ImportError as e:
    raise VerificationError("runtime 'iree' needs iree-base-compiler and iree-base-runtime: "
                            "pip install iree-base-compiler==3.13.0 iree-base-runtime==3.13.0") from e
  modules = _Modules(export_dir, plan)
  outputs = run_plan(plan, modules, inputs, rounds, who="iree")
  return RuntimeResult(outputs=outputs, info={
      "IREE modules": f"{len(modules.functions)}, one per piece of plan.json, compiled with "
                      f"{' '.join(COMPILE_FLAGS)}"})

"""``fb.export``: target dispatch, manifests with checksums, deterministic and atomic writes.

Every export directory holds the target's files, ``native/`` (the whole computation as a
``jax.export`` artifact: the reference that ``fb.verify`` runs natively, even without the Python
source) and ``manifest.json``: the format version, the versions that wrote it, what was exported
and the sha256 of every other file. Nothing in it depends on the time or the machine, so the same
computation exports to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from faxbridge import registry
from faxbridge._jax_export import export as export_without_locations
from faxbridge.computation import Computation
from faxbridge.errors import ExportError
from faxbridge.iterative import IterativeProcess

FORMAT_VERSION = 1

Program = Computation | IterativeProcess


def _target(name: str) -> Callable[..., dict]:
  return registry.lookup(registry.TARGETS, name, "export target", ExportError).load()


def versions() -> dict[str, str]:
  import federated_language

  import faxbridge

  return {"faxbridge": faxbridge.__version__, "jax": jax.__version__,
          "federated_language": federated_language.version.__version__
          if hasattr(federated_language.version, "__version__") else str(federated_language.version)}


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _native(program: Program, example_args, out: Path) -> dict:
  """The computation itself, serialized with jax.export: what verify runs as the native side."""
  out.mkdir()
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)),
                       example_args)
  if isinstance(program, IterativeProcess):
    state = program.state_spec()
    parts = {"initialize": (program.initialize, ()), "next": (program.next, (state, *specs))}
  else:
    parts = {"computation": (program, tuple(specs))}
  for name, (comp, args) in parts.items():
    exported = export_without_locations(comp, *args)
    (out / f"{name}.jax").write_bytes(exported.serialize())
  return {"native": {name: f"native/{name}.jax" for name in parts}}


def export(
    program: Program,
    *example_args: Any,
    target: str = "tff",
    out_dir: str | os.PathLike,
    force: bool = False,
    **options: Any,
) -> Path:
  """Export ``program`` for the signature of ``example_args`` into ``out_dir``.

  For an :class:`IterativeProcess`, ``example_args`` are ``next``'s arguments after the state.
  The directory is written in a temporary folder beside ``out_dir`` and moved into place whole;
  an existing ``out_dir`` is refused unless ``force``.

  Raises:
    ExportError: the target cannot express the program (names the cause and the user's file:line).
  """
  out = Path(out_dir).resolve()
  if out.exists() and not force:
    raise ExportError(f"{out} exists; pass force=True (--force) to replace it")
  exporter = _target(target)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    manifest = {
        "format_version": FORMAT_VERSION,
        "target": target,
        "name": program.__name__,
        "kind": "iterative_process" if isinstance(program, IterativeProcess) else "computation",
        "versions": versions(),
    }
    manifest.update(exporter(program, example_args, tmp, **options))
    manifest.update(_native(program, example_args, tmp / "native"))
    manifest["files"] = {
        str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    write_json(tmp / "manifest.json", manifest)
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
      os.replace(out, old / "x")
      os.replace(tmp, out)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_manifest(export_dir: str | os.PathLike) -> dict:
  return json.loads((Path(export_dir) / "manifest.json").read_text())

"""``fb.export``: target dispatch, manifests with checksums, deterministic and atomic writes.

Every export directory holds the target's files, ``native/`` (the whole computation as a
``jax.export`` artifact: the reference that ``fb.verify`` runs natively, even without the Python
source) and ``manifest.json``: the format version, the versions that wrote it, what was exported
and the sha256 of every other file. Nothing in it depends on the time or the machine, so the same
computation exports to the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from faxbridge._src import execution, registry, signing
from faxbridge._src.computation import Computation
from faxbridge._src.errors import ExportError
from faxbridge._src.events import emit
from faxbridge._src.export_reader import sha256
from faxbridge._src.form import FederatedForm, state_links
from faxbridge._src.iterative import IterativeProcess
from faxbridge._src.locations import describe
from faxbridge._src.placements import CLIENTS
from faxbridge._src.serialization import export as export_without_locations
from faxbridge._src.split import split

FORMAT_VERSION = 1

Program = Computation | IterativeProcess


# -- the program, split once: what every target, the manifest and verify read -----------------------
@dataclasses.dataclass(frozen=True)
class SplitProgram:
  name: str
  kind: str  # "computation" or "iterative_process"
  forms: dict[str, FederatedForm]
  native: dict[str, tuple[Computation, tuple]]  # computation name -> (computation, arg specs)
  state: dict[str, list[dict[str, str]]] | None = None  # see faxbridge._src.form.state_links

  def blocks(self) -> dict[str, dict]:
    """The manifest block of each computation: the leaves a caller passes and gets back (for
    ``next``, the inputs after the state), the clients it was traced for, its stages and traffic."""
    out = {}
    for name, form in self.forms.items():
      skip_state = name == "next"
      out[name] = {
          "clients": form.clients,
          "inputs": [b.to_json() for b in form.inputs if not (skip_state and b.path[0] == 0)],
          "outputs": [b.to_json() for b in form.outputs],
          "stages": len(form.stages),
          "bytes_per_client": form.bytes_per_client(),
      }
    return out


def _specs(args: Sequence[Any]) -> tuple:
  return tuple(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tuple(args)))


def split_program(program: Program, example_args: Sequence[Any]) -> SplitProgram:
  """Split ``program`` for the signature of ``example_args`` (for an iterative process: next's
  arguments after the state).

  Raises:
    ExportError: not a computation or iterative process, a program that cannot be split, or a
      ``next`` whose state does not match ``initialize``'s.
  """
  name = getattr(program, "__name__", type(program).__name__)
  emit("export.split", f"tracing and splitting {name}", program=name)
  specs = _specs(example_args)
  if isinstance(program, IterativeProcess):
    state = program.state_spec()
    init, nxt = split(program.initialize), split(program.next, state, *specs)
    try:
      links = state_links(init, nxt)
    except ValueError as e:
      raise ExportError(f"{program.__name__}: {e}") from None
    return SplitProgram(program.__name__, "iterative_process", {"initialize": init, "next": nxt},
                        {"initialize": (program.initialize, ()),
                         "next": (program.next, (state, *specs))}, links)
  if isinstance(program, Computation):
    return SplitProgram(program.__name__, "computation",
                        {"computation": split(program, *specs)},
                        {"computation": (program, specs)})
  raise ExportError(f"cannot export {type(program).__name__}: expected fb.computation or "
                    "fb.IterativeProcess")


def refuse_ragged(split: SplitProgram, target: str) -> None:
  """An ExportError naming the cause when ``split`` has clients with their own numbers of examples
  (an ``fb.ragged`` input, or an ``fb.fold`` over a client's examples), which ``target`` does not
  export yet (its registry entry says ``ragged=False``).

  Raises:
    ExportError: the first ragged input leaf (and its count), or the user's line of the first fold.
  """
  for name, form in split.forms.items():
    leaves, folds = form.ragged_inputs, form.folds()
    if not leaves and not folds:
      continue
    where = "" if name == "computation" else f" ({name})"
    if leaves:
      folded = f"; folded by fb.fold{describe(folds[0])}" if folds else ""
      cause = (f"its input {leaves[0].name} holds each client's own number of examples "
               f"(fb.ragged, counted by {leaves[0].ragged.count}{folded})")  # type: ignore[union-attr]
    else:
      cause = f"it folds over a client's own examples (fb.fold{describe(folds[0])})"
    raise ExportError(
        f"{split.name}{where}: {cause}, and the {target} target cannot export clients with their "
        "own data sizes yet (docs/ragged.md says which targets can). Run it natively "
        "(calling the computation, or fb.split(...).run), or export a version whose clients' "
        "data all have one shape.")


def check_padding_unread(split: SplitProgram) -> None:
  """An ExportError when a client piece reads a ragged input other than through ``fb.fold``: an
  export gives each client its own examples only, so the padding (and the padded length) the
  program was traced with is not there to read.

  Raises:
    ExportError: the input, and the user's file:line of the first such read.
  """
  from faxbridge._src.ragged import padding_reads

  for comp_name, form in split.forms.items():
    ragged = {b.name for b in form.ragged_inputs}
    if not ragged:
      continue
    for stage in form.stages:
      piece = stage.client_work
      if piece.jaxpr is None or not ragged & {s.name for s in piece.inputs}:
        continue
      reads = padding_reads(piece.jaxpr.jaxpr, [s.name in ragged for s in piece.inputs])
      if reads:
        site, what = reads[0]
        where = "" if comp_name == "computation" else f" ({comp_name})"
        at = describe(site) if site is not None else ""
        raise ExportError(
            f"{split.name}{where}: the client's examples of an fb.ragged input "
            f"({', '.join(sorted(ragged))}) are read by {what}{at}, not by fb.fold. An export "
            "gives each client its own examples only (no padding), so only fb.fold may read "
            "them: compute over the examples inside the fold's step (docs/ragged.md).")


def versions(target: registry.Target | None = None) -> dict[str, str]:
  """What the manifest records as the versions that wrote an export: faxbridge and jax, and what
  ``target``'s own probe adds (e.g. the tff target's federated_language)."""
  import faxbridge

  return {"faxbridge": faxbridge.__version__, "jax": jax.__version__,
          **(target.version_info() if target is not None else {})}


def write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _serialize(comp: Computation, args: Sequence[Any], path: Path) -> None:
  with execution.plain():  # the same program whatever the native execution strategy
    exported = export_without_locations(comp, *args)
  path.write_bytes(exported.serialize())


def _native(split: SplitProgram, out: Path) -> dict:
  """The computation itself, serialized with jax.export: what verify runs as the native side."""
  emit("export.native", "serializing the native reference")
  out.mkdir()
  for name, (comp, args) in split.native.items():
    _serialize(comp, args, out / f"{name}.jax")
  return {"native": {name: f"native/{name}.jax" for name in split.native}}


ANY_CLIENTS = "native_any_clients"  # its folder in an export, and its manifest block


def native_any_clients(split: SplitProgram, out: Path) -> tuple[dict, dict[str, str]]:
  """The native reference once more, for any number of clients: each computation with CLIENTS
  inputs serialized by jax.export with a symbolic clients axis (``clients >= 1``), into
  ``out/native_any_clients/NAME.jax``. For targets whose runtimes may complete an invocation over
  some of the clients (a federation's round over the nodes that replied): verify runs that
  invocation's native program on exactly those clients' data (``RuntimeResult.clients``).

  A computation that fixes its number of clients (``fb.computation(clients=N)``) has no such
  program, nor does one whose code needs the number as a constant (it compares or branches on it;
  jax.export says where).

  Returns:
    The manifest part (``{"native_any_clients": {name: path}}``, empty when none was written) and,
    by computation, why none was written for it.
  """
  written: dict[str, str] = {}
  missing: dict[str, str] = {}
  clients, = jax.export.symbolic_shape("clients")
  for name, (comp, args) in split.native.items():
    if not any(p is CLIENTS for p in comp.in_placements):
      continue
    if comp.clients is not None:
      missing[name] = f"{split.name} fixes its number of clients (clients={comp.clients})"
      continue
    any_count = tuple(
        jax.tree.map(lambda s: jax.ShapeDtypeStruct((clients, *s.shape[1:]), s.dtype), arg)
        if place is CLIENTS else arg for place, arg in zip(comp.in_placements, args))
    emit("export.native", f"{name}: serializing the native reference for any number of clients")
    (out / ANY_CLIENTS).mkdir(exist_ok=True)
    try:
      _serialize(comp, any_count, out / ANY_CLIENTS / f"{name}.jax")
    except Exception as e:  # jax.export's refusals have no common class; the reason is kept
      missing[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      continue
    written[name] = f"{ANY_CLIENTS}/{name}.jax"
  if not written and (out / ANY_CLIENTS).exists():
    shutil.rmtree(out / ANY_CLIENTS)
  return ({ANY_CLIENTS: written} if written else {}), missing


def _merge_blocks(blocks: dict[str, dict], target_part: dict) -> dict:
  """The manifest: the program's blocks, with what the target adds to each (e.g. TFF's type)."""
  merged = dict(target_part)
  for name, block in blocks.items():
    merged[name] = {**block, **target_part.get(name, {})}
  return merged


def export(
    program: Program,
    *example_args: Any,
    target: str | None = None,
    out_dir: str | os.PathLike,
    force: bool = False,
    sign_with: str | os.PathLike | None = None,
    **options: Any,
) -> Path:
  """Export ``program`` for the signature of ``example_args`` into ``out_dir``.

  The program is split once into its federated form (stages of server and client pieces) and
  written for ``target``, a registered target (``faxbridge targets`` lists them; built in:
  ``"tff"``, a federated_language computation for TFF; ``"stablehlo"``, StableHLO and jax.export
  pieces + ``plan.json`` for IREE and jax; ``"tflite"``, a TFLite model per piece + ``plan.json``
  for LiteRT; docs/targets.md). Every export also holds ``native/`` (the whole
  computation as ``jax.export``, what :func:`faxbridge._src.verify` compares against) and
  ``manifest.json`` (signature, versions, sha256 of every file); see docs/artifacts.md.

  For an :class:`IterativeProcess`, ``example_args`` are ``next``'s arguments after the state.
  The directory is written in a temporary folder beside ``out_dir`` and moved into place whole;
  an existing ``out_dir`` is refused unless ``force``, and even then unless it is an earlier export or
  empty. Files and folders get the modes the umask gives. The same program exports to the same
  bytes.

  Args:
    program: an ``fb.computation`` or ``fb.IterativeProcess``.
    *example_args: arrays (or ``jax.ShapeDtypeStruct``) fixing shapes, dtypes and the number of
      clients.
    target: the target's name; None: the registered default target (``tff``).
    out_dir: the directory to create.
    force: replace an existing ``out_dir`` that is an earlier export or an empty directory
      (anything else is refused: see :func:`check_out_dir`).
    sign_with: an Ed25519 private key file (``fb.keygen`` writes one) outside ``out_dir``: the
      export gets ``manifest.json.sig``, its signature of the manifest, which pins every other
      file; ``fb.verify(..., trust=PUBLIC_KEY)`` checks it (docs/security.md). None: unsigned.
    **options: the options the target declares (``local=`` for tff, ``stablehlo_version=`` for
      stablehlo, ``lowering=`` for tflite; docs/targets.md); anything else is refused.

  Returns:
    The export directory, resolved.

  Example:
    >>> total = fb.computation(fb.sum, in_placements=(fb.CLIENTS,))
    >>> x = np.ones((3, 2), np.float32)  # 3 clients
    >>> out = fb.export(total, x, target="stablehlo", out_dir="total_export")
    >>> sorted(p.name for p in out.iterdir())
    ['manifest.json', 'native', 'pieces', 'plan.json']

  Raises:
    ExportError: ``out_dir`` cannot be written or replaced (see :func:`check_out_dir`), an unknown
      target or option, ``sign_with`` is not an Ed25519 private key or is inside ``out_dir``, the
      target cannot express the program (names the cause and the user's file:line), or an example
      argument is 64-bit while ``jax_enable_x64`` is off.
  """
  out = check_out_dir(out_dir, force)
  signing_key = None if sign_with is None else signing.load_private_key(sign_with, out)
  entry = _chosen_target(target)
  options = entry.check_options(options)
  emit("export.load", f"loading the {entry.name} exporter", target=entry.name)
  exporter = entry.load()
  if not jax.config.jax_enable_x64:
    # JAX would silently export a float64 leaf as float32; verify would then refuse the very data
    # the export was made from. Python scalars carry no dtype (JAX types them weakly): allowed.
    args_name = "next's arguments after the state" if isinstance(program, IterativeProcess) \
        else "arguments"
    narrowed = {"float64": "float32", "complex128": "complex64", "int64": "int32",
                "uint64": "uint32"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(example_args)[0]:
      dt = str(getattr(leaf, "dtype", ""))  # str: extended dtypes (PRNG keys) are no numpy dtype
      if dt in narrowed:
        raise ExportError(
            f"{program.__name__}: example argument leaf args{jax.tree_util.keystr(path)} "
            f"({args_name}) has dtype {dt} but jax_enable_x64 is off, so JAX would silently export "
            f"it as {narrowed[dt]}; cast it to {narrowed[dt]} (x.astype(np.{narrowed[dt]})) or "
            "enable jax_enable_x64 (JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True))")
  split = split_program(program, example_args)
  if not entry.ragged:
    refuse_ragged(split, entry.name)
  check_padding_unread(split)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    manifest = {
        "format_version": FORMAT_VERSION,
        "target": entry.name,
        "name": split.name,
        "kind": split.kind,
        "versions": versions(entry),
    }
    if split.state is not None:
      manifest["state"] = split.state
    manifest.update(_merge_blocks(split.blocks(), exporter(split, tmp, **options)))
    manifest.update(_native(split, tmp / "native"))
    manifest["files"] = {
        str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    write_json(tmp / "manifest.json", manifest)
    if signing_key is not None:  # signed here, inside the temporary folder: never half signed
      signing.sign_export(tmp, signing_key)
    _umask_modes(tmp)
    check_out_dir(out, force)  # again: whatever appeared at out_dir meanwhile is not replaced blindly
    with _interrupts_deferred():  # never half swapped: either the old export or the new one
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


def _is_export(path: Path) -> bool:
  """Whether ``path`` holds a faxbridge export: a ``manifest.json`` that parses, with faxbridge's
  format version and a target name (the keys every export's manifest starts with)."""
  try:
    manifest = json.loads((path / "manifest.json").read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int)
          and isinstance(manifest.get("target"), str))


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
  """Where an export of ``out_dir`` goes (absolute, its parent resolved), or an ExportError saying
  why it cannot go there; nothing is created or removed. Shared by ``fb.export`` and the CLI, which
  asks before it imports the program.

  ``force`` replaces only what an export may replace: an earlier faxbridge export or an empty
  directory. A user's own directory, a regular file or a symlink (whose target would be replaced)
  is refused, because replacing it would delete the user's files.

  Raises:
    ExportError: ``out_dir`` exists (without ``force``), is not an export or an empty directory
      (with ``force``), or cannot be created (a regular file above it, a folder not writable).
  """
  # The parent resolved, not the name itself: a symlink at out_dir must be seen, not followed.
  given = Path(os.path.abspath(out_dir))
  out = given.parent.resolve() / given.name
  if out.is_symlink():
    raise ExportError(f"{out} is a symlink (to {os.readlink(out)}); refusing to replace it: "
                      "name the directory itself, or another output directory")
  if out.exists():
    if not force:
      raise ExportError(f"{out} exists; pass --force to replace it (force=True in Python)")
    if not out.is_dir():
      raise ExportError(f"{out} is a file, not an export directory; refusing to replace it even "
                        "with --force (force=True): remove it yourself or choose another output")
    if any(out.iterdir()) and not _is_export(out):
      raise ExportError(f"{out} is not a faxbridge export (no faxbridge manifest.json) and not "
                        "empty; refusing to replace it even with --force (force=True), which "
                        "replaces only an earlier export: remove it yourself or choose another "
                        "output")
    return out
  above = out.parent
  while not above.exists() and above != above.parent:
    above = above.parent
  if not above.is_dir():
    raise ExportError(f"cannot create {out}: {above} is a file, not a directory")
  if not os.access(above, os.W_OK | os.X_OK):
    raise ExportError(f"cannot create {out}: {above} is not writable")
  return out


def _umask() -> int:
  mask = os.umask(0o22)  # reading the umask means setting it; set straight back
  os.umask(mask)
  return mask


def _umask_modes(root: Path) -> None:
  """Give ``root`` (made by mkdtemp: 0700) and everything in it the modes a plain ``mkdir`` and
  ``open`` would have given under the umask, so an export is as readable as any file the user
  writes (by another user, a container, a web server)."""
  mask = _umask()
  for path in [root, *root.rglob("*")]:
    if path.is_symlink():
      continue
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
  """Ctrl-C (SIGINT) and SIGTERM held back while inside: the swap of an old export for the new one
  is two renames, and an interruption between them would leave neither at ``out_dir``."""
  held = {signal.SIGINT, signal.SIGTERM}
  try:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
  except (AttributeError, OSError, ValueError):  # no signal masks here: nothing to hold back
    yield
    return
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _chosen_target(name: str | None) -> registry.Target:
  if name is not None:
    return registry.target(name)
  default = registry.default_target()
  if default is None:
    raise ExportError("no target named and none is registered as the default: pass target=NAME "
                      f"(known: {', '.join(registry.targets()) or 'none'})")
  return default


def read_manifest(export_dir: str | os.PathLike) -> dict:
  return json.loads((Path(export_dir) / "manifest.json").read_text())

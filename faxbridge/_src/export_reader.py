"""An export directory read as untrusted input.

An export travels (from a researcher to a platform team, to a server, to client devices), and a
reader runs what is in it. Whoever reads one must be able to trust that it runs only files inside
it, and that a damaged or hostile export is refused with one :class:`VerificationError` (exit code 2
on the command line) before anything runs, never a traceback or an allocation without bound. Every
reader (``fb.verify``, each runtime, the plan interpreter) goes through this module:

- **Contained paths** (:func:`contained_file`): a path named by ``manifest.json`` or ``plan.json`` is
  relative, '/'-separated and normalized (no ``.``, ``..``, hidden or absolute parts), and every
  part of it inside the export is a real directory or, last, a regular file: a symbolic link (or a
  FIFO, a device, ...) is refused, so nothing outside the export is ever opened.
- **Validated files** (:func:`read_json`): ``manifest.json`` and ``plan.json`` are size-limited,
  parsed, and checked against their JSON Schemas (``schemas/manifest.schema.json``; the plan's ships
  with the plan's package) with the JSON path of the first problem; limits on shapes, client counts
  and file sizes far above any real export's are part of the schemas and of :func:`check_limits`.
- **Pinned files** (:func:`check_files`): the export holds exactly the files its manifest lists,
  each with its sha256; nothing unlisted, missing, linked or oversized.

See docs/security.md for the threat model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from faxbridge._src.errors import VerificationError
from faxbridge._src.events import emit

MANIFEST = "manifest.json"
SIGNATURE_FILE = MANIFEST + ".sig"  # a detached signature of the manifest's bytes (signing.py)
# Files beside the manifest that it cannot pin (it is what they are about): its signature.
UNPINNED = frozenset({MANIFEST, SIGNATURE_FILE})
# Limits no real export comes near (the largest bundled one is a few MB); they bound what a reader
# allocates or hashes on behalf of an export it has not trusted yet.
MAX_JSON_BYTES = 64 << 20
MAX_FILE_BYTES = 4 << 30
MAX_TOTAL_BYTES = 16 << 30
MAX_FILES = 10_000
MAX_ELEMENTS = 1 << 31  # of one input or output, all clients together
# The schemas' "relpath": each part starts with a letter, digit, '_', '+' or '-'.
_RELPATH = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*(/[A-Za-z0-9_+-][A-Za-z0-9_.+-]*)*")
_SCHEMAS = Path(__file__).parent / "schemas"


_RELPATH_TITLE = "a path inside the export"  # the title of the schemas' "relpath"
_RELPATH_RULE = "relative, '/'-separated, no '.', '..', hidden or absolute parts"


def contained_file(export_dir: Path, rel: Any, where: str) -> Path:
  """``export_dir / rel`` after checking that it is a regular file inside the export.

  Args:
    export_dir: the export directory (resolved: its own path may be a link the user chose).
    rel: the path as the export's JSON gives it (not trusted to be a string).
    where: what named it, for the error (``"plan.json $.computations.next..."``).

  Raises:
    VerificationError: not a normalized relative path, a part that is a link or not a directory,
      the file missing, not a regular file, or larger than ``MAX_FILE_BYTES``.
  """
  if not isinstance(rel, str) or len(rel) > 255 or not _RELPATH.fullmatch(rel):
    raise VerificationError(f"{where}: {rel!r:.300} is not {_RELPATH_TITLE} ({_RELPATH_RULE})")
  path = export_dir
  parts = rel.split("/")
  for i, part in enumerate(parts):
    path = path / part
    try:
      info = os.lstat(path)
    except FileNotFoundError:
      raise VerificationError(f"{where}: {rel} is missing from {export_dir}") from None
    except OSError as e:
      raise VerificationError(f"{where}: cannot read {rel}: {e.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
      raise VerificationError(f"{where}: {'/'.join(parts[:i + 1])} in {export_dir} is a symbolic "
                              "link; an export holds regular files only, so nothing outside it "
                              "is read")
    if i < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
      raise VerificationError(f"{where}: {'/'.join(parts[:i + 1])} in {export_dir} is not a folder")
  if not stat.S_ISREG(info.st_mode):
    raise VerificationError(f"{where}: {rel} in {export_dir} is not a regular file")
  if info.st_size > MAX_FILE_BYTES:
    raise VerificationError(f"{where}: {rel} is {info.st_size} bytes, over the limit of "
                            f"{MAX_FILE_BYTES} bytes for a file of an export")
  return path


@functools.cache
def _validator(schema_path: Path) -> Any:
  import jsonschema  # here: `import faxbridge` stays light

  schema = json.loads(schema_path.read_text())
  return jsonschema.Draft202012Validator(schema)


def read_json(path: Path, schema: Path, name: str, data: bytes | None = None) -> Any:
  """The JSON document at ``path`` (a checked, contained file), or in ``data`` (its bytes as read
  before, e.g. those a signature was checked on), valid under ``schema``.

  Raises:
    VerificationError: larger than ``MAX_JSON_BYTES``, not UTF-8 JSON (nesting too deep
      included), or invalid: naming ``name``, the JSON path and what was expected there.
  """
  size = path.stat().st_size if data is None else len(data)
  if size > MAX_JSON_BYTES:
    raise VerificationError(f"{name} is {size} bytes, over the limit of {MAX_JSON_BYTES}")
  try:
    document = json.loads(path.read_bytes() if data is None else data)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise VerificationError(f"{name} is not JSON: {e}") from None
  except RecursionError:
    raise VerificationError(f"{name} is nested too deeply to be a faxbridge file") from None
  import jsonschema

  try:
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(document))
  except RecursionError:
    raise VerificationError(f"{name} is nested too deeply to be a faxbridge file") from None
  if error is not None:
    raise VerificationError(f"{name} is not a valid {schema.name.split('.')[0]}: at "
                            f"{error.json_path}: {_describe(error)}")
  return document


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _describe(error: Any) -> str:
  """What a schema expected where an export's JSON has something else: short whatever the value
  (jsonschema's own message quotes the whole value, which may be megabytes)."""
  if error.validator == "type":
    expected = error.validator_value
    expected = " or ".join(expected) if isinstance(expected, list) else expected
    return f"expected {expected}, got {_JSON_TYPES.get(type(error.instance), 'something else')}"
  if error.validator in ("pattern", "maxLength") and error.schema.get("title") == _RELPATH_TITLE:
    return f"{error.instance!r:.200} is not {_RELPATH_TITLE} ({_RELPATH_RULE})"
  if len(error.message) <= 300:
    return str(error.message)
  return f"{error.instance!r:.100}... fails {error.validator} {error.validator_value!r:.100}"


def check_limits(block: dict, where: str) -> None:
  """Each input and output of a computation's signature block holds at most ``MAX_ELEMENTS``
  elements (a CLIENTS value for all its clients), so no reader allocates without bound."""
  clients = block.get("clients") or 1
  for key in ("inputs", "outputs"):
    for i, leaf in enumerate(block.get(key, [])):
      elements = math.prod(leaf["shape"]) * (clients if leaf["placement"] == "CLIENTS" else 1)
      if elements > MAX_ELEMENTS:
        raise VerificationError(f"{where} $.{key}[{i}] ({leaf['name']}): {elements} elements, over "
                                f"the limit of {MAX_ELEMENTS} for one value of an export")


def read_export_manifest(export_dir: Path, data: bytes | None = None) -> dict:
  """``manifest.json`` of an export directory, checked: a one-line VerificationError says what is
  wrong (no directory, no manifest, not JSON, not valid under the manifest schema, a named file
  that is not listed, a value over the limits). Files other than the manifest are not opened.
  ``data``: the manifest's bytes as already read (the ones a signature was checked on), parsed
  instead of reading the file again, so nothing can change it in between."""
  if not export_dir.is_dir():
    raise VerificationError(f"{export_dir}: no such export directory")
  try:
    path = contained_file(export_dir, MANIFEST, str(export_dir))
  except VerificationError:
    if not os.path.lexists(export_dir / MANIFEST):
      raise VerificationError(f"{export_dir} has no manifest.json: not a faxbridge export") from None
    raise
  manifest = read_json(path, _SCHEMAS / "manifest.schema.json", str(path), data)
  listed = manifest["files"]
  named = [(f"$.native.{k}", v) for k, v in manifest["native"].items()]
  named += [("$.plan", manifest["plan"])] if "plan" in manifest else []
  for where, rel in named:
    if rel not in listed:
      raise VerificationError(f"{path} {where}: {rel} is not among the files the manifest pins")
  for block in ("computation", "initialize", "next"):
    if block in manifest:
      check_limits(manifest[block], f"{path} $.{block}")
  return manifest


def sha256(path: Path) -> str:
  """The hex sha256 of a file's bytes, read in blocks (what the manifest pins each file by)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _tree(export_dir: Path) -> tuple[list[str], list[str]]:
  """(regular files, anything else) under ``export_dir`` by relative path, links not followed."""
  files, others = [], []
  pending = [("", export_dir)]
  while pending:
    prefix, folder = pending.pop()
    with os.scandir(folder) as entries:
      for entry in entries:
        rel = prefix + entry.name
        if entry.is_symlink():
          others.append(f"{rel}: a symbolic link")
        elif entry.is_dir(follow_symlinks=False):
          pending.append((rel + "/", Path(entry.path)))
        elif entry.is_file(follow_symlinks=False):
          files.append(rel)
        else:
          others.append(f"{rel}: not a regular file")
        if len(files) + len(others) > MAX_FILES:
          raise VerificationError(f"{export_dir} holds more than {MAX_FILES} files: not an export")
  return sorted(files), sorted(others)


def check_files(export_dir: Path, manifest: dict) -> None:
  """The export holds exactly the files its manifest lists (and the manifest, and its signature),
  each a regular file inside it with its sha256: anything unlisted, missing, linked, oversized or
  changed is refused before anything runs."""
  listed: dict[str, str] = manifest["files"]
  emit("verify.files", f"checking {len(listed)} files against the manifest's sha256",
       export_dir=str(export_dir))
  files, problems = _tree(export_dir)
  problems += [f"{rel}: not in the manifest" for rel in files
               if rel not in listed and rel not in UNPINNED]
  total = 0
  for rel, digest in sorted(listed.items()):
    try:
      path = contained_file(export_dir, rel, "manifest.json $.files")
    except VerificationError as e:
      problems.append(str(e).split(": ", 1)[1])
      continue
    total += path.stat().st_size
    if total > MAX_TOTAL_BYTES:
      raise VerificationError(f"{export_dir} holds more than {MAX_TOTAL_BYTES} bytes: not an export")
    actual = sha256(path)
    if actual != digest:
      problems.append(f"{rel}: sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...)")
  if problems:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise VerificationError(f"{export_dir} does not match its manifest, so nothing was run: "
                            + "; ".join(problems[:5]) + more)

"""Ways to damage or subvert a real export, for the tests of its readers (test_untrusted_exports).

Each edit works on a copy of an export directory and may "re-hash" it afterwards: rewrite the
manifest's sha256 of every file that changed, as someone editing an export by hand does so that the
file check alone cannot tell. Outside the export, ``outside/secret.*`` files are what a hostile path
or link points to; a reader must never open them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

JSON_FILES = ("manifest.json", "plan.json")


def sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_export(export: Path, into: Path) -> Path:
  shutil.copytree(export, into, symlinks=True)
  return into


def rehash(export: Path) -> None:
  """Rewrite manifest.json's sha256 of every listed file that is still a regular file."""
  manifest_path = export / "manifest.json"
  try:
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    for rel in list(files):
      path = export / rel
      # A file grown past any reader's limit keeps its old digest: readers refuse it on its size,
      # and hashing gigabytes would only slow the tests down.
      if (isinstance(rel, str) and path.is_file() and not path.is_symlink()
          and path.stat().st_size < 64 << 20):
        files[rel] = sha256(path)
    manifest_path.write_text(json.dumps(manifest, indent=1))
  except (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError):
    pass  # a manifest already broken stays as it is


def secrets(root: Path) -> dict[str, Path]:
  """Files outside the export that hostile paths point to, one per kind of piece file."""
  outside = root / "outside"
  outside.mkdir(exist_ok=True)
  made = {}
  for suffix in (".mlir", ".jax", ".json", ".tflite", ".mlirbc"):
    path = outside / f"secret{suffix}"
    path.write_text("secret")
    made[suffix] = path
  return made


# --- JSON edits ---------------------------------------------------------------------------------
def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
  """Every JSON path in ``value`` (keys and indices), the root included."""
  out = [prefix]
  if isinstance(value, dict):
    for k, v in value.items():
      out += _paths(v, (*prefix, k))
  elif isinstance(value, list):
    for i, v in enumerate(value[:8]):  # long lists: the first few stand for the rest
      out += _paths(v, (*prefix, i))
  return out


def _get(value: Any, path: tuple) -> Any:
  for p in path:
    value = value[p]
  return value


def _set(doc: Any, path: tuple, new: Any) -> Any:
  if not path:
    return new
  _get(doc, path[:-1])[path[-1]] = new
  return doc


OTHER_TYPES = [0, -1, 1.5, "x", "", True, None, [], {}, [1, "a"], {"k": 1}]
DEEP = "__nested_deeply__"
HUGE = [10**12, 10**30, -(10**12), 1e308, 2**63, 2**31]


def json_edit(doc: Any, rng: random.Random, hostile: dict[str, Path]) -> tuple[Any, str]:
  """One random edit of a JSON document: (the edited document, what was done)."""
  paths = _paths(doc)
  path = rng.choice(paths)
  here = _get(doc, path)
  kind = rng.choice(["type", "remove", "add", "huge", "deep", "path", "path", "string"])
  where = "$" + "".join(f"[{p!r}]" for p in path)
  if kind == "type":
    new = rng.choice([v for v in OTHER_TYPES if type(v) is not type(here)])
    return _set(doc, path, new), f"type swap at {where}"
  if kind == "remove" and path:
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return doc, f"removed {where}"
  if kind == "add" and isinstance(here, dict):
    here[rng.choice(["extra", "files", "plan", "computations", "__proto__", "stages"])] = \
        rng.choice(OTHER_TYPES)
    return doc, f"added a key at {where}"
  if kind == "huge" and path:
    return _set(doc, path, rng.choice(HUGE)), f"huge number at {where}"
  if kind == "deep" and path:  # written out by edit_json_file: json.dumps cannot nest that deep
    depth = rng.choice([50, 5000, 100_000])
    return _set(doc, path, f"{DEEP}{depth}"), f"nesting {depth} deep at {where}"
  if kind == "string" and path:
    return _set(doc, path, rng.choice(["\x00", "a" * 100_000, "..", "/", "é"])), f"odd string at {where}"
  # A path-valued string, or any string, pointed outside the export.
  strings = [p for p in paths if isinstance(_get(doc, p), str)]
  if not strings:
    return doc, "no string to point elsewhere"
  path = rng.choice(strings)
  suffix = Path(_get(doc, path)).suffix or ".json"
  secret = hostile.get(suffix, hostile[".json"])
  target = rng.choice([f"../outside/{secret.name}", str(secret), f"pieces/../../outside/{secret.name}",
                       f"./{secret.name}", f"pieces//{secret.name}"])
  return _set(doc, path, target), f"path {target!r} at {'$' + ''.join(f'[{p!r}]' for p in path)}"


def edit_json_file(export: Path, name: str, rng: random.Random, hostile: dict[str, Path]) -> str:
  path = export / name
  if not path.is_file():
    return f"no {name}"
  text = path.read_text()
  if rng.random() < 0.1:
    path.write_text(text[:rng.randrange(len(text))])
    return f"{name} truncated"
  doc, what = json_edit(json.loads(text), rng, hostile)
  text = json.dumps(doc)
  deep = re.search(f'"{DEEP}(\\d+)"', text)
  if deep:
    depth = int(deep.group(1))
    text = text[:deep.start()] + "[" * depth + "0" + "]" * depth + text[deep.end():]
  path.write_text(text)
  return f"{name}: {what}"


# --- file edits ---------------------------------------------------------------------------------
def file_edit(export: Path, rng: random.Random, hostile: dict[str, Path]) -> str:
  files = sorted(p for p in export.rglob("*") if p.is_file() and p.name != "manifest.json")
  victim = rng.choice(files)
  rel = victim.relative_to(export)
  kind = rng.choice(["rename", "replace", "link", "link-dir", "oversized", "fifo", "remove", "extra"])
  if kind == "rename":
    victim.rename(victim.with_name("renamed_" + victim.name))
    return f"renamed {rel}"
  if kind == "replace":
    victim.write_bytes(rng.choice([b"", b"\x00" * 64, b"garbage", victim.read_bytes()[::-1]]))
    return f"replaced {rel}"
  if kind == "link":
    victim.unlink()
    victim.symlink_to(hostile.get(victim.suffix, hostile[".json"]))
    return f"{rel} linked outside"
  if kind == "link-dir" and len(rel.parts) > 1:
    folder = export / rel.parts[0]
    moved = export.parent / f"{export.name}-moved-{rel.parts[0]}"
    folder.rename(moved)
    folder.symlink_to(moved)
    return f"folder {rel.parts[0]} linked outside"
  if kind == "oversized":
    with open(victim, "ab") as f:
      f.truncate(5 << 30)  # sparse: 5 GiB without writing them
    return f"{rel} grown to 5 GiB"
  if kind == "fifo":
    victim.unlink()
    os.mkfifo(victim)
    return f"{rel} replaced by a FIFO"
  if kind == "remove":
    victim.unlink()
    return f"removed {rel}"
  (export / "pieces" / "extra.mlir").write_text("module {}")
  return "added an unlisted file"


def tamper(export: Path, rng: random.Random, hostile: dict[str, Path]) -> str:
  """One random damage of ``export`` (in place), re-hashed half of the time: what was done."""
  if rng.random() < 0.6:
    what = edit_json_file(export, rng.choice(JSON_FILES), rng, hostile)
  else:
    what = file_edit(export, rng, hostile)
  if rng.random() < 0.5:
    rehash(export)
    what += ", re-hashed"
  return what

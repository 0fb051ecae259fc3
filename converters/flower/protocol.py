"""What the ServerApp and the nodes of a faxbridge Flower App agree on: the client runtimes, the
messages and the records in them, and how either side reads the export it was given.

Two kinds of message go from the ServerApp to a node:

* **install** (``query.faxbridge_install``), once per node and run: the client program, one
  ``uint8`` array per client piece, keyed by the piece's path in the export. The node checks each
  against the sha256 its own copy of ``manifest.json`` (in the Flower App bundle) pins, stores it
  under that sha256 and checks its local data against ``plan.json``; it replies with its label
  (or declines: a node with no data for the run sits it out).
* **work** (``train.faxbridge_work``), per stage and sampled node: which piece to run, the
  broadcast values, which outputs to return (the uploads) and which to keep for a later stage of
  the same invocation. The node runs the stored piece on its data, the broadcast and what it kept.

A node that refuses replies with the record ``faxbridge.error`` (one line saying why), which the
ServerApp raises as a ``VerificationError`` naming the node.

A signed export's install message also carries its ``manifest.json.sig`` (record
``faxbridge.signature``): the bundle cannot (it takes no ``.sig`` file), and a node configured
with ``trust`` checks it against the ``manifest.json`` of its own bundle before anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.converters import plan as fplan
from faxbridge.extend import VerificationError, contained_file, read_export_manifest, read_signature

INSTALL = "query.faxbridge_install"
WORK = "train.faxbridge_work"
# Record names inside a message's RecordDict.
TASK = "faxbridge.task"  # ConfigRecord: what to do
PROGRAMS = "faxbridge.programs"  # ArrayRecord: client piece path -> uint8 bytes
BROADCAST = "faxbridge.broadcast"  # ArrayRecord: name -> value
UPLOADS = "faxbridge.uploads"  # ArrayRecord: name -> value (a reply)
NODE = "faxbridge.node"  # ConfigRecord: the node's label and timings (a reply)
ERROR = "faxbridge.error"  # ConfigRecord {"reason": ...}: the node refused (a reply)
SIGNATURE = "faxbridge.signature"  # ConfigRecord {"manifest.json.sig": bytes}: of a signed export
SIGNATURE_KEY = "manifest.json.sig"
# ConfigRecord {"label", "reason"}: a node sits this run out, holding no data for it (an install
# reply; node.py says when)
DECLINED = "faxbridge.declined"
# What a node keeps in its Flower context between the stages of one invocation.
KEPT = "faxbridge.kept"
KEPT_FOR = "faxbridge.kept_for"


@dataclasses.dataclass(frozen=True)
class ClientRuntime:
  """A runtime nodes run the client program on: the target whose exporter writes the pieces (reused
  as it is), the plan's file format key of a piece, and the function that loads one piece from its
  bytes (``load_piece(bytes, piece entry, where) -> call(args) -> outputs``)."""

  name: str
  exporter: str  # "module:function" of the target's export(split, out) -> manifest part
  format: str  # the key of piece["files"]
  loader: str  # "module:function"
  suffix: str  # of a stored program file

  def load(self) -> Callable[[bytes, dict, str], Callable[[list[np.ndarray]], list[np.ndarray]]]:
    return _function(self.loader)

  def export(self) -> Callable[..., dict]:
    return _function(self.exporter)


CLIENT_RUNTIMES = {
    "litert": ClientRuntime("litert", "faxbridge.converters.tflite.export:export_tflite", "tflite",
                            "faxbridge.converters.runtimes.litert:load_piece", ".tflite"),
    "iree": ClientRuntime("iree", "faxbridge.converters.stablehlo.export:export_stablehlo",
                          "stablehlo_text", "faxbridge.converters.runtimes.iree:load_piece", ".mlir"),
}


def _function(reference: str) -> Callable[..., Any]:
  module, _, attr = reference.partition(":")
  return getattr(importlib.import_module(module), attr)


def versions() -> dict[str, str]:
  """The manifest's record of the Flower the app was written for (read without importing flwr)."""
  try:
    return {"flwr": importlib.metadata.version("flwr")}
  except importlib.metadata.PackageNotFoundError:
    return {}


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# -- reading the export (the ServerApp) or the app bundle (a node) ---------------------------------
@dataclasses.dataclass(frozen=True)
class App:
  """What either side reads of an export: its manifest and plan (both checked), the client runtime
  it was written for, and the path of each client piece with the sha256 the manifest pins."""

  root: Path
  manifest: dict
  plan: dict
  runtime: ClientRuntime
  client_pieces: dict[str, str]  # piece path in the export -> sha256

  def piece(self, computation: str, name: str) -> dict:
    """The plan entry of piece ``name`` of ``computation``."""
    comp = self.plan["computations"].get(computation)
    if comp is not None:
      for stage in comp["stages"]:
        for piece in (stage["server_prepare"], stage["client_work"]):
          if piece["name"] == name:
            return piece
      if comp["server_result"]["name"] == name:
        return comp["server_result"]
    raise VerificationError(f"plan.json has no piece {name!r} of computation {computation!r}")


def read_app(root: Path, pieces_present: bool, manifest_bytes: bytes | None = None) -> App:
  """The manifest and plan of an export at ``root``, read as untrusted input: the manifest valid
  under its schema and of the flower target, ``plan.json`` valid under its schema, self-consistent
  and with the sha256 the manifest pins.

  ``pieces_present``: the ServerApp reads a whole export (every piece file checked to be inside
  it); a node reads the Flower App bundle, which holds the JSON files but no piece (Flower bundles
  carry only source and text files), so it gets the client program by message.
  ``manifest_bytes``: the manifest as already read (the bytes a signature was checked on), parsed
  instead of reading it again.

  Raises:
    VerificationError: any of the above does not hold, naming the file and what is wrong.
  """
  manifest = read_export_manifest(root, manifest_bytes)
  block = manifest.get("flower")
  if manifest["target"] != "flower" or not isinstance(block, dict):
    raise VerificationError(f"{root}: an export of target {manifest['target']!r}, not a Flower App "
                            "(export with --target=flower)")
  runtime = CLIENT_RUNTIMES.get(block.get("client_runtime"))  # type: ignore[arg-type]
  if runtime is None:
    raise VerificationError(f"{root}/manifest.json $.flower.client_runtime: "
                            f"{block.get('client_runtime')!r:.50} is none of {sorted(CLIENT_RUNTIMES)}")
  plan_rel = manifest.get("plan", fplan.PLAN_FILE)
  path = contained_file(root, plan_rel, f"{root}/manifest.json $.plan")
  data = path.read_bytes()
  if sha256(data) != manifest["files"].get(plan_rel):
    raise VerificationError(f"{path}: sha256 differs from the one manifest.json pins")
  plan = fplan.load_plan(root, data, pieces_present)
  client: dict[str, str] = {}
  for comp_name, comp in plan["computations"].items():
    for stage in comp["stages"]:
      files = stage["client_work"]["files"]
      if not files:
        continue
      rel = files.get(runtime.format)
      if rel not in manifest["files"]:
        raise VerificationError(f"{path} $.computations.{comp_name}: client piece "
                                f"{stage['client_work']['name']} has no {runtime.format} file the "
                                "manifest pins")
      client[rel] = manifest["files"][rel]
  return App(root, manifest, plan, runtime, client)


# -- the signature --------------------------------------------------------------------------------
def signature_record(root: Path) -> Any | None:
  """The export's ``manifest.json.sig`` as the install message's record; None: unsigned."""
  from flwr.app import ConfigRecord

  data = read_signature(root)
  return None if data is None else ConfigRecord({SIGNATURE_KEY: data})


def signature_of(content: Any) -> bytes | None:
  """The signature bytes a message carries (its ``faxbridge.signature`` record), or None."""
  if SIGNATURE not in content.config_records:
    return None
  value = content.config_records[SIGNATURE].get(SIGNATURE_KEY)
  return value if isinstance(value, bytes) else None


# -- arrays in records -----------------------------------------------------------------------------
def array_record(values: Mapping[str, Any]) -> Any:
  """An ArrayRecord of named numpy arrays (Flower serializes each with np.save, no pickles)."""
  from flwr.app import Array, ArrayRecord

  if not values:
    return ArrayRecord()
  # np.array(order="C"), not np.ascontiguousarray, which makes a scalar 1-d
  return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in values.items()})


def arrays(record: Any) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in record.items()}


def program_record(app: App) -> Any:
  """The client program: every client piece's bytes, checked against the manifest here too (the
  ServerApp sends only what its own export pins)."""
  out = {}
  for rel, digest in app.client_pieces.items():
    data = contained_file(app.root, rel, "manifest.json $.files").read_bytes()
    if sha256(data) != digest:
      raise VerificationError(f"{app.root}/{rel}: sha256 differs from the one manifest.json pins; "
                              "the export changed after it was written")
    out[rel] = np.frombuffer(data, np.uint8)
  return array_record(out)


__all__ = ["BROADCAST", "CLIENT_RUNTIMES", "DECLINED", "ERROR", "INSTALL", "KEPT", "KEPT_FOR", "NODE",
           "PROGRAMS", "SIGNATURE", "SIGNATURE_KEY", "TASK", "UPLOADS", "WORK", "App", "ClientRuntime",
           "array_record", "arrays", "program_record", "read_app", "sha256", "signature_of",
           "signature_record", "versions"]

"""The ClientApp of a faxbridge Flower App: what a node does with the messages of the ServerApp.

A node trusts its own copy of the app (the Flower App bundle ``flwr run`` sent it, holding
``manifest.json`` and ``plan.json``) and its node config, nothing the ServerApp sends:

* **signature** (node config ``trust=PUB``): before anything else of the app is read, the
  bundle's ``manifest.json`` must carry the Ed25519 signature of ``PUB``'s key, the check
  ``fb.verify(..., trust=PUB)`` makes (``faxbridge.extend.check_signature``). The bundle cannot hold
  ``manifest.json.sig``, so the install message brings it; the node keeps it, once checked, as
  ``STORE/<manifest sha256>.manifest.sig``, and checks it again for every later message;
* **install**: each client piece it receives must have the sha256 its ``manifest.json`` pins for
  that path (else it refuses, naming the piece and both digests, and stores nothing); it stores the
  bytes under their sha256 (``STORE/<sha256>.tflite`` or ``.mlir``), never under a name it was sent,
  and checks its local data against ``plan.json`` before any round;
* **work**: it re-reads the stored piece, checks its sha256 again (what was checked is what runs),
  runs it on its own data (node config ``data=PATH.npz``, one array per CLIENTS input of the plan,
  one client's shape), the broadcast values (names, shapes and dtypes checked against the plan) and
  what it kept from an earlier stage of the same invocation, and replies with the uploads asked for.

Node config keys: ``data`` (the .npz of this node's data), ``data-dir`` (a folder of such files, one
per dataset: a run whose run config names ``dataset=NAME`` reads ``data-dir/NAME.npz``, so one node
serves runs of several programs, each on its own data; a node whose data-dir holds no NAME.npz
declines the install and sits the run out), ``label`` (how the ServerApp orders and
names the node; optional), ``store`` (where programs are kept; default
``$XDG_CACHE_HOME/faxbridge/flower-programs``), ``trust`` (an Ed25519 public key file: run only apps
it signed; optional).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.converters.flower import protocol, secagg
from faxbridge.converters.plan import own_rows
from faxbridge.extend import (
  FaxbridgeError,
  FederatedForm,
  RaggedSpec,
  VerificationError,
  check_signature,
)


def default_store() -> Path:
  cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(cache) / "faxbridge" / "flower-programs"


# A dataset name the run config may give: one file name in the node's data-dir, never a path.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class NodeRun:
  """A node's view of one message: its app bundle, its node config, the run's config, and the
  signature the message brought (``signature``: the install message's; None for other messages).

  Raises:
    VerificationError: with ``trust`` in the node config, the app is not signed by its key (before
      anything of the app but ``manifest.json`` is read); the bundle's manifest or plan is not valid.
  """

  def __init__(self, app_dir: Path, node_config: dict[str, Any],
               run_config: dict[str, Any] | None = None, signature: bytes | None = None):
    self.label = str(node_config.get("label", ""))
    self.store = Path(str(node_config.get("store") or default_store()))
    trust = str(node_config.get("trust") or "")
    signed = self._signed_manifest(app_dir, trust, signature) if trust else None
    self.app = protocol.read_app(app_dir, pieces_present=False, manifest_bytes=signed)
    self.dataset = str((run_config or {}).get("dataset") or "")
    self.data_path = self._data_path(node_config, self.dataset)

  def _data_path(self, node_config: dict[str, Any], dataset: str) -> str | None:
    """The node's data file: ``data-dir/DATASET.npz`` when the run names a dataset (a node serving
    several runs holds one file per run, and whoever starts a run can only choose among the
    node's own files), else the node config's ``data``."""
    if not dataset:
      return str(node_config["data"]) if node_config.get("data") else None
    if not DATASET_NAME.fullmatch(dataset):
      raise self._refuse(f"the run's dataset {dataset!r:.60} is not a plain name (letters, digits, "
                         "'_', '.', '-'; no path): it names a file in the node's data-dir")
    if not node_config.get("data-dir"):
      raise self._refuse(f"the run reads dataset {dataset!r}, and the node config names no "
                         "data-dir to find it in: start the SuperNode with --node-config "
                         "\"data-dir='DIR'\" (DIR holds DATASET.npz)")
    return str(Path(str(node_config["data-dir"])) / f"{dataset}.npz")

  def sits_out(self) -> str | None:
    """Why this node takes no part in the run (it then declines the install), or None: a run
    naming a dataset that this node's data-dir does not hold. One deployment serves programs of
    several sizes so: a program of 3 clients runs on the 3 nodes given its data, the others sit it
    out (a node without any data config still refuses, as before: that is a mistake, not a choice)."""
    if self.dataset and self.data_path is not None and not Path(self.data_path).is_file():
      return f"its data-dir holds no {self.dataset}.npz for this run"
    return None

  def _refuse(self, why: str) -> VerificationError:
    return VerificationError(f"node {self.label or '(no label)'}: {why}")

  # -- the signature ------------------------------------------------------------------------------
  def _signed_manifest(self, app_dir: Path, trust: str, signature: bytes | None) -> bytes:
    """The bundle's manifest bytes once ``trust``'s key is found to have signed them: with the
    ``signature`` an install message brought (then kept in the store), else with the one kept
    when this app was installed. Refuses (nothing was stored or run) otherwise."""
    try:
      digest = protocol.sha256((app_dir / "manifest.json").read_bytes())
    except OSError as e:
      raise self._refuse(f"cannot read its app's manifest.json: {e}") from None
    kept = self.store / f"{digest}.manifest.sig"
    if signature is None:
      if not kept.is_file():
        raise self._refuse(
            f"refusing the app: this node runs only apps signed by the key in {trust} (node config "
            "trust), and the app came without a signature (sign the export: faxbridge export ... "
            "--sign KEY, or fb.export(..., sign_with=KEY)); nothing was stored or run")
      signature, where = kept.read_bytes(), f"the signature kept in {kept}"
    else:
      where = "the signature sent with the app"
    try:
      manifest = check_signature(app_dir, trust, signature, where)
    except VerificationError as e:
      raise self._refuse(f"refusing the app: {e}") from None
    kept = self.store / f"{protocol.sha256(manifest)}.manifest.sig"  # of the bytes checked
    if not kept.is_file():
      self.store.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=self.store, prefix=".incoming-")
      with os.fdopen(fd, "wb") as f:
        f.write(signature)
      os.replace(tmp, kept)
    return manifest

  # -- data ---------------------------------------------------------------------------------------
  def data(self, computation: str) -> dict[str, np.ndarray]:
    """This node's CLIENTS inputs of ``computation``, checked against the plan: one client's shape
    and the dtype; for an ``fb.ragged`` input the node's own number of examples on axis 0, which
    must be the node's value of the input counting them (docs/ragged.md)."""
    specs = [b for b in self.app.plan["computations"][computation]["inputs"]
             if b["placement"] == "CLIENTS"]
    if not specs:
      return {}
    if self.data_path is None:
      raise self._refuse(f"{computation} reads CLIENTS inputs {[s['name'] for s in specs]}, and the "
                         "node config names no data: start the SuperNode with --node-config "
                         "\"data='PATH.npz'\"")
    try:
      with np.load(self.data_path, allow_pickle=False) as f:
        found = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise self._refuse(f"cannot read its data {self.data_path}: {e}") from None
    out = {}
    for s in specs:
      if s["name"] not in found:
        raise self._refuse(f"its data {self.data_path} has no array {s['name']!r} (has "
                           f"{sorted(found)}; the plan's CLIENTS inputs are "
                           f"{[t['name'] for t in specs]})")
      value = found[s["name"]]
      if not _fits(value, s) or value.dtype != np.dtype(s["dtype"]):
        own = ", any number of examples on axis 0" if s.get("ragged") else ""
        raise self._refuse(f"its data {s['name']!r} is {value.dtype}{list(value.shape)}; the plan "
                           f"takes one client's {s['dtype']}{s['shape']}{own}")
      out[s["name"]] = value
    for s in specs:  # a ragged input's rows are the node's examples: its count must say as many
      if s.get("ragged"):
        count = s["ragged"]["count"]
        if count not in out or np.shape(out[count]) != () or int(out[count]) != len(out[s["name"]]):
          raise self._refuse(f"its data {s['name']!r} holds {len(out[s['name']])} examples and its "
                             f"{count!r} is {out.get(count)!r}: the count must be the number of "
                             "examples")
    return out

  # -- programs -----------------------------------------------------------------------------------
  def _stored(self, digest: str) -> Path:
    return self.store / f"{digest}{self.app.runtime.suffix}"

  def install(self, programs: dict[str, np.ndarray]) -> None:
    """Check every client piece against the manifest, then store it under its sha256; then check
    the data of every computation with client work.

    Raises:
      VerificationError: a piece missing, unexpected, or with another sha256 (nothing is stored),
        or the data does not fit.
    """
    expected = self.app.client_pieces
    unknown = sorted(set(programs) - set(expected))
    missing = sorted(set(expected) - set(programs))
    if unknown or missing:
      raise self._refuse(f"the client program it was sent lacks {missing} and has unexpected "
                         f"{unknown}; its manifest.json lists {sorted(expected)}")
    blobs = {}
    for rel, array in programs.items():
      data = np.asarray(array, np.uint8).tobytes()
      digest = protocol.sha256(data)
      if digest != expected[rel]:
        raise self._refuse(f"refusing the client program it was sent: {rel} has sha256 {digest}, "
                           f"its manifest.json pins {expected[rel]}; nothing was stored or run")
      blobs[digest] = data
    self.store.mkdir(parents=True, exist_ok=True)
    for digest, data in blobs.items():
      path = self._stored(digest)
      if path.is_file() and protocol.sha256(path.read_bytes()) == digest:
        continue
      fd, tmp = tempfile.mkstemp(dir=self.store, prefix=".incoming-")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    for name in self.app.plan["computations"]:
      self.data(name)  # every computation that reads CLIENTS inputs finds them, of their shapes

  def load(self, piece: dict) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """The stored client piece, its bytes checked against the manifest's sha256 once more."""
    rel = piece["files"][self.app.runtime.format]
    digest = self.app.client_pieces[rel]
    path = self._stored(digest)
    try:
      data = path.read_bytes()
    except OSError:
      raise self._refuse(f"{rel} (sha256 {digest[:12]}...) is not installed in {self.store}") from None
    if protocol.sha256(data) != digest:
      raise self._refuse(f"the stored {path} no longer has sha256 {digest}; refusing to run it")
    return self.app.runtime.load()(data, piece, rel)

  def form(self, computation: str) -> FederatedForm:
    if computation not in self.app.plan["computations"]:
      raise self._refuse(f"plan.json has no computation {computation!r}")
    return FederatedForm.from_json(self.app.plan["computations"][computation], computation)

  # -- work ---------------------------------------------------------------------------------------
  def secure_sum(self, config: dict, kept: dict[str, np.ndarray]) -> np.ndarray:
    """This node's part of a SecAgg+ pass (``config``: the pass's fit config): the values its own
    plan secure-sums in that stage, from its data and what it kept, checked (secagg.node_values)."""
    computation = str(config[secagg.COMPUTATION])
    form = self.form(computation)
    return secagg.node_values(form, config, {**self.data(computation), **kept},
                              f"node {self.label or '(no label)'}")

  def work(self, task: dict, broadcast: dict[str, np.ndarray], kept: dict[str, np.ndarray]
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """(uploads, values to keep, timings) of one client piece (``task["piece"]``; "" runs none
    and only sends values the node holds: its data, what it kept)."""
    computation, name = str(task["computation"]), str(task["piece"])
    if computation not in self.app.plan["computations"]:
      raise self._refuse(f"plan.json has no computation {computation!r}")
    returns, keep = json.loads(str(task["returns"])), json.loads(str(task["keep"]))
    secret = sorted(set(returns) & secagg.hidden(self.form(computation)))
    if secret:  # the plan only secure-sums them: they leave this node masked by SecAgg+ or not at all
      raise self._refuse(f"asked to upload {secret} in the clear, which its plan.json only "
                         "aggregates with secure_sum")
    start = time.perf_counter()
    env = {**self.data(computation), **kept}
    loaded = ready = done = time.perf_counter()
    if name:
      piece = self.app.piece(computation, name)
      stage = next((s for s in self.app.plan["computations"][computation]["stages"]
                    if s["client_work"]["name"] == name), None)
      if stage is None:
        raise self._refuse(f"{name} is not a client piece of {computation}")
      if sorted(broadcast) != sorted(stage["broadcasts"]):
        raise self._refuse(f"{name}: sent broadcasts {sorted(broadcast)}, the plan broadcasts "
                           f"{sorted(stage['broadcasts'])}")
      env.update(broadcast)
      loaded = time.perf_counter()
      call = self.load(piece)
      ragged = {b["name"]: b for b in self.app.plan["computations"][computation]["inputs"]
                if b.get("ragged")}
      names = [s["name"] for s in piece["inputs"]]
      args = []
      for s in piece["inputs"]:
        if s["name"] not in env:
          raise self._refuse(f"{name} reads {s['name']!r}, which it neither holds nor was sent")
        value = np.asarray(env[s["name"]])
        if not _fits(value, ragged.get(s["name"], s)) or value.dtype != np.dtype(s["dtype"]):
          raise self._refuse(f"{name}: {s['name']!r} is {value.dtype}{list(value.shape)}, the plan "
                             f"says {s['dtype']}{s['shape']}")
        args.append(value)
      if ragged:  # the node's examples in whole batches, as every plan runtime passes them
        args = own_rows(names, args, {n: RaggedSpec.from_json(b["ragged"]) for n, b in ragged.items()})
      ready = time.perf_counter()
      env.update(zip((s["name"] for s in piece["outputs"]), call(args)))
      done = time.perf_counter()
    missing = [n for n in [*returns, *keep] if n not in env]
    if missing:
      raise self._refuse(f"asked for {missing}, which it neither holds nor computes")
    timings = {"data_seconds": loaded - start, "load_seconds": ready - loaded,
               "compute_seconds": done - ready, "process_seconds": _process_age()}
    return {n: env[n] for n in returns}, {n: env[n] for n in keep}, timings


def _fits(value: np.ndarray, spec: dict) -> bool:
  """Whether ``value`` has the plan's shape (a ragged input: any length on axis 0)."""
  want = tuple(spec["shape"])
  if spec.get("ragged"):
    return value.ndim == len(want) and value.shape[1:] == want[1:]
  return value.shape == want


def _process_age() -> float:
  """Seconds since this process started (Flower starts one ClientApp process per message, the warm
  executor forks one): its start and what Flower does before calling the app are part of a
  round's time. From /proc/self/stat's start time (clock ticks since boot); 0 where /proc does not
  tell."""
  try:
    with open("/proc/self/stat") as f:
      started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
      return max(0.0, float(f.read().split()[0]) - started)
  except (OSError, ValueError, IndexError):
    return 0.0


def client_app(app_dir: Path) -> Any:
  """The ``ClientApp`` of a faxbridge Flower App rooted at ``app_dir`` (its ``client_app.py`` is
  this call). A refusal (a ``FaxbridgeError``) is replied as the record ``faxbridge.error``."""
  from flwr.app import ConfigRecord, Message, RecordDict
  from flwr.client.mod import secaggplus_mod
  from flwr.clientapp import ClientApp

  app = ClientApp()

  def reply(msg: Any, content: dict[str, Any]) -> Any:
    return Message(RecordDict(content), reply_to=msg)

  def refused(msg: Any, e: FaxbridgeError) -> Any:
    return reply(msg, {protocol.ERROR: ConfigRecord({"reason": str(e)})})

  @app.query("faxbridge_install")
  def install(msg: Any, context: Any) -> Any:
    try:
      node = NodeRun(app_dir, dict(context.node_config), dict(context.run_config),
                     protocol.signature_of(msg.content))
      if (why := node.sits_out()) is not None:
        return reply(msg, {protocol.DECLINED: ConfigRecord({"label": node.label, "reason": why})})
      node.install(protocol.arrays(msg.content.array_records[protocol.PROGRAMS]))
    except FaxbridgeError as e:
      return refused(msg, e)
    return reply(msg, {protocol.NODE: ConfigRecord({"label": node.label})})

  @app.train("faxbridge_work")
  def work(msg: Any, context: Any) -> Any:
    entered = time.perf_counter()
    task = dict(msg.content.config_records[protocol.TASK])
    try:
      node = NodeRun(app_dir, dict(context.node_config), dict(context.run_config))
      state = context.state
      kept = _kept(state, str(task["invocation"]))
      uploads, keep, timings = node.work(
          task, protocol.arrays(msg.content.array_records[protocol.BROADCAST]), kept)
    except FaxbridgeError as e:
      return refused(msg, e)
    if keep:  # for a later stage of this invocation only; what it replaces was of this one too
      state.array_records[protocol.KEPT] = protocol.array_record({**kept, **keep})
      state.config_records[protocol.KEPT_FOR] = ConfigRecord({"invocation": task["invocation"]})
    timings["app_seconds"] = time.perf_counter() - entered  # in the ClientApp: reading the app too
    return reply(msg, {protocol.UPLOADS: protocol.array_record(uploads),
                       protocol.NODE: ConfigRecord({"label": node.label, **timings})})

  def refusals(msg: Any, context: Any, call_next: Any) -> Any:
    """Outermost mod of the SecAgg+ handler: a node's refusal inside the pass is replied as every
    other refusal is (``faxbridge.error``), not as an exception in Flower's error reply."""
    try:
      return call_next(msg, context)
    except FaxbridgeError as e:
      return refused(msg, e)

  @app.train(mods=[refusals, secaggplus_mod])
  def secure_sum(msg: Any, context: Any) -> Any:
    """SecAgg+'s 'collect masked vectors' step (``secaggplus_mod`` answers the other three): this
    node's secure_sum values, which the mod quantizes, masks and uploads (secagg.py)."""
    start = time.perf_counter()
    config = secagg.fit_config(msg.content)
    node = NodeRun(app_dir, dict(context.node_config), dict(context.run_config))
    vector = node.secure_sum(config, _kept(context.state, str(config[secagg.INVOCATION])))
    return Message(secagg.fit_reply(vector, {"seconds": time.perf_counter() - start,
                                             "process_seconds": _process_age()}), reply_to=msg)

  return app


def _kept(state: Any, invocation: str) -> dict[str, np.ndarray]:
  """What this node kept in its Flower context for ``invocation`` (nothing from another one)."""
  same = (protocol.KEPT_FOR in state.config_records
          and state.config_records[protocol.KEPT_FOR]["invocation"] == invocation)
  return protocol.arrays(state.array_records[protocol.KEPT]) if same else {}


__all__ = ["NodeRun", "client_app", "default_store"]

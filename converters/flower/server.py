"""The ServerApp of a faxbridge Flower App: ``plan.json`` run by the one stage interpreter, whose
client step is "send each sampled node its work, receive its uploads".

:class:`FlowerBackend` is one more :class:`faxbridge.extend.Backend`, beside the in-process
``PerClientBackend`` it extends: server pieces run here, on the client runtime the export was
written for (LiteRT or IREE); ``broadcast`` only marks values to send; ``clients`` sends each
sampled node a work message and returns the uploads it receives; aggregation is the inherited
reference rule of each kind (``faxbridge.extend.aggregation_rule``), the same every interpreter
uses. :func:`faxbridge.extend.run_program` runs ``initialize`` and the rounds of ``next``, as for
every other runtime.

Per invocation (``initialize``, ``round{r}``, or ``computation``) the ServerApp samples nodes
(seeded by the run config's ``seed`` and the invocation's index, recorded), and writes
``OUT/NAME.npz`` (its outputs) and ``OUT/record.json`` (sampled nodes, timings) as soon as it ends;
``OUT/result.json`` says how the run ended. A node's refusal or an upload of the wrong shape ends
the run with one error naming the invocation and the node.

Faults (docs/flower.md, "Faults"): a node *drops out* of an invocation when Flower reports it gone
(its SuperNode missed its heartbeats, its ClientApp process died) or it has not replied within
``round-timeout``. By default that ends the run with one :class:`RoundFailedError` naming the
invocation, the node and the timeout, and saying where the last completed invocation's outputs
are (``OUT``) and how to resume (run config ``resume-from``). With ``min-clients=k`` the invocation
completes over the sampled nodes that replied, if at least ``k`` did (a drop at a later stage of a
multi-stage invocation restarts it over the remaining nodes, so that every aggregation of it is
over the same clients), and the record names the nodes aggregated. Every event of the ServerApp
(each invocation's start and end, a drop) is appended to ``OUT/progress.jsonl`` as it happens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge import CLIENTS, events
from faxbridge.converters.flower import protocol, secagg
from faxbridge.extend import (
  FaxbridgeError,
  FederatedForm,
  PerClientBackend,
  Piece,
  RoundFailedError,
  VerificationError,
  contained_file,
  emit,
  interpret,
  run_program,
)

POLL_S = 0.1  # how often replies are pulled (Flower's own send_and_receive sleeps 3 s)


def gone_codes() -> frozenset[int]:
  """Flower's error codes of a reply that says its node is gone, not that it failed: the SuperLink
  missed the SuperNode's heartbeats (``NODE_UNAVAILABLE``, after 2 x 30 s), the node's ClientApp
  process died (killed, out of memory: ``CLIENT_APP_CRASHED``), the message or its reply expired."""
  from flwr.common.constant import ErrorCode

  return frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED,
                    ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


class OnNode:
  """A CLIENTS value that stays on the nodes (their data, or what a piece kept for a later stage)."""

  def __repr__(self) -> str:
    return "<on the nodes>"


ON_NODE = OnNode()


@dataclasses.dataclass(frozen=True)
class Sent:
  """A broadcast value: sent to each sampled node with the work that reads it."""

  value: np.ndarray


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The ServerApp's settings, from the run config (``[tool.flwr.app.config]`` of the app's
  pyproject.toml, overridden by ``flwr run --run-config``)."""

  export: Path
  out: Path
  server_inputs: Path | None
  rounds: int
  clients_per_round: int
  min_nodes: int
  wait_nodes_seconds: float
  round_timeout: float
  seed: int
  min_clients: int = 0  # 0: every sampled node must reply (a drop fails the run)
  resume_from: Path | None = None  # the OUT of an earlier run of this export, to resume after

  @classmethod
  def read(cls, run_config: dict[str, Any]) -> RunConfig:
    """Raises VerificationError when ``export`` or ``out`` is missing or a number is negative."""
    if not run_config.get("export") or not run_config.get("out"):
      raise VerificationError("the run config needs export='DIR' (the export on this machine) and "
                              "out='DIR' (where outputs go): flwr run APP --run-config "
                              "\"export='...' out='...'\"")
    config = cls(Path(str(run_config["export"])).resolve(), Path(str(run_config["out"])),
                 Path(str(run_config["server-inputs"])) if run_config.get("server-inputs") else None,
                 int(run_config.get("rounds", 3)), int(run_config.get("clients-per-round", 0)),
                 int(run_config.get("min-nodes", 1)), float(run_config.get("wait-nodes-seconds", 120)),
                 float(run_config.get("round-timeout", 600)), int(run_config.get("seed", 0)),
                 int(run_config.get("min-clients", 0)),
                 Path(str(run_config["resume-from"])) if run_config.get("resume-from") else None)
    if min(config.rounds, config.clients_per_round, config.min_nodes, config.min_clients) < 0:
      raise VerificationError(f"run config: rounds, clients-per-round, min-nodes and min-clients "
                              f"must be >= 0: {run_config}")
    return config


class NodesDropped(Exception):
  """Some nodes dropped out of one exchange (``dropped``: node id -> why); ``uploads``: what the
  others returned, by node id. Raised to the backend only when ``min-clients`` allows drops."""

  def __init__(self, dropped: dict[int, str], uploads: dict[int, dict]):
    super().__init__(dropped)
    self.dropped, self.uploads = dropped, uploads


class Restart(Exception):
  """An invocation whose earlier stage aggregated uploads of nodes that dropped out later: run it
  again from its start over ``nodes``, so that all its aggregations are over the same clients."""

  def __init__(self, nodes: list[Node]):
    super().__init__(nodes)
    self.nodes = nodes


@dataclasses.dataclass
class Node:
  node_id: int
  label: str


class Session:
  """One run of the ServerApp: the grid, the nodes that installed the program, the server pieces,
  and the record written to ``out``."""

  def __init__(self, grid: Any, app: protocol.App, config: RunConfig):
    self.grid, self.app, self.config = grid, app, config
    self.nodes: list[Node] = []
    self.record: dict[str, Any] = {"invocations": []}
    self.current: dict[str, Any] = {}  # the record of the invocation that runs
    load = app.runtime.load()
    self.server_pieces: dict[tuple[str, str], Any] = {}  # (computation, piece) -> its function
    for comp_name, comp in app.plan["computations"].items():
      for piece in [*(s["server_prepare"] for s in comp["stages"]), comp["server_result"]]:
        if piece["files"]:
          rel = piece["files"][app.runtime.format]
          data = contained_file(app.root, rel, "plan.json").read_bytes()
          if protocol.sha256(data) != app.manifest["files"].get(rel):
            raise VerificationError(f"{app.root}/{rel}: sha256 differs from the one manifest.json "
                                    "pins; the export changed after it was written")
          self.server_pieces[comp_name, piece["name"]] = load(data, piece, rel)

  # -- Flower I/O -------------------------------------------------------------------------------
  def exchange(self, messages: list[Any], what: str) -> tuple[dict[int, Any], dict[int, str]]:
    """Send ``messages`` and wait for one reply to each: (replies by source node id, the nodes
    that dropped out: why). A node drops out when Flower reports it gone (an error reply of
    :data:`GONE`: its SuperNode missed its heartbeats, its ClientApp process died) or it has not
    replied within ``round-timeout``.

    Raises:
      VerificationError: a reply is another error (Flower's, or the node's own refusal: its
        reason), naming the node.
    """
    ids = [i for i in self.grid.push_messages(messages) if i]
    if len(ids) != len(messages):
      raise VerificationError(f"{what}: the SuperLink accepted {len(ids)} of {len(messages)} messages")
    waiting = {i: m.metadata.dst_node_id for i, m in zip(ids, messages)}
    replies: dict[int, Any] = {}
    dropped: dict[int, str] = {}
    timeout = self.config.round_timeout
    deadline = time.monotonic() + timeout
    while waiting:
      for reply in self.grid.pull_messages(list(waiting)):
        node = waiting.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
          continue
        if reply.has_error() and reply.error.code in gone_codes():
          dropped[node] = (f"Flower reports it gone before the round timeout of {timeout:g} s "
                           f"({reply.error.reason})")
        elif reply.has_error():
          raise VerificationError(f"{what}: node {self.label(node)} failed: {reply.error.reason}")
        elif protocol.ERROR in reply.content.config_records:
          reason = reply.content.config_records[protocol.ERROR]["reason"]
          raise VerificationError(f"{what}: node {self.label(node)} refused: {reason}")
        else:
          replies[node] = reply
      if waiting and time.monotonic() > deadline:
        dropped.update({n: f"no reply within the round timeout of {timeout:g} s"
                        for n in waiting.values()})
        break
      if waiting:
        time.sleep(POLL_S)
    return replies, dropped

  def dropped_text(self, dropped: dict[int, str]) -> str:
    return "; ".join(f"node {self.label(n)} dropped out: {why}" for n, why in dropped.items())

  def label(self, node_id: int) -> str:
    for node in self.nodes:
      if node.node_id == node_id:
        return f"{node.label} ({node_id})" if node.label else str(node_id)
    return str(node_id)

  def message(self, content: Any, node_id: int, kind: str, group: str) -> Any:
    from flwr.app import Message

    return Message(content, dst_node_id=node_id, message_type=kind, group_id=group)

  def install(self) -> None:
    """Wait for ``min-nodes`` nodes, send each the client program, keep those that accepted it,
    in the order of their labels (then ids): the order clients have in every invocation."""
    from flwr.app import ConfigRecord, RecordDict

    deadline = time.monotonic() + self.config.wait_nodes_seconds
    while len(ids := sorted(self.grid.get_node_ids())) < max(self.config.min_nodes, 1):
      if time.monotonic() > deadline:
        raise VerificationError(f"{len(ids)} node(s) connected within {self.config.wait_nodes_seconds:g} "
                                f"s; the run config asks for at least {self.config.min_nodes}")
      time.sleep(0.5)
    programs = protocol.program_record(self.app)
    content = {protocol.TASK: ConfigRecord({"step": "install"}), protocol.PROGRAMS: programs}
    signature = protocol.signature_record(self.app.root)  # for nodes that require one (trust=)
    if signature is not None:
      content[protocol.SIGNATURE] = signature
    messages = [self.message(RecordDict(content), i, protocol.INSTALL, "install") for i in ids]
    start = time.monotonic()
    replies, dropped = self.exchange(messages, "installing the client program")
    if dropped:
      raise VerificationError(f"installing the client program: {self.dropped_text(dropped)}")
    declined = {i: dict(r.content.config_records[protocol.DECLINED]) for i, r in replies.items()
                if protocol.DECLINED in r.content.config_records}  # no data for this run on them
    self.nodes = sorted((Node(i, str(r.content.config_records[protocol.NODE]["label"]))
                         for i, r in replies.items() if i not in declined),
                        key=lambda n: (n.label, n.node_id))
    self.record["install"] = {"seconds": time.monotonic() - start,
                              "nodes": [dataclasses.asdict(n) for n in self.nodes],
                              "declined": [{"node_id": i, **d} for i, d in sorted(declined.items())],
                              "program_bytes": sum(int(a.numpy().size) for a in programs.values())}

  def sample(self, index: int) -> list[Node]:
    """The nodes of invocation ``index``: ``clients-per-round`` of the installed nodes, drawn with
    numpy's generator seeded by (seed, index), kept in the installed order."""
    k = self.config.clients_per_round or len(self.nodes)
    if k > len(self.nodes):
      declined = self.record.get("install", {}).get("declined", [])
      raise VerificationError(f"clients-per-round={k}, but only {len(self.nodes)} node(s) installed "
                              "the program" + "".join(f"; node {d['label']} sat the run out: "
                                                      f"{d['reason']}" for d in declined))
    rng = np.random.default_rng([self.config.seed, index])
    return [self.nodes[i] for i in sorted(rng.choice(len(self.nodes), size=k, replace=False))]

  def invoke(self, form: FederatedForm, invocation: str, index: int,
             named: dict[str, Any]) -> dict[str, Any]:
    """Run ``form`` as invocation ``index`` over the nodes sampled for it (restarting it over
    the remaining ones when :class:`Restart` says so), write its outputs and the record to OUT,
    report it (an event), and return the outputs by name."""
    nodes = self.sample(index) if form.stages else []
    self.current = {"invocation": invocation, "nodes": [n.node_id for n in nodes],
                    "labels": [n.label for n in nodes]}
    start = time.monotonic()
    while True:
      backend = FlowerBackend(self, form, invocation, nodes)
      try:
        outputs = interpret(form, backend, backend.inputs(form, named))
        break
      except Restart as again:
        nodes = again.nodes
        self.current["restarts"] = self.current.get("restarts", 0) + 1
      except ValueError as e:  # a server piece's output does not fit the plan
        raise VerificationError(f"{invocation}: {e}") from None
    self.current["seconds"] = time.monotonic() - start
    self.current["aggregated"] = [n.node_id for n in backend.nodes]
    self.current["aggregated_labels"] = [n.label for n in backend.nodes]
    _write_npz(self.config.out / f"{invocation}.npz", outputs)
    self.record["invocations"].append(self.current)
    _write_json(self.config.out / "record.json", self.record)
    sampled = len(self.current["nodes"])
    over = f" over {len(backend.nodes)} of {sampled} nodes" if form.stages else ""
    emit("flower.done", f"flower: {invocation} done in {self.current['seconds']:.1f} s{over}",
         invocation=invocation, seconds=self.current["seconds"])
    return outputs

  def work(self, invocation: str, computation: str, piece: str, nodes: Sequence[Node],
           broadcast: dict[str, np.ndarray], returns: list[str], keep: list[str],
           specs: dict[str, Any]) -> list[dict]:
    """Each node's ``returns`` (checked against ``specs``: name -> TensorSpec), in the order of
    ``nodes``, after running client piece ``piece`` of ``computation`` ("": none, the node only
    sends values it holds)."""
    from flwr.app import ConfigRecord, RecordDict

    task = ConfigRecord({"step": "work", "computation": computation, "piece": piece,
                         "invocation": invocation, "returns": json.dumps(returns),
                         "keep": json.dumps(keep)})
    values = protocol.array_record(broadcast)
    messages = [self.message(RecordDict({protocol.TASK: task, protocol.BROADCAST: values}),
                             n.node_id, protocol.WORK, invocation) for n in nodes]
    sent_at = time.monotonic()
    replies, dropped = self.exchange(messages, f"{invocation}, {piece or 'sending held values'}")
    exchange = time.monotonic() - sent_at
    if dropped and not self.config.min_clients:
      raise RoundFailedError(f"{invocation}: {self.dropped_text(dropped)}")
    out, timings = {}, []
    for n in nodes:
      if n.node_id in dropped:
        continue
      reply = replies[n.node_id]
      got = protocol.arrays(reply.content.array_records[protocol.UPLOADS])
      if sorted(got) != sorted(returns):
        raise VerificationError(f"{invocation}: node {self.label(n.node_id)} returned {sorted(got)}, "
                                f"expected {sorted(returns)}")
      for name, value in got.items():
        spec = specs[name]
        if value.shape != tuple(spec.shape) or value.dtype != np.dtype(spec.dtype):
          raise VerificationError(f"{invocation}: node {self.label(n.node_id)} returned {name} as "
                                  f"{value.dtype}{list(value.shape)}, the plan says "
                                  f"{spec.dtype}{list(spec.shape)}")
      out[n.node_id] = got
      timings.append(dict(reply.content.config_records[protocol.NODE]))
    self.current.setdefault("node_timings", []).append(
        {"piece": piece, "exchange_seconds": exchange, "nodes": timings, "uploads": returns})
    if dropped:
      raise NodesDropped(dropped, out)
    return [out[n.node_id] for n in nodes]

  def drop(self, invocation: str, dropped: dict[int, str], remaining: int) -> None:
    """Record nodes that dropped out of ``invocation`` and go on over the ``remaining`` ones, or
    raise RoundFailedError when fewer than ``min-clients`` remain."""
    self.current.setdefault("dropped", []).extend(
        {"node": n, "label": self.label(n), "why": why} for n, why in dropped.items())
    sampled = len(self.current.get("nodes", ()))
    if remaining < self.config.min_clients:
      raise RoundFailedError(f"{invocation}: {remaining} of the {sampled} sampled nodes remain, "
                             f"fewer than min-clients={self.config.min_clients}: "
                             f"{self.dropped_text(dropped)}")
    emit("flower.drop", f"flower: {invocation}: {self.dropped_text(dropped)}; going on over "
         f"{remaining} of {sampled} nodes (min-clients {self.config.min_clients})",
         invocation=invocation, remaining=remaining)


class FlowerBackend(PerClientBackend):
  """The stage interpreter's backend for one invocation on Flower: server pieces here, client work
  on the sampled nodes, aggregation by the inherited rules over the received uploads.

  A CLIENTS value stays on the nodes (``ON_NODE``) unless the server needs it: an aggregation's
  value or weight, or a CLIENTS output. Those come back with the client work that makes them, or,
  when they are the nodes' own inputs or a stage has no client work, with the stage's client work
  or a message that only asks for them (``aggregate``). A ``secure_sum`` runs through Flower's
  SecAgg+ instead (secagg.py): its value stays on the nodes (kept there if a client piece makes
  it) and is never uploaded in the clear unless the program also needs it in the clear.
  """

  def __init__(self, session: Session, form: FederatedForm, invocation: str, nodes: list[Node]):
    super().__init__(len(nodes), self._server_call)
    self.session, self.form, self.invocation, self.nodes = session, form, invocation, nodes
    self.exchanged = False  # whether nodes' uploads were received in this invocation already
    self.needed = {n for st in form.stages for a in st.aggregations for n in (a.value, a.weight) if n}
    self.needed |= {b.name for b in form.outputs if b.placement is CLIENTS}
    self.needed -= secagg.hidden(form)
    self.secured = {a.value for st in form.stages for a in st.aggregations if secagg.is_secure(a)}
    self.specs = secagg.client_value_specs(form)

  def _server_call(self, piece: Piece, args: list[np.ndarray]) -> list[np.ndarray]:
    return self.session.server_pieces[self.form.name, piece.name](args)

  def _read_later(self, index: int) -> set[str]:
    later = set()
    for stage in self.form.stages[index + 1:]:
      later |= {s.name for s in stage.client_work.inputs}
    return later

  def _work(self, piece: str, sent: dict[str, np.ndarray], returns: list[str], keep: list[str]
            ) -> list[dict]:
    """The uploads of the invocation's nodes for one client step. Nodes that drop out (allowed by
    ``min-clients``) leave the invocation: at its first exchange it simply goes on without them;
    later, uploads of theirs were aggregated already, so the invocation restarts (:class:`Restart`)."""
    try:
      uploads = self.session.work(self.invocation, self.form.name, piece, self.nodes, sent,
                                  returns, keep, self.specs)
    except NodesDropped as e:
      remaining = [n for n in self.nodes if n.node_id not in e.dropped]
      self.session.drop(self.invocation, e.dropped, len(remaining))
      if self.exchanged:
        raise Restart(remaining) from None
      self.nodes, self.n = remaining, len(remaining)
      uploads = [e.uploads[n.node_id] for n in remaining]
    self.exchanged = True
    return uploads

  def _exchange_all(self, messages: list[Any], what: str) -> dict[int, Any]:
    """The session's exchange for a SecAgg+ pass: every node's reply, or NodesDropped."""
    replies, dropped = self.session.exchange(messages, what)
    if dropped:
      raise NodesDropped(dropped, {})
    return replies

  def broadcast(self, values):
    return {k: Sent(np.asarray(v)) for k, v in values.items()}

  def clients(self, piece, args):
    index = next(i for i, st in enumerate(self.form.stages) if st.client_work is piece)
    sent = {k: v.value for k, v in args.items() if isinstance(v, Sent)}
    names = [s.name for s in piece.outputs]
    # what this stage aggregates: the piece's outputs, and values the nodes already hold
    aggregated = [n for a in self.form.stages[index].aggregations if not secagg.is_secure(a)
                  for n in (a.value, a.weight) if n]
    returns = [n for n in names if n in self.needed]
    returns += [n for n in dict.fromkeys(aggregated) if n not in names]
    keep = [n for n in names if n in self._read_later(index) or n in self.secured]
    uploads = self._work(piece.name, sent, returns, keep)
    out: dict[str, Any] = {n: ON_NODE for n in names}
    out.update({n: [u[n] for u in uploads] for n in returns})
    return out

  def aggregate(self, aggregations, uploads):
    out = {}
    if any(secagg.is_secure(a) for a in aggregations):  # one SecAgg+ pass for the stage's secure sums
      stage = next(i for i, st in enumerate(self.form.stages) if st.aggregations is aggregations)
      try:
        out = secagg.secure_sums(self._exchange_all, self.invocation, self.form, stage,
                                 [n.node_id for n in self.nodes], self.session.current)
      except NodesDropped as e:  # a pass needs the nodes it started with: the invocation restarts
        if not self.session.config.min_clients:
          raise RoundFailedError(f"{self.invocation}: {self.session.dropped_text(e.dropped)}") from None
        remaining = [n for n in self.nodes if n.node_id not in e.dropped]
        self.session.drop(self.invocation, e.dropped, len(remaining))
        raise Restart(remaining) from None
      aggregations = [a for a in aggregations if not secagg.is_secure(a)]
    held = [n for n in dict.fromkeys(x for a in aggregations for x in (a.value, a.weight) if x)
            if uploads[n] is ON_NODE]
    if held:  # a stage without client work aggregating what the nodes hold: ask for it
      got = self._work("", {}, held, [])
      uploads = {**uploads, **{n: [u[n] for u in got] for n in held}}
    return {**out, **super().aggregate(aggregations, uploads)}

  def inputs(self, form, named):
    return {b.name: ON_NODE if b.placement is CLIENTS else np.asarray(named[b.name])
            for b in form.inputs}


def _write_npz(path: Path, values: dict[str, Any]) -> None:
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **values)
  os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


PROGRESS = "progress.jsonl"  # in OUT: the ServerApp's events, one JSON object a line


@dataclasses.dataclass(frozen=True)
class Resume:
  """Where a resumed run starts: after round ``done`` (0: after initialize) of an earlier run whose
  OUT is ``folder``, with that invocation's ``outputs`` (the state) and the earlier ``record``."""

  folder: Path
  done: int
  outputs: dict[str, np.ndarray]
  record: dict[str, Any]


def _completed(folder: Path, record: dict[str, Any]) -> list[str]:
  """The invocations of ``record`` whose outputs are in ``folder``: initialize, round1, round2, ...
  up to the first missing one."""
  written = {inv.get("invocation") for inv in record.get("invocations", [])
             if isinstance(inv, dict) and (folder / f"{inv.get('invocation')}.npz").is_file()}
  done = []
  for name in ("initialize", *(f"round{r}" for r in range(1, len(written) + 1))):
    if name not in written:
      break
    done.append(name)
  return done


def read_resume(config: RunConfig, kind: str, manifest_sha256: str) -> Resume:
  """The point the run config's ``resume-from`` folder lets this run resume from.

  Raises:
    VerificationError: not an iterative process; no record there, one of another export, no
      completed invocation, or as many rounds as asked for or more.
  """
  folder = config.resume_from
  assert folder is not None
  if kind != "iterative_process":
    raise VerificationError(f"resume-from={folder}: this export is a single computation; only the "
                            "rounds of an iterative process can be resumed")
  try:
    record = json.loads((folder / "record.json").read_text())
  except (OSError, ValueError) as e:
    raise VerificationError(f"resume-from={folder}: no record.json of an earlier run there ({e})") \
        from None
  if record.get("export_manifest_sha256") != manifest_sha256:
    raise VerificationError(f"resume-from={folder}: its record is of another export (manifest "
                            f"sha256 {str(record.get('export_manifest_sha256'))[:12]}..., this "
                            f"export's {manifest_sha256[:12]}...)")
  done = _completed(folder, record)
  if not done:
    raise VerificationError(f"resume-from={folder}: no invocation completed there (not even "
                            "initialize); run from the start instead")
  rounds_done = len(done) - 1
  if rounds_done >= config.rounds:
    raise VerificationError(f"resume-from={folder}: it holds {rounds_done} completed round(s) "
                            f"already; the run config asks for rounds={config.rounds}")
  with np.load(folder / f"{done[-1]}.npz", allow_pickle=False) as f:
    outputs = {k: f[k] for k in f.files}
  kept = [inv for inv in record["invocations"] if inv.get("invocation") in done]
  return Resume(folder, rounds_done, outputs, {**record, "invocations": kept})


def _resume_hint(config: RunConfig, record: dict[str, Any]) -> str:
  """What a failed run leaves to resume from, and how: for the error's last sentence."""
  done = _completed(config.out, record)
  if not done:
    return "No invocation completed, so there is nothing to resume from"
  last = done[-1]
  where = "initialize" if last == "initialize" else f"round {last.removeprefix('round')}"
  return (f"The outputs of {', '.join(done)} are in {config.out} (record.json, {last}.npz): "
          f"resume after {where} with the run config resume-from='{config.out}'")


def run(grid: Any, run_config: dict[str, Any]) -> None:
  """Everything the ServerApp does: read the export, install the client program on the nodes, run
  the program, write each invocation's outputs and the record (see the module docstring); every
  event it emits meanwhile goes to ``OUT/progress.jsonl``."""
  config = RunConfig.read(run_config)
  config.out.mkdir(parents=True, exist_ok=True)
  with open(config.out / PROGRESS, "a", encoding="utf-8") as progress:

    def forward(event: events.Event) -> None:
      progress.write(json.dumps({"name": event.name, "message": event.message,
                                 "fields": event.fields}, default=str) + "\n")
      progress.flush()

    with events.listen(forward):
      _run(grid, config)


def _run(grid: Any, config: RunConfig) -> None:
  app = protocol.read_app(config.export, pieces_present=True)
  manifest_sha256 = protocol.sha256((config.export / "manifest.json").read_bytes())
  resume = None if config.resume_from is None else read_resume(config, app.plan["kind"],
                                                                manifest_sha256)
  forms = {name: FederatedForm.from_json(comp, name) for name, comp in app.plan["computations"].items()}
  session = Session(grid, app, config)
  session.record["export_manifest_sha256"] = manifest_sha256
  if resume is not None:
    session.record["invocations"] = list(resume.record["invocations"])
    session.record["resumed_from"] = {"folder": str(resume.folder), "round": resume.done}
    for inv in session.record["invocations"]:  # the earlier outputs: this OUT holds the whole run
      if resume.folder.resolve() != config.out.resolve():
        shutil.copyfile(resume.folder / f"{inv['invocation']}.npz",
                        config.out / f"{inv['invocation']}.npz")
    _write_json(config.out / "record.json", session.record)
    emit("flower.resume", f"flower: resuming after round {resume.done} from {resume.folder}",
         round=resume.done)
  started = time.monotonic()
  session.install()
  emit("flower.install", f"flower: client program installed on {len(session.nodes)} nodes in "
       f"{session.record['install']['seconds']:.1f} s", nodes=len(session.nodes))
  server_inputs: dict[str, np.ndarray] = {}
  if config.server_inputs is not None:
    with np.load(config.server_inputs, allow_pickle=False) as f:
      server_inputs = {k: f[k] for k in f.files}
  calls = iter(range(0 if resume is None else resume.done + 1, 1 << 30))

  def invoke(name: str, named: dict) -> dict:
    index = next(calls)
    invocation = name if name != "next" else f"round{index}"  # initialize was call 0
    form = forms[name]
    for b in form.inputs:  # the SERVER inputs (the state, server-inputs) as the plan declares them
      if b.placement is CLIENTS:
        continue
      if b.name not in named:
        raise VerificationError(f"{invocation}: the SERVER input {b.name!r} is missing: give it in "
                                "the .npz of the run config's server-inputs")
      value = np.asarray(named[b.name])
      if value.shape != tuple(b.spec.shape) or value.dtype != np.dtype(b.spec.dtype):
        raise VerificationError(f"{invocation}: the SERVER input {b.name!r} is "
                                f"{value.dtype}{list(value.shape)}, the plan takes "
                                f"{b.spec.dtype}{list(b.spec.shape)}")
    return session.invoke(form, invocation, index, named)

  try:
    run_program(app.plan["kind"], invoke, server_inputs, config.rounds, app.plan.get("state"),
                who="flower", resume=None if resume is None else (resume.done, resume.outputs))
  except RoundFailedError as e:
    raise RoundFailedError(f"{e}. {_resume_hint(config, session.record)}") from None
  session.record["seconds"] = time.monotonic() - started
  _write_json(config.out / "record.json", session.record)


def server_app() -> Any:
  """The ``ServerApp`` of a faxbridge Flower App (its ``server_app.py`` is this call). A failure is
  written to ``OUT/result.json`` (one line: what failed) and raised, so ``flwr`` sees the run fail."""
  from flwr.serverapp import ServerApp

  app = ServerApp()

  @app.main()
  def main(grid: Any, context: Any) -> None:
    out = Path(str(context.run_config.get("out") or ".")).resolve()
    try:
      run(grid, dict(context.run_config))
    except FaxbridgeError as e:
      out.mkdir(parents=True, exist_ok=True)
      _write_json(out / "result.json", {"status": "error", "error": str(e),
                                        "round_failed": isinstance(e, RoundFailedError)})
      raise
    except Exception as e:
      out.mkdir(parents=True, exist_ok=True)
      _write_json(out / "result.json", {"status": "error", "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()})
      raise
    _write_json(out / "result.json", {"status": "ok"})

  return app


__all__ = ["PROGRESS", "FlowerBackend", "NodesDropped", "Restart", "Resume", "RunConfig", "Session",
           "gone_codes", "read_resume", "run", "server_app"]

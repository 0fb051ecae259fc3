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
``OUT/result.json`` says how the run ended. A node's refusal, a missing reply within
``round-timeout``, or an upload of the wrong shape ends the run with one error naming the
invocation and the node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge import CLIENTS
from faxbridge.converters.flower import protocol
from faxbridge.extend import (
  FaxbridgeError,
  FederatedForm,
  PerClientBackend,
  Piece,
  VerificationError,
  contained_file,
  interpret,
  run_program,
)

POLL_S = 0.1  # how often replies are pulled (Flower's own send_and_receive sleeps 3 s)


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
                 float(run_config.get("round-timeout", 600)), int(run_config.get("seed", 0)))
    if min(config.rounds, config.clients_per_round, config.min_nodes) < 0:
      raise VerificationError(f"run config: rounds, clients-per-round and min-nodes must be >= 0: "
                              f"{run_config}")
    return config


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
  def exchange(self, messages: list[Any], what: str) -> dict[int, Any]:
    """Send ``messages`` and wait for one reply to each: replies by source node id.

    Raises:
      VerificationError: a node did not reply within ``round-timeout`` (naming it), a reply is an
        error (Flower's, or the node's own refusal: its reason).
    """
    ids = [i for i in self.grid.push_messages(messages) if i]
    if len(ids) != len(messages):
      raise VerificationError(f"{what}: the SuperLink accepted {len(ids)} of {len(messages)} messages")
    waiting = {i: m.metadata.dst_node_id for i, m in zip(ids, messages)}
    replies: dict[int, Any] = {}
    deadline = time.monotonic() + self.config.round_timeout
    while waiting:
      for reply in self.grid.pull_messages(list(waiting)):
        node = waiting.pop(reply.metadata.reply_to_message_id, None)
        if node is None:
          continue
        if reply.has_error():
          raise VerificationError(f"{what}: node {self.label(node)} failed: {reply.error.reason}")
        if protocol.ERROR in reply.content.config_records:
          reason = reply.content.config_records[protocol.ERROR]["reason"]
          raise VerificationError(f"{what}: node {self.label(node)} refused: {reason}")
        replies[node] = reply
      if waiting and time.monotonic() > deadline:
        missing = ", ".join(self.label(n) for n in waiting.values())
        raise VerificationError(f"{what}: no reply from node(s) {missing} within the round timeout "
                                f"of {self.config.round_timeout:g} s")
      if waiting:
        time.sleep(POLL_S)
    return replies

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
    messages = [self.message(RecordDict({protocol.TASK: ConfigRecord({"step": "install"}),
                                         protocol.PROGRAMS: programs}), i, protocol.INSTALL, "install")
                for i in ids]
    start = time.monotonic()
    replies = self.exchange(messages, "installing the client program")
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
    replies = self.exchange(messages, f"{invocation}, {piece or 'sending held values'}")
    exchange = time.monotonic() - sent_at
    out, timings = [], []
    for n in nodes:
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
      out.append(got)
      timings.append(dict(reply.content.config_records[protocol.NODE]))
    self.current.setdefault("node_timings", []).append(
        {"piece": piece, "exchange_seconds": exchange, "nodes": timings})
    return out


class FlowerBackend(PerClientBackend):
  """The stage interpreter's backend for one invocation on Flower: server pieces here, client work
  on the sampled nodes, aggregation by the inherited rules over the received uploads.

  A CLIENTS value stays on the nodes (``ON_NODE``) unless the server needs it: an aggregation's
  value or weight, or a CLIENTS output. Those come back with the client work that makes them, or,
  when they are the nodes' own inputs or a stage has no client work, with the stage's client work
  or a message that only asks for them (``aggregate``).
  """

  def __init__(self, session: Session, form: FederatedForm, invocation: str, nodes: list[Node]):
    super().__init__(len(nodes), self._server_call)
    self.session, self.form, self.invocation, self.nodes = session, form, invocation, nodes
    self.needed = {n for st in form.stages for a in st.aggregations for n in (a.value, a.weight) if n}
    self.needed |= {b.name for b in form.outputs if b.placement is CLIENTS}
    self.specs = {b.name: b.spec for b in form.inputs}
    for stage in form.stages:
      self.specs.update({s.name: s for s in stage.client_work.outputs})

  def _server_call(self, piece: Piece, args: list[np.ndarray]) -> list[np.ndarray]:
    return self.session.server_pieces[self.form.name, piece.name](args)

  def _read_later(self, index: int) -> set[str]:
    later = set()
    for stage in self.form.stages[index + 1:]:
      later |= {s.name for s in stage.client_work.inputs}
    return later

  def broadcast(self, values):
    return {k: Sent(np.asarray(v)) for k, v in values.items()}

  def clients(self, piece, args):
    index = next(i for i, st in enumerate(self.form.stages) if st.client_work is piece)
    sent = {k: v.value for k, v in args.items() if isinstance(v, Sent)}
    names = [s.name for s in piece.outputs]
    # what this stage aggregates: the piece's outputs, and values the nodes already hold
    aggregated = [n for a in self.form.stages[index].aggregations for n in (a.value, a.weight) if n]
    returns = [n for n in names if n in self.needed]
    returns += [n for n in dict.fromkeys(aggregated) if n not in names]
    keep = [n for n in names if n in self._read_later(index)]
    uploads = self.session.work(self.invocation, self.form.name, piece.name, self.nodes, sent,
                                returns, keep, self.specs)
    out: dict[str, Any] = {n: ON_NODE for n in names}
    out.update({n: [u[n] for u in uploads] for n in returns})
    return out

  def aggregate(self, aggregations, uploads):
    held = [n for n in dict.fromkeys(x for a in aggregations for x in (a.value, a.weight) if x)
            if uploads[n] is ON_NODE]
    if held:  # a stage without client work aggregating what the nodes hold: ask for it
      got = self.session.work(self.invocation, self.form.name, "", self.nodes, {}, held, [],
                              self.specs)
      uploads = {**uploads, **{n: [u[n] for u in got] for n in held}}
    return super().aggregate(aggregations, uploads)

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


def run(grid: Any, run_config: dict[str, Any]) -> None:
  """Everything the ServerApp does: read the export, install the client program on the nodes, run
  the program, write each invocation's outputs and the record (see the module docstring)."""
  config = RunConfig.read(run_config)
  config.out.mkdir(parents=True, exist_ok=True)
  app = protocol.read_app(config.export, pieces_present=True)
  forms = {name: FederatedForm.from_json(comp, name) for name, comp in app.plan["computations"].items()}
  session = Session(grid, app, config)
  started = time.monotonic()
  session.install()
  server_inputs: dict[str, np.ndarray] = {}
  if config.server_inputs is not None:
    with np.load(config.server_inputs, allow_pickle=False) as f:
      server_inputs = {k: f[k] for k in f.files}
  calls = iter(range(1 << 30))

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
    nodes = session.sample(index) if form.stages else []
    session.current = {"invocation": invocation, "nodes": [n.node_id for n in nodes],
                       "labels": [n.label for n in nodes]}
    start = time.monotonic()
    backend = FlowerBackend(session, form, invocation, nodes)
    try:
      outputs = interpret(form, backend, backend.inputs(form, named))
    except ValueError as e:  # a server piece's output does not fit the plan
      raise VerificationError(f"{invocation}: {e}") from None
    session.current["seconds"] = time.monotonic() - start
    _write_npz(config.out / f"{invocation}.npz", outputs)
    session.record["invocations"].append(session.current)
    _write_json(config.out / "record.json", session.record)
    return outputs

  run_program(app.plan["kind"], invoke, server_inputs, config.rounds, app.plan.get("state"), who="flower")
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
      _write_json(out / "result.json", {"status": "error", "error": str(e)})
      raise
    except Exception as e:
      out.mkdir(parents=True, exist_ok=True)
      _write_json(out / "result.json", {"status": "error", "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()})
      raise
    _write_json(out / "result.json", {"status": "ok"})

  return app


__all__ = ["FlowerBackend", "RunConfig", "Session", "run", "server_app"]

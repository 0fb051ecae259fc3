"""Faults on the ``flower`` runtime (converters/flower/, docs/flower.md "Faults"), and its progress.

A node that drops out of a round (its SuperNode killed, or no reply within the round timeout):

* by default the round fails with one ``RoundFailedError`` naming the round, the node and the
  timeout; the outputs of the completed rounds stay in the out folder and a later run resumes from
  them (run config ``resume-from``, ``fb.verify(..., resume_from=)``), its later rounds equal to
  native;
* with ``min_clients=k`` the round completes over the nodes that replied if at least ``k`` did, the
  record names them, and verify checks the round against the native program run on exactly their
  data (the export's native program for any number of clients), the state flowing on from it.

Quick tests run the real ServerApp (``server.run``) and the real ClientApp of the export in this
process, messages carried by ``LocalGrid`` (Flower's Grid interface) instead of a SuperLink; a
"dead" node is one whose messages are never answered, so the ServerApp's own round timeout finds
it. Slow tests run real deployments and SIGKILL a SuperNode's process group mid-round, through the
command line (its progress lines on a terminal, its exit code) and ``fb.verify``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

import faxbridge as fb
from examples import fedavg
from faxbridge._src import verify as fverify
from faxbridge._src.export import read_manifest
from faxbridge._src.form import run_program
from faxbridge.converters.flower import deployment, node, protocol, server
from faxbridge.extend import RoundFailedError, VerificationError

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 0.5  # the quick tests' round timeout: a dead node costs this much


# -- programs and their independent answers -------------------------------------------------------
@fb.computation()
def zeros():
  return np.zeros(3, np.float32)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def step(state, x):
  """state + mean over clients of (state / 2 + x_i), and the sum of the x_i."""
  y = fb.map(lambda s, xi: s * 0.5 + xi, fb.broadcast(state), x)
  return state + fb.mean(y), fb.sum(x)


process = fb.IterativeProcess(zeros, step)


def step_numpy(x: np.ndarray, rounds_clients: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(state, metric) after each round, round r over the clients ``rounds_clients[r - 1]``."""
  state, out = np.zeros(3, np.float32), []
  for chosen in rounds_clients:
    xs = x[chosen]
    state = state + (state * 0.5 + xs).mean(0)
    out.append((state, xs.sum(0)))
  return out


@fb.computation(in_placements=(fb.CLIENTS,))
def two_stages(x):
  """A second stage reading what the first kept on the node: the clients' variance about their
  mean (a drop in stage 1 must restart stage 0, or the mean would be over other clients)."""
  mean = fb.mean(x)
  return mean, fb.mean(fb.map(lambda m, xi: (xi - m) ** 2, fb.broadcast(mean), x))


def _x(clients: int = 4) -> np.ndarray:
  return np.random.default_rng(3).normal(size=(clients, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def step_app(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("faults") / "step"
  return fb.export(process, _x(), target="flower", out_dir=out, client_runtime="iree")


# -- the core: a round on some clients, natively; resuming; runtime options ------------------------
def test_run_program_resumes_after_a_round_from_its_outputs():
  calls = []

  def run(name, named):
    calls.append((name, dict(named)))
    return {"s": named["t"] + 1} if name == "next" else {"s": np.int32(0)}

  links = {"initialize_to_next": [{"from": "s", "to": "t"}], "next_to_next": [{"from": "s", "to": "t"}]}
  out = run_program("iterative_process", run, {}, 4, links, resume=(2, {"s": np.int32(10)}))
  assert [c[0] for c in calls] == ["next", "next"]  # rounds 3 and 4 only, initialize not run
  assert calls[0][1] == {"t": 10}
  assert out == {"round3/s": 11, "round4/s": 12}


def test_the_native_program_runs_a_round_on_exactly_the_clients_it_aggregated(step_app):
  """Round 2 on clients 0, 2, 3 only: the export's native program for any number of clients
  runs it, and the state flows on into round 3 (all clients) on both sides."""
  manifest = read_manifest(step_app)
  assert manifest["native_any_clients"] == {"next": "native_any_clients/next.jax"}
  x = _x()
  got = fverify.native_outputs(step_app, manifest, {"x": x}, 3, {"round2": [0, 2, 3]})
  want = step_numpy(x, [[0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3]])
  names = [s["name"] for s in manifest["next"]["outputs"]]
  for r, (state, metric) in enumerate(want, 1):
    np.testing.assert_allclose(got[f"round{r}/{names[0]}"], state, rtol=1e-6)
    np.testing.assert_allclose(got[f"round{r}/{names[1]}"], metric, rtol=1e-6)
  # all clients listed is the ordinary native program, on the same inputs
  same = fverify.native_outputs(step_app, manifest, {"x": x}, 1, {"round1": [0, 1, 2, 3]})
  np.testing.assert_array_equal(same[f"round1/{names[0]}"], got[f"round1/{names[0]}"])


@pytest.mark.parametrize("indices, match", [([2, 0], "in increasing order"), ([0, 4], "0..3"),
                                            ([], "in increasing order"), ([1, 1], "distinct")])
def test_verify_refuses_a_client_list_that_is_not_of_its_clients(step_app, indices, match):
  with pytest.raises(VerificationError, match=match):
    fverify.native_outputs(step_app, read_manifest(step_app), {"x": _x()}, 1, {"round1": indices})


def test_without_a_native_program_for_any_number_of_clients_a_partial_round_is_refused(tmp_path):
  out = fb.export(process, _x(), target="stablehlo", out_dir=tmp_path / "s")
  manifest = read_manifest(out)
  assert "native_any_clients" not in manifest  # written by targets whose rounds may be partial
  with pytest.raises(VerificationError, match=r"round1 on 3 of the 4 clients .*no native program "
                                              r"of next for a number of clients other than 4"):
    fverify.native_outputs(out, manifest, {"x": _x()}, 1, {"round1": [0, 1, 2]})


def test_runtime_options_are_checked_before_anything_runs(step_app, tmp_path):
  other = fb.export(process, _x(), target="stablehlo", out_dir=tmp_path / "s")
  with pytest.raises(VerificationError, match=r"runtime 'iree' has no option 'min_clients' "
                                              r"\(it takes none\)"):
    fb.verify(other, _x(), runtime="iree", min_clients=3)
  with pytest.raises(VerificationError, match=r"option min_clients='3' of runtime 'flower' must be "
                                              r"of type int"):
    fb.verify(step_app, _x(), runtime="flower", min_clients="3")
  with pytest.raises(VerificationError, match="runtime 'flower' has no option 'min_nodes'"):
    fb.verify(step_app, _x(), runtime="flower", min_nodes=3)


# -- the ServerApp and the ClientApp in this process ----------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
  """What Flower sets in a ServerApp or ClientApp process before a Message can be made."""
  from flwr.supercore.task_identity import TaskIdentity

  for name in ("_run_id", "_task_id", "_node_id"):
    monkeypatch.setattr(TaskIdentity, name, 1)
  return TaskIdentity


class LocalGrid:
  """Flower's Grid (``get_node_ids``, ``push_messages``, ``pull_messages``) carrying each message
  in this process to the export's own ClientApp (``node.client_app``), called with a Context per
  node as a SuperNode's ClientApp process calls it. ``dead``: node id -> how many work messages it
  answers before it dies (its later messages, and their replies, never come)."""

  def __init__(self, app_dir: Path, folder: Path, x: np.ndarray, identity, dead=None):
    from flwr.app import RecordDict

    self.app, self.identity, self.dead = node.client_app(app_dir), identity, dict(dead or {})
    self.configs, self.states = {}, {}
    for k in range(len(x)):
      (folder / f"n{k}").mkdir(parents=True, exist_ok=True)
      np.savez(folder / f"n{k}" / "data.npz", x=x[k])
      self.configs[100 + k] = {"data": str(folder / f"n{k}" / "data.npz"), "label": f"client-{k:04d}",
                               "store": str(folder / f"n{k}" / "programs")}
      self.states[100 + k] = RecordDict()
    self.answered: Counter = Counter()
    self.replies: dict[str, object] = {}

  def get_node_ids(self):
    return list(self.configs)

  def push_messages(self, messages):
    from flwr.app import Context

    ids = []
    for m in messages:
      to = m.metadata.dst_node_id
      m.metadata.__dict__["_message_id"] = f"{to}:{m.object_id}"  # as the SuperLink names it
      ids.append(m.metadata.message_id)
      work = m.metadata.message_type == protocol.WORK
      if work and self.answered[to] >= self.dead.get(to, math.inf):
        continue  # it died: no reply will come
      self.identity.node_id = to
      context = Context(1, to, self.configs[to], self.states[to], {})
      self.replies[m.metadata.message_id] = self.app(m, context)
      self.answered[to] += work
    return ids

  def pull_messages(self, ids):
    return [self.replies.pop(i) for i in ids if i in self.replies]


def _run_config(app: Path, out: Path, **more) -> dict:
  return {"export": str(app), "out": str(out), "rounds": 3, "clients-per-round": 0, "min-nodes": 4,
          "round-timeout": TIMEOUT_S, "seed": 0, **more}


def _outputs(out: Path, record: dict, names: list[str]) -> dict[str, list[np.ndarray]]:
  """The outputs ``names`` of each invocation but initialize, as the ServerApp wrote them."""
  got = {}
  for inv in record["invocations"][1:] if record["invocations"][0]["invocation"] == "initialize" \
      else record["invocations"]:
    with np.load(out / f"{inv['invocation']}.npz") as f:
      got[inv["invocation"]] = [f[n] for n in names]
  return got


def _events(out: Path) -> list[str]:
  return [json.loads(line)["message"] for line in (out / server.PROGRESS).read_text().splitlines()]


def test_a_node_that_never_replies_fails_the_round_naming_it_and_the_rounds_before_stay(
    step_app, tmp_path, task_identity):
  x = _x()
  grid = LocalGrid(step_app, tmp_path / "nodes", x, task_identity, dead={101: 1})  # round 2
  out = tmp_path / "out"
  with pytest.raises(RoundFailedError) as caught:
    server.run(grid, _run_config(step_app, out))
  message = str(caught.value)
  assert message.startswith(f"round2: node client-0001 (101) dropped out: no reply within the "
                            f"round timeout of {TIMEOUT_S:g} s."), message
  assert f"resume after round 1 with the run config resume-from='{out}'" in message
  record = json.loads((out / "record.json").read_text())
  assert [inv["invocation"] for inv in record["invocations"]] == ["initialize", "round1"]
  assert sorted(p.name for p in out.glob("*.npz")) == ["initialize.npz", "round1.npz"]
  names = [s["name"] for s in read_manifest(step_app)["next"]["outputs"]]
  np.testing.assert_allclose(_outputs(out, record, names)["round1"][0],
                             step_numpy(x, [[0, 1, 2, 3]])[0][0], rtol=1e-6)
  assert "flower: round1 done" in " ".join(_events(out))


def test_min_clients_completes_the_rounds_over_the_nodes_that_replied(step_app, tmp_path,
                                                                      task_identity):
  x = _x()
  grid = LocalGrid(step_app, tmp_path / "nodes", x, task_identity, dead={101: 1})
  out = tmp_path / "out"
  server.run(grid, _run_config(step_app, out, **{"min-clients": 3}))
  record = json.loads((out / "record.json").read_text())
  aggregated = {inv["invocation"]: inv["aggregated_labels"] for inv in record["invocations"]}
  everyone = [f"client-{k:04d}" for k in range(4)]
  assert aggregated == {"initialize": [], "round1": everyone,
                        "round2": ["client-0000", "client-0002", "client-0003"],
                        "round3": ["client-0000", "client-0002", "client-0003"]}
  assert [d["label"] for d in record["invocations"][2]["dropped"]] == ["client-0001 (101)"]
  names = [s["name"] for s in read_manifest(step_app)["next"]["outputs"]]
  got = _outputs(out, record, names)
  want = step_numpy(x, [[0, 1, 2, 3], [0, 2, 3], [0, 2, 3]])
  for r, (state, metric) in enumerate(want, 1):
    np.testing.assert_allclose(got[f"round{r}"][0], state, rtol=1e-6)
    np.testing.assert_allclose(got[f"round{r}"][1], metric, rtol=1e-6)
  events = _events(out)
  assert any(e.startswith("flower: round2: node client-0001 (101) dropped out") and
             "going on over 3 of 4 nodes (min-clients 3)" in e for e in events), events
  assert "flower: round3 done" in " ".join(events)


def test_fewer_replies_than_min_clients_fail_the_round(step_app, tmp_path, task_identity):
  grid = LocalGrid(step_app, tmp_path / "nodes", _x(), task_identity, dead={101: 0, 102: 0})
  with pytest.raises(RoundFailedError, match=r"^round1: 2 of the 4 sampled nodes remain, fewer "
                                             r"than min-clients=3: node client-0001 \(101\) dropped "
                                             r"out: no reply within the round timeout"):
    server.run(grid, _run_config(step_app, tmp_path / "out", **{"min-clients": 3}))


def test_a_drop_at_a_later_stage_restarts_the_round_over_the_others(tmp_path, task_identity):
  """Node 1 answers stage 0 and dies before stage 1: stage 0's mean included it, so the round
  runs again over the other three, and both its aggregations are theirs."""
  x = _x()
  app = fb.export(two_stages, x, target="flower", out_dir=tmp_path / "app", client_runtime="iree")
  grid = LocalGrid(app, tmp_path / "nodes", x, task_identity, dead={101: 1})
  out = tmp_path / "out"
  server.run(grid, _run_config(app, out, **{"min-clients": 2}))
  record = json.loads((out / "record.json").read_text())
  (inv,) = record["invocations"]
  assert inv["restarts"] == 1 and inv["aggregated_labels"] == ["client-0000", "client-0002",
                                                               "client-0003"]
  kept = x[[0, 2, 3]]
  names = [s["name"] for s in read_manifest(app)["computation"]["outputs"]]
  mean, var = _outputs(out, record, names)["computation"]
  np.testing.assert_allclose(mean, kept.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, ((kept - kept.mean(0)) ** 2).mean(0), rtol=1e-5)


def test_a_run_resumes_from_the_out_folder_of_a_failed_one(step_app, tmp_path, task_identity):
  """The failed run leaves initialize and round 1; the resumed run (all nodes back) runs rounds 2
  and 3 from round 1's state, as an unbroken run over all clients computes them."""
  x = _x()
  failed = tmp_path / "failed"
  with pytest.raises(RoundFailedError):
    server.run(LocalGrid(step_app, tmp_path / "n1", x, task_identity, dead={102: 1}),
               _run_config(step_app, failed))
  out = tmp_path / "resumed"
  grid = LocalGrid(step_app, tmp_path / "n2", x, task_identity)
  server.run(grid, _run_config(step_app, out, **{"resume-from": str(failed)}))
  record = json.loads((out / "record.json").read_text())
  assert record["resumed_from"] == {"folder": str(failed), "round": 1}
  assert [inv["invocation"] for inv in record["invocations"]] == ["initialize", "round1", "round2",
                                                                  "round3"]
  assert grid.answered == Counter({k: 2 for k in range(100, 104)})  # rounds 2 and 3 only
  names = [s["name"] for s in read_manifest(step_app)["next"]["outputs"]]
  got = _outputs(out, record, names)
  for r, (state, metric) in enumerate(step_numpy(x, [[0, 1, 2, 3]] * 3), 1):
    np.testing.assert_allclose(got[f"round{r}"][0], state, rtol=1e-6)
    np.testing.assert_allclose(got[f"round{r}"][1], metric, rtol=1e-6)
  assert "flower: resuming after round 1" in " ".join(_events(out))


def test_resuming_refuses_a_folder_of_another_export_or_with_nothing_done(step_app, tmp_path,
                                                                         task_identity):
  x = _x()
  other = fb.export(two_stages, x, target="flower", out_dir=tmp_path / "other",
                    client_runtime="iree")
  theirs = tmp_path / "theirs"
  server.run(LocalGrid(other, tmp_path / "n1", x, task_identity), _run_config(other, theirs))
  grid = LocalGrid(step_app, tmp_path / "n2", x, task_identity)
  with pytest.raises(VerificationError, match=r"its record is of another export"):
    server.run(grid, _run_config(step_app, tmp_path / "o1", **{"resume-from": str(theirs)}))
  with pytest.raises(VerificationError, match=r"no record.json of an earlier run there"):
    server.run(grid, _run_config(step_app, tmp_path / "o2", **{"resume-from": str(tmp_path)}))
  assert sum(grid.answered.values()) == 0  # refused before any node was asked for anything


# -- real deployments: a SuperNode killed mid-round -----------------------------------------------
TAG = "FAXBRIDGE_TEST_FAULTS"  # in the environment of this module's deployments, and only theirs


def _deployment_processes(tag: str) -> dict[int, tuple[str, str]]:
  """Live processes of the faxbridge Flower deployments started with ``TAG=tag`` in their
  environment (other deployments on the machine are not this test's): pid -> (the deployment's
  folder, command line)."""
  found = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
      cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
      state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
      continue
    marker = [e for e in env if e.startswith(f"{deployment.MARKER}=".encode())]
    if marker and f"{TAG}={tag}".encode() in env and state != "Z":
      found[int(entry)] = (marker[0].split(b"=", 1)[1].decode(), cmd)
  return found


@pytest.fixture
def tag(monkeypatch, tmp_path) -> str:
  """A tag of this test's deployments (fb.verify's here, the CLI's in a child)."""
  value = str(tmp_path)
  monkeypatch.setenv(TAG, value)
  return value


def _kill_node_after(tag: str, out: Path, label_index: int, after: str, log: list
                     ) -> threading.Thread:
  """A thread that waits for ``out/AFTER.npz`` (an invocation completed), finds the deployment
  (tagged ``tag``) whose run config writes to ``out`` and SIGKILLs the process group of its
  SuperNode ``label_index`` (the SuperNode, its SuperExec and any ClientApp process it started)."""

  def kill():
    deadline = time.monotonic() + 600
    while not (out / f"{after}.npz").exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    for pid, (root, cmd) in _deployment_processes(tag).items():
      runs = sorted((Path(root) / "logs").glob("flwr-run*.toml"))  # a run's config, named by its run
      if (f"supernode-{label_index}.toml" in cmd and "flower-supernode" in cmd
              and any(f'out = "{out}"' in config.read_text() for config in runs)):
        group = os.getpgid(pid)
        members = [p for p in _deployment_processes(tag) if _pgid(p) == group]
        os.killpg(group, signal.SIGKILL)
        log.append((time.monotonic(), members))
        return

  thread = threading.Thread(target=kill, daemon=True)
  thread.start()
  return thread


def _pgid(pid: int) -> int:
  try:
    return os.getpgid(pid)
  except ProcessLookupError:
    return -1


def _cli_on_a_terminal(args: list[str], timeout: float = 900) -> tuple[int, str, str]:
  """``python -m faxbridge ARGS`` with stderr on a pseudo-terminal (so it prints progress, as in a
  person's shell) and stdout on a pipe: (exit code, stdout, stderr)."""
  import pty

  leader, follower = pty.openpty()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(REPO)
  proc = subprocess.Popen([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=follower, text=True)
  os.close(follower)
  chunks: list[bytes] = []

  def drain():  # a terminal's buffer is small: read while it runs
    while True:
      try:
        data = os.read(leader, 4096)
      except OSError:  # EIO: the last writer has gone
        return
      if not data:
        return
      chunks.append(data)

  reader = threading.Thread(target=drain, daemon=True)
  reader.start()
  try:
    stdout, _ = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  reader.join(timeout=10)
  os.close(leader)
  return proc.returncode, stdout, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _progress(stderr: str) -> list[str]:
  return [line.split("] ", 1)[1] for line in stderr.splitlines() if line.startswith("[")]


@pytest.fixture(scope="module")
def fedavg_app(tmp_path_factory) -> tuple[Path, Path, tuple]:
  """FedAvg for 4 clients as a Flower App (IREE nodes), and its inputs as an .npz by name."""
  tmp = tmp_path_factory.mktemp("fedavg")
  inputs = tuple(fedavg.example_inputs(4)[1:])
  app = fb.export(fedavg.process, *inputs, target="flower", out_dir=tmp / "app",
                  client_runtime="iree")
  specs = read_manifest(app)["next"]["inputs"]
  np.savez(tmp / "inputs.npz", **{s["name"]: np.asarray(v)
                                  for s, v in zip(specs, jax.tree.leaves(inputs))})
  return app, tmp / "inputs.npz", inputs


def _per_round_lines(progress: list[str], rounds: range) -> None:
  """Each round's start and end, in order, as the ServerApp reported them while it ran."""
  for r in rounds:
    start = progress.index(f"flower: round {r} of 3")
    done = next(i for i, line in enumerate(progress) if line.startswith(f"flower: round{r} done in "))
    assert start < done, progress
    if r > rounds.start:
      assert progress.index(f"flower: round {r - 1} of 3") < start


@pytest.mark.slow
def test_a_killed_supernode_fails_the_round_and_the_run_resumes_equal_to_native(fedavg_app, tmp_path,
                                                                                 tag):
  """The command line, a SuperNode SIGKILLed once round 1 is done: exit 1 and one line naming
  round 2, the node and the timeout, after progress lines of round 1; round 1's outputs on disk;
  then fb.verify resumes from them and rounds 2 and 3 (all nodes back) equal native."""
  app, inputs_npz, inputs = fedavg_app
  out = tmp_path / "out"
  killed: list = []
  killer = _kill_node_after(tag, out, 1, "round1", killed)
  rc, stdout, stderr = _cli_on_a_terminal(["verify", app, "--runtime=flower", "--rounds", "3",
                                           "--inputs", inputs_npz, "--round-timeout", "120",
                                           "--out-dir", out])
  killer.join(timeout=5)
  assert killed, f"no SuperNode was killed:\n{stderr[-3000:]}"
  assert len(killed[0][1]) >= 1, killed  # found by the tag: the SuperNode (its executor, a group of
  # its own, stops when its SuperNode is gone)
  assert rc == 1, (rc, stdout, stderr[-3000:])
  errors = [line for line in stderr.splitlines() if line.startswith("faxbridge verify:")]
  assert len(errors) == 1, stderr[-3000:]
  assert errors[0].startswith("faxbridge verify: RoundFailedError: the Flower run failed: round2: "
                              "node client-0001 ("), errors[0]
  assert "round timeout of 120 s" in errors[0] and f"resume-from='{out}'" in errors[0]
  assert issubclass(RoundFailedError, VerificationError)  # what fb.verify raised, the CLI printed
  _per_round_lines(_progress(stderr), range(1, 2))
  record = json.loads((out / "record.json").read_text())
  assert [inv["invocation"] for inv in record["invocations"]] == ["initialize", "round1"]
  assert not (out / "round2.npz").exists()
  assert not _deployment_processes(tag)  # every process of the deployments is gone
  # resume: rounds 2 and 3 on a fresh deployment, from round 1's state on disk
  resumed = tmp_path / "resumed"
  report = fb.verify(app, *inputs, runtime="flower", rounds=3, resume_from=str(out),
                     out_dir=str(resumed))
  print(report)
  assert report.ok, str(report)
  assert {c.name.split("/")[0] for c in report.checks} == {"initialize", "round1", "round2", "round3"}
  assert "rounds 1 to 1 read back" in report.info["resumed"]
  record = json.loads((resumed / "record.json").read_text())
  assert record["resumed_from"]["round"] == 1
  assert [inv["aggregated_labels"] for inv in record["invocations"][2:]] == \
      [[f"client-{k:04d}" for k in range(4)]] * 2
  assert not _deployment_processes(tag)  # every process of the deployments is gone


@pytest.mark.slow
def test_a_killed_supernode_with_min_clients_completes_the_rounds_over_the_others(fedavg_app,
                                                                                  tmp_path, tag):
  """The command line with --min-clients 3, a SuperNode SIGKILLed once round 1 is done: rounds 2
  and 3 complete over the other three, progress lines show every round as it ends, the record
  names the clients aggregated, and verify passes against native run on exactly their data; the
  outputs also equal FedAvg's Python program run on those clients' data."""
  app, inputs_npz, inputs = fedavg_app
  out = tmp_path / "out"
  killed: list = []
  killer = _kill_node_after(tag, out, 1, "round1", killed)
  rc, stdout, stderr = _cli_on_a_terminal(["verify", app, "--runtime=flower", "--rounds", "3",
                                           "--inputs", inputs_npz, "--round-timeout", "120",
                                           "--min-clients", "3", "--out-dir", out])
  killer.join(timeout=5)
  assert killed, f"no SuperNode was killed:\n{stderr[-3000:]}"
  assert len(killed[0][1]) >= 1, killed  # found by the tag: the SuperNode (its executor, a group of
  # its own, stops when its SuperNode is gone)
  assert rc == 0, (rc, stdout, stderr[-3000:])
  assert "OK: all 19 outputs on flower equal native" in stdout, stdout
  assert "round2 run on clients [0, 2, 3] only" in stdout and "round3 run on clients [0, 2, 3]" \
      in stdout, stdout
  progress = _progress(stderr)
  _per_round_lines(progress, range(1, 4))
  assert any(line.startswith("flower: round2: node client-0001") and "going on over 3 of 4 nodes"
             in line for line in progress), progress
  record = json.loads((out / "record.json").read_text())
  labels = {inv["invocation"]: inv["aggregated_labels"] for inv in record["invocations"]}
  assert labels["round1"] == [f"client-{k:04d}" for k in range(4)]
  assert labels["round2"] == labels["round3"] == ["client-0000", "client-0002", "client-0003"]
  # independently of verify: FedAvg's own Python program, round 1 on all, then on clients 0, 2, 3
  names = [s["name"] for s in read_manifest(app)["next"]["outputs"]]
  state = fedavg.process.initialize()
  for r, chosen in enumerate([[0, 1, 2, 3], [0, 2, 3], [0, 2, 3]], 1):
    data = jax.tree.map(lambda a, c=chosen: np.asarray(a)[c], inputs)
    result = fedavg.process.next(state, *data)
    with np.load(out / f"round{r}.npz") as f:
      for name, want in zip(names, jax.tree.leaves(result)):
        np.testing.assert_allclose(f[name], want, rtol=1e-5, atol=1e-6)
    state = result[0]
  assert not _deployment_processes(tag)  # every process of the deployments is gone

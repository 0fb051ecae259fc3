"""``fb.verify(DIR, ..., runtime="flower")``: a real local Flower deployment of a flower export.

One SuperLink and one SuperNode per client, each its own OS process (its own process group), on
free ports of 127.0.0.1, with Flower's telemetry and update checks off and ``FLWR_HOME`` in a
temporary folder: insecure HTTP by default (loopback only), or with TLS, SuperNode authentication
and nodes that require signed apps as a :class:`~faxbridge.converters.flower.security.LocalSecurity`
says. Node ``k`` gets client ``k``'s slice of the
CLIENTS inputs as a file of its own data-dir (node config ``data-dir=...``, ``label=client-000k``;
the run config names the file: ``dataset=...``); the SERVER inputs go to the ServerApp as an
``.npz`` named in the run config. ``flwr run DIR local`` runs the rounds; the outputs come back from
the ServerApp's output folder.

The SuperLink and the SuperNodes run with ``--isolation process`` beside a warm executor each
(executor.py): every message's ClientApp and every run's ServerApp is a fork of a Python that has
imported flwr, faxbridge and the client runtimes once, instead of a new Python per message
(``warm=False``: Flower's own subprocess isolation). :func:`reused` keeps one deployment for many
runs (of programs of up to its number of clients), which may go at once.

Every process started here is stopped when the run ends, fails or is interrupted (Ctrl-C): each
process group is terminated, then killed; and since Flower's ``flower-superexec`` and app processes
may outlive their parent, every process that carries this deployment's marker in its environment
(``FAXBRIDGE_FLOWER_DEPLOYMENT=<its folder>``) is killed by pid. :func:`leftovers` finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge import CLIENTS
from faxbridge.converters.flower.security import LocalSecurity, make_node_key, make_tls
from faxbridge.converters.flower.server import PROGRESS
from faxbridge.converters.runtimes.progress import ProgressFile, wait
from faxbridge.extend import (
  Binding,
  RoundFailedError,
  RuntimeResult,
  VerificationError,
  client_values,
  emit,
  importable,
)

MARKER = "FAXBRIDGE_FLOWER_DEPLOYMENT"
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 900.0
EXECUTABLES = ("flower-superlink", "flower-supernode", "flwr")


def _bin(name: str) -> str:
  """A Flower executable: beside this Python's (a venv's bin, which may not be on PATH), else PATH."""
  here = Path(sys.executable).parent / name
  return str(here) if here.exists() else (shutil.which(name) or name)


def available() -> tuple[bool, str]:
  """The registry's probe: flwr importable here and its executables beside this Python."""
  ok, where = importable("flwr")
  if not ok:
    return ok, where
  missing = [n for n in EXECUTABLES if not Path(_bin(n)).exists()]
  if missing:
    return False, f"flwr's executables {missing} are not beside {sys.executable} nor on PATH"
  import importlib.metadata

  return True, f"flwr {importlib.metadata.version('flwr')}, processes on 127.0.0.1"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def _markers(pid: int, name: bytes) -> list[bytes]:
  """The values of environment variable ``name`` of process ``pid`` (none when it is gone)."""
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      return [v[len(name) + 1:] for v in f.read().split(b"\0") if v.startswith(name + b"=")]
  except OSError:  # gone, or not ours to read
    return []


def leftovers(root: Path, below: bool = False) -> list[int]:
  """The pids of live processes of the deployment in ``root`` (by its marker in their
  environment), or with ``below`` of every deployment in a folder under ``root`` too (a test's
  own, whatever else runs beside it); zombies are not counted."""
  folder = str(root).encode()
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    values = _markers(int(entry), MARKER.encode())
    if any(v == folder or (below and v.startswith(folder + b"/")) for v in values):
      try:
        with open(f"/proc/{entry}/stat") as f:
          state = f.read().rsplit(")", 1)[1].split()[0]
      except OSError:
        continue
      if state != "Z":
        found.append(int(entry))
  return found


def _toml(path: Path, values: Mapping[str, Any]) -> Path:
  """``values`` (strings, numbers) as a flat TOML file (a JSON string is a TOML basic string)."""
  path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
  return path


class LocalDeployment:
  """A SuperLink and SuperNodes on 127.0.0.1, started on ``__enter__`` and all stopped on
  ``__exit__``, whatever happened in between.

  Args:
    root: a folder of its own (FLWR_HOME, logs, the nodes' folders go inside).
    node_configs: one ``--node-config`` mapping per SuperNode.
    security: TLS and SuperNode authentication (:meth:`link_flags`, :meth:`register`,
      :meth:`node_flags`); None: insecure HTTP.
    warm: apps run in forks of a warm executor per SuperNode and SuperLink (``--isolation
      process``); False: in a new Python each, started by Flower's own SuperExec.
  """

  def __init__(self, root: Path, node_configs: Sequence[Mapping[str, str]],
               security: LocalSecurity | None = None, warm: bool = True):
    self.root, self.node_configs, self.warm = root, node_configs, warm
    self.security = security or LocalSecurity()
    if self.security.node_keys and len(self.security.node_keys) != len(node_configs):
      raise ValueError(f"{len(self.security.node_keys)} node keys for {len(node_configs)} SuperNodes: "
                       "give one key per node")
    self.processes: dict[str, subprocess.Popen] = {}
    self.port = 0
    self.runs = 0  # the Flower runs made on it (deploy's; several may run at once, from threads)
    self.runs_lock = threading.Lock()
    self.timings: dict[str, float] = {}
    self.env = {**os.environ, MARKER: str(root), "FLWR_HOME": str(root / "flwr-home"),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                # the SuperNode starts flower-superexec by name: this Python's bin comes first
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

  def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
    log = open(self.root / "logs" / f"{name}.log", "wb")  # noqa: SIM115  # closed in stop()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=self.env, cwd=self.root, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    self.processes[name] = proc
    return proc

  def log_tail(self, name: str, lines: int = 15) -> str:
    try:
      text = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
    except OSError:
      return ""
    return "\n".join(text.splitlines()[-lines:])

  def __enter__(self) -> LocalDeployment:
    try:
      self.start()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc: Any) -> None:
    self.stop()

  def start(self) -> None:
    (self.root / "logs").mkdir(parents=True, exist_ok=True)
    (self.root / "flwr-home").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    self.port = free_port()
    emit("flower.start", f"starting a SuperLink on 127.0.0.1:{self.port}")
    link = self._start("superlink", [_bin("flower-superlink"), *self.link_flags(),
                                     "--disable-runtime-dependency-installation",
                                     "--host", "127.0.0.1", "--port", str(self.port),
                                     *self._isolation()])
    self._start_executor("serverapp", "superlink", link, self.port)
    self._wait_port(self.port, link, "superlink")
    self.timings["superlink_start_s"] = time.monotonic() - t0
    tls = self.security.tls
    (self.root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
        + (f"root-certificates = {json.dumps(str(tls.ca_certificate))}\n" if tls else "insecure = true\n"))
    self.register()
    t1 = time.monotonic()
    emit("flower.start", f"starting {len(self.node_configs)} SuperNodes")
    for k, config in enumerate(self.node_configs):
      # A TOML file, not "k=v ..." pairs: Flower splits those on spaces, and paths may hold some.
      toml = _toml(self.root / "logs" / f"supernode-{k}.toml", config)
      port = free_port()
      node = self._start(f"supernode-{k}", [_bin("flower-supernode"), *self.node_flags(k), "--superlink",
                                            f"127.0.0.1:{self.port}", "--port", str(port),
                                            "--node-config", str(toml), *self._isolation()])
      self._start_executor("clientapp", f"supernode-{k}", node, port)
    self.timings["supernodes_start_s"] = time.monotonic() - t1

  # -- security (docs/flower.md, "TLS and SuperNode keys") --------------------------------------------
  def link_flags(self) -> list[str]:
    """The SuperLink's: TLS with the security's files, node authentication when nodes have keys."""
    tls = self.security.tls
    if tls is None:
      return ["--insecure"]
    flags = ["--ssl-ca-certfile", str(tls.ca_certificate), "--ssl-certfile", str(tls.certificate),
             "--ssl-keyfile", str(tls.private_key)]
    return flags + (["--enable-supernode-auth"] if self.security.node_keys else [])

  def node_flags(self, k: int) -> list[str]:
    """SuperNode ``k``'s: the CA it checks the SuperLink by, the private key it signs with."""
    tls, keys = self.security.tls, self.security.node_keys
    if tls is None:
      return ["--insecure"]
    flags = ["--root-certificates", str(tls.ca_certificate)]
    return flags + (["--auth-supernode-private-key", str(keys[k].private_key)] if keys else [])

  def register(self) -> None:
    """``flwr supernode register KEY.pub local`` for every public key the security registers,
    before any node starts (the SuperLink then admits those nodes only).

    Raises:
      VerificationError: the SuperLink refused a key or did not answer (flwr's output).
    """
    t0 = time.monotonic()
    for k, public_key in enumerate(self.security.public_keys()):
      cmd = [_bin("flwr"), "supernode", "register", str(public_key), "local"]
      log = self.root / "logs" / f"register-{k}.log"
      with open(log, "wb") as f:
        try:
          proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.root, timeout=START_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
          raise VerificationError(f"flwr supernode register {public_key} did not finish within "
                                  f"{START_TIMEOUT_S:g} s") from None
      if proc.returncode != 0:
        raise VerificationError(f"flwr supernode register {public_key} exited with status "
                                f"{proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
    if self.security.node_keys:
      self.timings["register_s"] = time.monotonic() - t0


  def _isolation(self) -> list[str]:
    """``--isolation process`` when apps run in a warm executor (executor.py), not Flower's
    one new Python per message."""
    return ["--isolation", "process"] if self.warm else []

  def _start_executor(self, kind: str, owner: str, proc: subprocess.Popen, port: int) -> None:
    """The warm executor of ``owner`` (the SuperLink's ServerApps or a SuperNode's ClientApps),
    which stops when ``owner`` does."""
    if self.warm:
      tls = self.security.tls
      # The SuperLink serves its Runtime API on its one port, over TLS when it has TLS; a
      # SuperNode's ClientAppIo API is local and plain.
      transport = (["--root-certificates", str(tls.ca_certificate)] if tls and kind == "serverapp"
                   else ["--insecure"])
      self._start(f"{owner}-executor", [sys.executable, "-m", "faxbridge.converters.flower.executor",
                                         "--kind", kind, "--runtime-api-address",
                                         f"127.0.0.1:{port}", *transport, "--parent-pid",
                                         str(proc.pid)])

  def _wait_port(self, port: int, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
      if proc.poll() is not None:
        raise VerificationError(f"the {name} exited with status {proc.returncode} at start:\n"
                                f"{self.log_tail(name)}")
      with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return
      time.sleep(0.1)
    raise VerificationError(f"the {name} did not listen on 127.0.0.1:{port} within "
                            f"{START_TIMEOUT_S:g} s:\n{self.log_tail(name)}")

  def run_app(self, app_dir: Path, run_config: Mapping[str, Any], timeout: float = RUN_TIMEOUT_S,
              name: str = "flwr-run", progress: Path | None = None) -> str:
    """``flwr run APP_DIR local --stream`` with ``run_config``; its output (its log is
    ``logs/NAME.log``: a deployment that serves several runs names each). While it runs, each
    line the ServerApp appends to ``progress`` (its events) is emitted here. Raises
    VerificationError when it fails or runs past ``timeout``."""
    config = _toml(self.root / "logs" / f"{name}.toml", run_config)
    cmd = [_bin("flwr"), "run", str(app_dir), "local", "--stream", "--run-config", str(config)]
    proc = self._start(name, cmd)
    lines = ProgressFile(progress if progress is not None else self.root / "logs" / f"{name}.no-progress")
    try:
      wait(proc, timeout, lines, lambda line: emit(str(line.get("name", "flower")),
                                                    str(line.get("message", "")),
                                                    **dict(line.get("fields") or {})))
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # a deployment that serves more runs goes on
      raise VerificationError(f"flwr run did not finish within {timeout:g} s:\n"
                              f"{self.log_tail(name)}") from None
    finally:
      if proc.poll() is not None:  # ended: nothing of it for stop() to signal (its pid may be reused)
        self.processes.pop(name, None)
        proc.log.close()  # type: ignore[attr-defined]
    if proc.returncode != 0:
      raise VerificationError(f"flwr run exited with status {proc.returncode}:\n"
                              f"{self.log_tail(name)}")
    return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

  def stop(self) -> None:
    """Terminate every process group started here, kill what remains, then kill by pid every
    process carrying this deployment's marker (Flower's superexec and app processes included)."""
    for proc in self.processes.values():
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in self.processes.values():
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in self.processes.values():
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
      proc.log.close()  # type: ignore[attr-defined]
    for _ in range(50):
      pids = leftovers(self.root)
      if not pids:
        break
      for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
          os.kill(pid, signal.SIGKILL)
      time.sleep(0.1)


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
  root = Path(tempfile.mkdtemp(prefix="faxbridge-flower-"))
  try:
    yield root
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _blocks(manifest: dict) -> dict:
  return manifest["next"] if manifest["kind"] == "iterative_process" else manifest["computation"]


def node_configs(root: Path, n: int, trust: Path | None = None) -> list[dict[str, str]]:
  """The node configs of ``n`` SuperNodes, each with a folder of its own under ``root``: node ``k``
  is labelled ``client-000k`` and reads a run's data from its ``data-dir`` (``DATASET.npz``, the
  run config naming DATASET), so that one deployment serves runs of several programs."""
  configs = []
  for k in range(n):
    folder = root / f"node-{k}"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    configs.append({"data-dir": str(folder / "data"), "label": f"client-{k:04d}",
                    "store": str(folder / "programs"), **({"trust": str(trust)} if trust else {})})
  return configs


# The deployments of `reused`, by their number of SuperNodes.
_REUSED: dict[int, LocalDeployment] = {}


@contextlib.contextmanager
def reused(clients: int, warm: bool = True) -> Iterator[LocalDeployment]:
  """One local deployment of ``clients`` SuperNodes, started here and stopped at the end of the
  block, on which every run of a program with at most ``clients`` clients inside the block runs
  (:func:`deploy`, hence ``fb.verify(..., runtime="flower")``; from several threads at once if
  wished) instead of starting a deployment of its own: starting one costs seconds, running a
  program on it only its rounds. Each run has its own dataset on the nodes (``data-dir/runK.npz``,
  node ``k`` holding client ``k``'s data only; a program of fewer clients leaves the last nodes
  without, and they sit the run out), its own output folder and its own Flower run."""
  if clients in _REUSED:
    raise VerificationError(f"a deployment of {clients} SuperNodes is already reused here")
  with _folder() as root, LocalDeployment(root, node_configs(root, clients), warm=warm) as deployment:
    _REUSED[clients] = deployment
    try:
      yield deployment
    finally:
      del _REUSED[clients]


def _client_count(manifest: dict, inputs: Mapping[str, np.ndarray]) -> int:
  """How many clients (one SuperNode each) a run of ``manifest`` with ``inputs`` has."""
  block = _blocks(manifest)
  clients = [s["name"] for s in block["inputs"] if s["placement"] == "CLIENTS"]
  return int(np.shape(inputs[clients[0]])[0]) if clients else int(block["clients"] or 1)


@dataclasses.dataclass(frozen=True)
class _RunSettings:
  """What one run asks of the ServerApp, beside the export and the inputs (see :func:`deploy`)."""

  rounds: int
  server_export: Path | None = None
  seed: int = 0
  keep: Path | None = None
  min_clients: int = 0
  round_timeout: float = 600.0
  out_dir: Path | None = None
  resume_from: Path | None = None


def deploy(export_dir: Path, manifest: dict, inputs: Mapping[str, np.ndarray], rounds: int,
           server_export: Path | None = None, seed: int = 0, keep: Path | None = None,
           min_clients: int = 0, round_timeout: float = 600.0, out_dir: Path | None = None,
           resume_from: Path | None = None, security: LocalSecurity | None = None,
           warm: bool = True) -> RuntimeResult:
  """Run ``export_dir`` on a local deployment: one SuperNode per client of ``inputs``; the
  smallest of :func:`reused` with at least that many SuperNodes when there is one (the others sit
  the run out) and no ``security`` is asked for, else one started for this run.

  ``server_export``: the export the ServerApp reads (default: ``export_dir``, whose app the nodes
  get); a test gives another to prove that nodes refuse a program their app does not pin.
  ``keep``: a folder to copy the ServerApp's record and every process's log into (they are
  otherwise removed with the deployment's temporary folder), to study a run.
  ``min_clients``, ``round_timeout``: the run config's ``min-clients`` and ``round-timeout``.
  ``out_dir``: where the ServerApp writes each invocation's outputs and ``record.json`` (kept);
  None: a temporary folder, removed after a run that completes and kept after one whose round
  failed (the error names it). ``resume_from``: the out folder of an earlier run of this export:
  its rounds are read back, the later ones run now (run config ``resume-from``).
  ``security``: TLS, SuperNode keys (the run waits for and samples the nodes whose key is
  registered: a node refused by the SuperLink has no part in it) and the key nodes require the
  app's signature by (node config ``trust``); None: insecure, unsigned apps run.
  ``warm``: of a deployment started for this run, see :class:`LocalDeployment`.

  Client ``k`` of ``inputs`` is the node labelled ``client-000k``; the result's ``clients`` names,
  for each invocation completed over fewer than all of them (nodes that dropped out, or were not
  admitted), the ones aggregated.

  Raises:
    RoundFailedError: a node dropped out of a round (``min_clients`` not met), naming the round,
      the node, the timeout and the folder holding the completed rounds' outputs.
    VerificationError: a process does not start, a node refuses, the run fails (its reason).
  """
  block = _blocks(manifest)
  n = _client_count(manifest, inputs)
  settings = _RunSettings(rounds, server_export, seed, keep, min_clients, round_timeout,
                          None if out_dir is None else Path(out_dir).resolve(),
                          None if resume_from is None else Path(resume_from).resolve())
  start = time.monotonic()
  if security is None and (fits := [size for size in _REUSED if size >= n]):
    return _run(_REUSED[min(fits)], n, export_dir, block, inputs, settings, start)
  with _folder() as root, LocalDeployment(root, node_configs(root, n, security and security.trust),
                                          security, warm=warm) as deployment:
    return _run(deployment, n, export_dir, block, inputs, settings, start)


def _run(deployment: LocalDeployment, n: int, export_dir: Path, block: dict,
         inputs: Mapping[str, np.ndarray], settings: _RunSettings, start: float) -> RuntimeResult:
  """One Flower run of ``export_dir`` for ``n`` clients on ``deployment`` (see :func:`deploy`):
  client ``k``'s data to node ``k``'s data-dir under a dataset name of this run (nodes beyond
  ``n`` get none and sit the run out), ``flwr run``, the outputs read back; the run's files are
  removed after it (a failed round's outputs are kept: the error names where)."""
  clients = [s["name"] for s in block["inputs"] if s["placement"] == "CLIENTS"]
  server = [s["name"] for s in block["inputs"] if s["placement"] != "CLIENTS"]
  with deployment.runs_lock:
    deployment.runs += 1
    index = deployment.runs
  dataset = f"run{index}"
  folder = deployment.root / "runs" / dataset
  out = settings.out_dir or folder / "out"
  data_files = [Path(config["data-dir"]) / f"{dataset}.npz" for config in deployment.node_configs[:n]]
  admitted = deployment.security.admitted(n)
  try:
    folder.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (PROGRESS, "result.json"):  # an earlier run's, in a folder given again
      (out / stale).unlink(missing_ok=True)
    by_client = {b.name: client_values(b, inputs, n) for b in map(Binding.from_json, block["inputs"])
                 if b.placement is CLIENTS}  # a ragged input: each node its own examples only
    for k, path in enumerate(data_files):
      node_data: dict[str, Any] = {name: by_client[name][k] for name in clients}
      np.savez(path, **node_data)
    run_config: dict[str, Any] = {"export": str(settings.server_export or export_dir), "out": str(out),
                                  "rounds": max(settings.rounds, 1), "clients-per-round": admitted,
                                  # every node admitted: those holding this run's data among them
                                  "min-nodes": len(deployment.node_configs) - (n - admitted),
                                  "seed": settings.seed, "dataset": dataset,
                                  "min-clients": settings.min_clients,
                                  "round-timeout": float(settings.round_timeout)}
    if settings.resume_from is not None:
      run_config["resume-from"] = str(settings.resume_from)
    if server:
      values: dict[str, Any] = {name: np.asarray(inputs[name]) for name in server}
      np.savez(folder / "server_inputs.npz", **values)
      run_config["server-inputs"] = str(folder / "server_inputs.npz")
    emit("flower.run", f"flwr run: {settings.rounds} round(s) on {n} SuperNodes")
    name = f"flwr-run-{dataset}"
    try:
      try:
        deployment.run_app(export_dir, run_config, name=name, progress=out / PROGRESS)
      except VerificationError as e:
        raise _failure(out, str(e)) from None
      result = _read_json(out / "result.json")
      if result.get("status") != "ok":
        raise _failure(out, deployment.log_tail(name))
    except RoundFailedError as e:
      raise RoundFailedError(_kept(e, out, deployment.root, export_dir)) from None
    finally:
      if settings.keep is not None:
        shutil.copytree(deployment.root / "logs", settings.keep / "logs", dirs_exist_ok=True)
        if (out / "record.json").is_file():
          shutil.copy(out / "record.json", settings.keep / "record.json")
    record = _read_json(out / "record.json")
    outputs: dict[str, np.ndarray] = {}
    aggregated: dict[str, list[int]] = {}
    labels_index = {c["label"]: k for k, c in enumerate(deployment.node_configs[:n])}
    for inv in record["invocations"]:
      invocation = inv["invocation"]
      prefix = "" if invocation == "computation" else f"{invocation}/"
      with np.load(out / f"{invocation}.npz", allow_pickle=False) as f:
        outputs.update({prefix + k: f[k] for k in f.files})
      labels = inv.get("aggregated_labels", inv.get("labels", []))
      if inv.get("nodes") and len(labels) < n:
        aggregated[invocation] = sorted(labels_index[label] for label in labels)
  finally:
    for path in data_files:
      path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
  total = time.monotonic() - start
  info = _info(record, deployment, total, index, n)
  if deployment.security != LocalSecurity():
    timings = deployment.timings
    registered = f"; keys registered in {timings['register_s']:.1f} s" if "register_s" in timings else ""
    info["Flower security"] = deployment.security.describe(n) + registered
  return RuntimeResult(outputs=outputs, info=info, clients=aggregated)


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def _failure(out: Path, detail: str) -> VerificationError:
  """The error of a failed run: the ServerApp's own (a RoundFailedError when a round failed), or
  flwr's output when the ServerApp left none."""
  result = _read_json(out / "result.json")
  if result.get("error"):
    kind = RoundFailedError if result.get("round_failed") else VerificationError
    return kind(f"the Flower run failed: {result['error']}")
  return VerificationError(f"the Flower run failed without a result from the ServerApp:\n{detail}")


def _kept(error: RoundFailedError, out: Path, root: Path, export_dir: Path) -> str:
  """The message of a failed round, the completed rounds' outputs kept: a temporary ``out`` is
  moved out of the deployment's folder (which is removed) to a folder of its own, named in the
  message (the ServerApp's message names ``out``), with the calls of verify that resume from it."""
  message = str(error)
  if not (out / "record.json").is_file():  # nothing completed: nothing to keep
    return message
  if out.is_relative_to(root):
    kept = Path(tempfile.mkdtemp(prefix="faxbridge-flower-out-"))
    for path in out.iterdir():
      if path.name != PROGRESS:
        shutil.move(path, kept / path.name)
    message = message.replace(str(out), str(kept))
    out = kept
  return (f"{message} (with verify: fb.verify('{export_dir}', ..., runtime='flower', "
          f"resume_from='{out}'), or faxbridge verify {export_dir} --runtime=flower --resume-from "
          f"{out})")


def _info(record: dict, deployment: LocalDeployment, total: float, index: int, n: int
          ) -> dict[str, Any]:
  """The report's notes: where the time went (docs/flower.md reads them)."""
  rounds = [inv for inv in record["invocations"] if inv["invocation"].startswith("round")]
  install = record.get("install", {}).get("seconds", 0.0)
  apps = ("each app a fork of a warm executor" if deployment.warm
          else "each app a new process (Flower's subprocess isolation)")
  others = len(deployment.node_configs) - n
  info = {"Flower deployment": f"1 SuperLink and {n} SuperNodes, each its own process, 127.0.0.1; "
                               f"{apps}" + (f"; {others} more SuperNode(s) sat the run out, holding "
                                            "no data for it" if others else "")}
  if index > 1:
    info["Flower deployment"] += f"; run {index} on this deployment"
    info["wall time"] = (f"{total:.1f} s for this run, client program installed on the nodes in "
                         f"{install:.1f} s")
  else:
    info["wall time"] = (f"{total:.1f} s in all: SuperLink up in "
                         f"{deployment.timings.get('superlink_start_s', 0.0):.1f} s, client program "
                         f"installed on the nodes in {install:.1f} s")
  if record.get("resumed_from"):
    done = record["resumed_from"]["round"]
    earlier = "initialize" if done == 0 else f"initialize and rounds 1 to {done}"
    info["resumed"] = (f"{earlier} read back from {record['resumed_from']['folder']} (an earlier "
                       "run); the later rounds ran now")
  dropped = [f"{inv['invocation']}: {', '.join(d['label'] for d in inv['dropped'])}"
             for inv in record["invocations"] if inv.get("dropped")]
  if dropped:
    info["dropped out"] = "; ".join(dropped) + " (the rounds completed over the others: min_clients)"
  steps = [step for inv in rounds for step in inv.get("node_timings", [])]
  if rounds and steps:
    slowest = lambda key: float(np.mean([max(t[key] for t in st["nodes"]) for st in steps]))
    per_round = [inv["seconds"] for inv in rounds]
    exchange = float(np.mean([st["exchange_seconds"] for st in steps]))
    process = slowest("process_seconds")
    server = float(np.mean(per_round)) - exchange * len(steps) / len(rounds)
    info["wall time per round"] = (
        f"{np.mean(per_round):.2f} s (min {min(per_round):.2f}, max {max(per_round):.2f}): the "
        f"server's pieces and bookkeeping {server:.2f} s; per client step, {exchange:.2f} s from "
        f"sending the work to the last reply, of it the slowest node's ClientApp process "
        f"{process:.2f} s from its start to its reply (program load {slowest('load_seconds'):.3f} "
        f"s, compute {slowest('compute_seconds'):.3f} s), the other {exchange - process:.2f} s "
        "Flower's message passing (a SuperNode asks for messages every 3 s)")
  passes = [p for inv in record["invocations"] for p in inv.get("secagg", [])]
  if passes:  # secure sums (secagg.py): what ran, and what it cost
    kinds = ", ".join(sorted({a for p in passes for a in p["aggregations"]}))
    info["secure aggregation"] = (
        f"{len(passes)} SecAgg+ pass(es) of {kinds} over {passes[0]['nodes']} nodes, "
        f"{np.mean([p['seconds'] for p in passes]):.2f} s each (4 exchanges: setup, share keys, "
        "masked vectors, unmask)")
  return info


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray], rounds: int,
               min_clients: int = 0, round_timeout: float = 600.0, out_dir: str = "",
               resume_from: str = "", tls: bool = False, node_trust: str = "") -> RuntimeResult:
  """The runtime's runner: the export on a local deployment, outputs keyed as ``fb.verify`` keys
  them; its options are :data:`faxbridge.converters.flower.RUNTIME`'s (see :func:`deploy`)."""
  ok, why = available()
  if not ok:
    raise VerificationError(f"runtime 'flower' needs flwr: {why} (pip install flwr==1.42.*)")
  if min_clients < 0 or round_timeout <= 0:
    raise VerificationError(f"runtime 'flower': min_clients must be >= 0 and round_timeout > 0, "
                            f"got {min_clients} and {round_timeout:g}")
  if resume_from and not (Path(resume_from) / "record.json").is_file():
    raise VerificationError(f"resume_from={resume_from}: no record.json there; give the out folder "
                            "of an earlier run of this export (a failed run's error names it)")
  if node_trust and not Path(node_trust).is_file():
    raise VerificationError(f"node_trust={node_trust}: no such file; give the Ed25519 public key the export "
                            "was signed for (faxbridge keygen writes it)")
  with tempfile.TemporaryDirectory(prefix="faxbridge-flower-keys-") as keys:
    security = None
    if tls or node_trust:  # made for this run, removed after it: the nodes are this run's too
      n = _client_count(manifest, inputs)
      security = LocalSecurity(
          tls=make_tls(Path(keys) / "tls") if tls else None,
          node_keys=[make_node_key(Path(keys) / f"node-{k:04d}") for k in range(n)] if tls else (),
          trust=Path(node_trust).resolve() if node_trust else None)
    return deploy(export_dir, manifest, inputs, rounds, min_clients=min_clients,
                  round_timeout=round_timeout, out_dir=Path(out_dir) if out_dir else None,
                  resume_from=Path(resume_from) if resume_from else None, security=security)


__all__ = ["LocalDeployment", "available", "deploy", "free_port", "leftovers", "node_configs", "reused",
           "verify_run"]

"""A warm SuperExec for a node or the SuperLink: Flower's apps run in forks of one interpreter that
has already imported them, instead of a new Python per message.

Flower 1.42 runs every message a SuperNode receives in a new ``flwr-clientapp`` process (and every
run's ServerApp in a new ``flwr-serverapp``), started by the ``flower-superexec`` beside it:
starting Python and importing flwr, numpy, the app's code and its client runtime takes seconds,
several times what a round computes. ``--isolation process`` (of both ``flower-supernode`` and
``flower-superlink``) leaves starting those processes to a SuperExec the operator runs; this is
one. It asks the Runtime API for tasks (as ``flower-superexec`` does) and runs each in a child
forked from itself, which calls Flower's own task function (``run_clientapp`` / ``run_serverapp``,
what ``flwr-clientapp`` / ``flwr-serverapp`` call): each message still gets a process of its own,
with Flower's protocol and isolation unchanged; only the start and the imports are done once.

    flower-supernode --isolation process --port 9094 ... &
    python -m faxbridge.converters.flower.executor --runtime-api-address 127.0.0.1:9094 --insecure

It reads the Runtime API's tasks through flwr's own client (``RuntimeHttpClient.AcquireTask``),
an internal interface of flwr 1.42 (the version the apps are pinned to). Nothing is forked before
the imports are done, and the parent starts no Python thread (it watches its SuperNode from its
loop, not from a monitor thread as ``flower-superexec`` does), so no lock is held by another
thread when it forks (numpy's OpenBLAS pool, the one native thread the imports start, handles fork
itself). The imports start no JAX, LiteRT or IREE runtime: each child makes its own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# What each kind of task runs in its child, and what is imported beforehand so that the child does
# not (the app's modules import these; a client runtime is imported when it is installed).
KINDS = {
    "clientapp": ("flwr-clientapp", ["flwr.supernode.runtime.run_clientapp",
                                     "faxbridge.converters.flower.node", "jsonschema"]),
    "serverapp": ("flwr-serverapp", ["flwr.superlink.runtime.run_serverapp",
                                     "faxbridge.converters.flower.server", "jsonschema"]),
}
CLIENT_RUNTIME_MODULES = ("ai_edge_litert.interpreter", "iree.runtime")
# How often the Runtime API is asked for a task when none was waiting: each ask costs the asker and
# the SuperNode a few ms of CPU (5 executors asking 20 times a second kept 0.4 of a core busy, 5
# times a second 0.16), and asking more often than START_DELAY_S starts no task sooner.
POLL_S = 0.5
# A SuperNode makes the task of a message before it has pulled the message's content from the
# SuperLink; a ClientApp that asks for the content before it is there waits a whole second (Flower's
# first back-off), then two. Flower's own SuperExec asks every second and takes a second to start a
# process, so it is rarely that early; this one starts a task this long after the task was made.
START_DELAY_S = 0.5


def preload(kind: str) -> list[str]:
  """Import what a task of ``kind`` needs (and the client runtimes that are installed); the names
  of the modules imported. One that fails to import is left to the task, which then fails with
  Flower's own error reply naming it, instead of this executor stopping and its tasks waiting for
  nobody."""
  names = [*KINDS[kind][1], *(m for m in CLIENT_RUNTIME_MODULES
                             if importlib.util.find_spec(m.split(".")[0]) is not None)]
  done = []
  for name in names:
    try:
      importlib.import_module(name)
      done.append(name)
    except Exception as e:
      print(f"executor: {name} not preloaded ({type(e).__name__}: {e}); its tasks will import it",
            file=sys.stderr, flush=True)
  return done


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _wait_until_listening(address: str, parent_pid: int | None, timeout: float = 120.0) -> None:
  """Wait for the Runtime API to accept connections (it may start after this process)."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and (parent_pid is None or _alive(parent_pid)):
    with contextlib.suppress(OSError), socket.create_connection((host.strip("[]"), int(port)), 0.5):
      return
    time.sleep(0.05)
  raise SystemExit(f"executor: the Runtime API at {address} did not accept connections")


def _age(timestamp: str) -> float:
  """Seconds since ``timestamp`` (a task's ISO 8601 ``pending_at``); 0 if it does not parse."""
  try:
    return max(0.0, time.time() - datetime.datetime.fromisoformat(timestamp).timestamp())
  except ValueError:
    return 0.0


def _task_function(kind: str, address: str, insecure: bool, certificates: bytes | None
                   ) -> Callable[[str], None]:
  """``run(token)``: Flower's own body of ``flwr-clientapp`` / ``flwr-serverapp`` for one task."""
  if kind == "clientapp":
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    return lambda token: run_clientapp(runtime_api_address=address, token=token, insecure=insecure,
                                       certificates=certificates, parent_pid=os.getppid())
  from queue import Queue

  from flwr.supercore.logger import mirror_output_to_queue, restore_output
  from flwr.superlink.runtime.run_serverapp import run_serverapp

  def run(token: str) -> None:
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)  # as flwr-serverapp does: the run's log reaches `flwr run`
    try:
      run_serverapp(runtime_api_address=address, log_queue=log_queue, token=token,
                    insecure=insecure, certificates=certificates, parent_pid=os.getppid())
    finally:
      restore_output()

  return run


def _child(run: Callable[[str], None], token: str) -> None:
  """The forked child: the task, then ``os._exit`` with its status (Flower's task functions end
  with ``sys.exit``, whose exception must not unwind into the parent's loop in this copy)."""
  code = 1
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run(token)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:
    traceback.print_exc()
  finally:
    with contextlib.suppress(Exception):
      sys.stdout.flush()
      sys.stderr.flush()
    os._exit(code)


def serve(kind: str, address: str, insecure: bool, root_certificates: str | None = None,
          parent_pid: int | None = None, poll_s: float = POLL_S, start_delay_s: float = START_DELAY_S
          ) -> None:
  """Acquire tasks of ``kind`` from the Runtime API at ``address`` and run each in a fork, until
  ``parent_pid`` (the SuperNode or SuperLink) is gone or this process is terminated."""
  import httpx
  from flwr.proto.runtime_pb2 import AcquireTaskRequest
  from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
  from flwr.supercore.runtime import RuntimeHttpClient
  from flwr.supercore.tls import validate_and_resolve_root_certificates

  task_type, _ = KINDS[kind]
  _wait_until_listening(address, parent_pid)
  certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
  run = _task_function(kind, address, insecure, certificates)
  # No retry invoker: it would retry a vanished Runtime API forever; this loop asks again itself,
  # and stops when the SuperNode (or SuperLink) is gone.
  client = RuntimeHttpClient.from_server_address(
      server_address=address, insecure=insecure, root_certificates=certificates,
      interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
  children: set[int] = set()
  try:
    while parent_pid is None or _alive(parent_pid):
      for pid in list(children):  # reap the children that ended
        with contextlib.suppress(ChildProcessError):
          if os.waitpid(pid, os.WNOHANG)[0]:
            children.discard(pid)
      try:
        got = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
      except httpx.TransportError:  # the Runtime API is restarting or gone: ask again later
        time.sleep(poll_s)
        continue
      if got.HasField("task") and got.token:
        time.sleep(max(0.0, start_delay_s - _age(got.task.pending_at)))
        pid = os.fork()
        if pid == 0:
          _child(run, got.token)
        children.add(pid)
        continue  # another task may be waiting
      time.sleep(poll_s)
  finally:
    client.close()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kind", choices=sorted(KINDS), default="clientapp",
                      help="the tasks to run: a SuperNode's ClientApps or a SuperLink's ServerApps")
  parser.add_argument("--runtime-api-address", required=True,
                      help="the Runtime API of the SuperNode (its --host:--port) or the SuperLink")
  tls = parser.add_mutually_exclusive_group(required=True)
  tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
  tls.add_argument("--root-certificates", type=Path, help="CA certificate of the Runtime API's TLS")
  parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) ends")
  parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between task requests")
  args = parser.parse_args(argv)
  preload(args.kind)
  serve(args.kind, args.runtime_api_address, args.insecure,
        str(args.root_certificates) if args.root_certificates else None, args.parent_pid, args.poll)


if __name__ == "__main__":
  main()

"""``--target=flower``: an export that is also a Flower App directory.

The pieces and ``plan.json`` are written by the target of the chosen client runtime, called as it
is (``tflite`` for LiteRT, ``stablehlo`` for IREE: :data:`protocol.CLIENT_RUNTIMES`); this module
adds the Flower App around them:

* ``pyproject.toml``: ``[project]`` and ``[tool.flwr.app]`` (publisher, the components, the run
  config's keys and defaults, read by ``server.py``);
* ``faxbridge_app/server_app.py`` and ``faxbridge_app/client_app.py``: two lines each, entry points
  into :mod:`faxbridge.converters.flower.server` and :mod:`faxbridge.converters.flower.node`
  (nothing program-specific is generated: the program is ``plan.json`` and the pieces).

Flower bundles (FABs) carry only source and text files, so ``flwr run`` ships the JSON files and the
Python modules to nodes, and the ServerApp ships the client program itself, by message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from faxbridge.converters.flower import CLIENT_RUNTIMES
from faxbridge.converters.flower.protocol import CLIENT_RUNTIMES as RUNTIMES
from faxbridge.extend import ExportError, SplitProgram, emit, native_any_clients

PACKAGE = "faxbridge_app"
SERVER_MODULE = f"{PACKAGE}/server_app.py"
CLIENT_MODULE = f"{PACKAGE}/client_app.py"

# The run config the ServerApp (server.RunConfig) and the nodes read, with its defaults; `flwr run
# --run-config` overrides them (Flower refuses keys the app does not declare).
RUN_CONFIG = {
    "export": ("", "the export directory on the ServerApp's machine (holds the pieces)"),
    "out": ("", "where the ServerApp writes each round's outputs and record"),
    "server-inputs": ("", "an .npz of the SERVER inputs (next's after the state); empty: none"),
    "rounds": (3, "rounds of next (an iterative process)"),
    "clients-per-round": (0, "nodes sampled per round; 0: every node that answered the install"),
    "min-nodes": (1, "nodes to wait for before installing the program"),
    "wait-nodes-seconds": (120.0, "how long to wait for min-nodes nodes"),
    "round-timeout": (600.0, "seconds a node has to reply to one message"),
    "seed": (0, "seed of the client sampling"),
    "min-clients": (0, "complete a round over the sampled nodes that replied if at least this many "
                       "did; 0: every sampled node must reply"),
    "resume-from": ("", "the out folder of an earlier run of this export: resume after its last "
                        "completed round"),
    # read by the nodes (node.py), not the ServerApp
    "dataset": ("", "each node reads its data-dir/DATASET.npz; empty: its node config's data file"),
}


def _toml_value(value: Any) -> str:
  if isinstance(value, str):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
  return repr(value)


def pyproject(name: str, flwr_version: str) -> str:
  """The app's ``pyproject.toml``: what ``flwr run`` reads (``[tool.flwr.app]``)."""
  project = re.sub(r"[^a-z0-9]+", "-", f"faxbridge-{name}".lower()).strip("-")[:32].strip("-")
  config = "\n".join(f"{key} = {_toml_value(default)}  # {why}"
                     for key, (default, why) in RUN_CONFIG.items())
  return f"""# A Flower App written by faxbridge (target flower). The ServerApp and the ClientApp are entry
# points into faxbridge.converters.flower; the program is plan.json and the pieces beside it, pinned
# by manifest.json. docs/flower.md says how to deploy it.
[project]
name = "{project}"
version = "1.0.0"
description = "{name}, exported by faxbridge"
dependencies = ["flwr>={flwr_version},<{_next_minor(flwr_version)}", "faxbridge"]

[tool.flwr.app]
publisher = "faxbridge"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server_app:app"
clientapp = "{PACKAGE}.client_app:app"

[tool.flwr.app.config]
{config}
"""


def _next_minor(version: str) -> str:
  major, minor = (int(p) for p in version.split(".")[:2])
  return f"{major}.{minor + 1}"


SERVER_APP = '''"""The ServerApp of this export: faxbridge's Flower runtime runs plan.json
(docs/flower.md)."""

from faxbridge.converters.flower.server import server_app

app = server_app()
'''

CLIENT_APP = '''"""The ClientApp of this export: faxbridge's Flower node runs the client program it is sent,
checked against manifest.json beside this package (docs/flower.md)."""

from pathlib import Path

from faxbridge.converters.flower.node import client_app

app = client_app(Path(__file__).resolve().parent.parent)
'''


def export_flower(split: SplitProgram, out: Path, client_runtime: str = CLIENT_RUNTIMES[0],
                  **options: Any) -> dict:
  """Write the pieces and ``plan.json`` (through the client runtime's target) and the Flower App
  around them into ``out``; return the manifest part (the target's, and a ``flower`` block).

  Raises:
    ExportError: unknown options or client runtime, or what the client runtime's target raises
      (a piece it cannot express).
  """
  if options:
    raise ExportError(f"the flower target takes only client_runtime, not {sorted(options)}")
  if client_runtime not in RUNTIMES:
    raise ExportError(f"--client-runtime must be one of {sorted(RUNTIMES)}, got {client_runtime!r}")
  runtime = RUNTIMES[client_runtime]
  part = runtime.export()(split, out)
  # A round may complete over the nodes that replied (min-clients): verify then runs the native
  # program on exactly their data, which needs it for any number of clients.
  any_clients, not_any = native_any_clients(split, out)
  emit("flower.app", "writing the Flower App (pyproject.toml, ServerApp, ClientApp)")
  from faxbridge.converters.flower.protocol import versions

  flwr_version = versions().get("flwr")
  if flwr_version is None:
    raise ExportError("the flower target writes a Flower App for the installed flwr, and flwr is "
                      "not installed: pip install flwr==1.42.*")
  (out / "pyproject.toml").write_text(pyproject(split.name, flwr_version))
  (out / PACKAGE).mkdir()
  (out / PACKAGE / "__init__.py").write_text('"""A faxbridge export as a Flower App."""\n')
  (out / SERVER_MODULE).write_text(SERVER_APP)
  (out / CLIENT_MODULE).write_text(CLIENT_APP)
  flower = {"client_runtime": client_runtime, "format": runtime.format, "app": "pyproject.toml",
            "serverapp": SERVER_MODULE, "clientapp": CLIENT_MODULE}
  if not_any:  # why verify cannot check a round completed over fewer clients
    flower["no_native_any_clients"] = not_any
  return {**part, **any_clients, "flower": flower}

"""The ``flower`` target and runtime: a faxbridge program deployed as a Flower App.

``faxbridge export PROGRAM --target=flower -o DIR`` writes an export that is also a Flower App
directory: ``pyproject.toml`` (``[tool.flwr.app]``), a ServerApp and a ClientApp that are thin entry
points into this package (``server.py``, ``node.py``), ``plan.json``, the server pieces and the
client program (``.tflite`` for LiteRT, StableHLO for IREE, written by the tflite and stablehlo
targets' own exporters). ``fb.verify(DIR, ..., runtime="flower")`` deploys it locally (one SuperLink,
one SuperNode per client, each its own process: ``deployment.py``; with TLS, SuperNode keys and
nodes that require signed apps as ``security.py`` makes them) and compares with native.

``TARGET`` and ``RUNTIME`` are the registry entries (entry points ``flower`` of the groups
``faxbridge.targets`` and ``faxbridge.runtimes``). This module imports nothing heavy: flwr is
imported by the ServerApp, the ClientApp and the deployment, never by ``import faxbridge``.
See docs/flower.md.
"""

from faxbridge.extend import Option, Runtime, Target

# The client runtimes a node can run the client program on, the default first (protocol.py says
# which target writes each one's pieces and how a piece is loaded).
CLIENT_RUNTIMES = ("litert", "iree")

TARGET = Target(
    "flower", exporter="faxbridge.converters.flower.export:export_flower",
    summary="a Flower App: ServerApp and ClientApp running plan.json, the client program shipped "
            "to nodes",
    options=(Option("client_runtime", str, CLIENT_RUNTIMES[0],
                    "what nodes run the client program on: LiteRT (.tflite) or IREE (StableHLO)",
                    CLIENT_RUNTIMES),),
    runtimes=("flower",),
    steps=("flower.app", "tflite.import", "tflite.convert", "stablehlo.lower"),
    install="pip install flwr==1.42.*",
    versions="faxbridge.converters.flower.protocol:versions",
    examples=("faxbridge export examples.fedavg:process --target=flower -o build/fedavg_flower "
              "--force",
              "faxbridge verify build/fedavg_flower --runtime=flower --rounds 3 --program "
              "examples.fedavg:process"),
    ragged=True)  # its client pieces are the tflite and stablehlo targets'; each node its own rows

RUNTIME = Runtime(
    "flower", runner="faxbridge.converters.flower.deployment:verify_run",
    summary="a local Flower deployment: one SuperLink and one SuperNode per client, each its own "
            "process, on 127.0.0.1",
    install="pip install flwr==1.42.*",
    available="faxbridge.converters.flower.deployment:available",
    options=(Option("min_clients", int, 0,
                    "complete a round over the nodes that replied if at least this many did; "
                    "verify then checks it against native on exactly their data (0: every node "
                    "must reply, a drop fails the run)"),
             Option("round_timeout", float, 600.0, "seconds a node has to reply to one message"),
             Option("out_dir", str, "", "where the ServerApp writes each round's outputs and "
                    "record.json, kept (default: a temporary folder, kept only when a round fails)"),
             Option("resume_from", str, "", "the out folder of an earlier run of this export (a "
                    "failed run's error names it): its rounds are read back, the later ones run"),
             Option("tls", bool, False, "deploy with TLS (a CA and SuperLink certificate made for "
                    "this run) and SuperNode authentication (a key per node, registered before the "
                    "nodes start)"),
             Option("node_trust", str, "", "an Ed25519 public key (faxbridge keygen): every node "
                    "requires the app's signature by it before installing or running anything")))

__all__ = ["CLIENT_RUNTIMES", "RUNTIME", "TARGET"]

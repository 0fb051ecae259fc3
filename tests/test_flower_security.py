"""Security of a Flower deployment (converters/flower/security.py, the node's ``trust``): TLS
certificates and SuperNode keys that standard tools and Flower's own loaders accept; a node that
requires the app's Ed25519 signature refuses an unsigned, wrongly signed or changed app before it
reads anything else; and, slow, real local deployments with TLS and SuperNode authentication (an
unregistered node is refused, plain HTTP gets nowhere, the round equals native over the admitted
nodes) and with nodes that require signed apps. No process is left behind."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import faxbridge as fb
from examples import fedavg
from faxbridge._src import signing
from faxbridge._src import verify as fverify
from faxbridge.converters.flower import deployment, node, protocol, security
from faxbridge.extend import VerificationError

FLWR = str(Path(sys.executable).parent / "flwr")  # the flwr CLI beside this Python, as deployments run it


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS, fb.CLIENTS))
def scaled(scale, x, w):
  """Three aggregations of one scaled upload."""
  y = fb.map(lambda s, xi: s * xi, fb.broadcast(scale), x)
  return fb.sum(y), fb.weighted_mean(y, w), fb.max(y)


def _inputs(clients=3):
  rng = np.random.default_rng(3)
  return (np.float32(0.5), rng.normal(size=(clients, 3)).astype(np.float32),
          rng.uniform(0.5, 2.0, size=(clients,)).astype(np.float32))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
  """Two signers: alice (trusted by the nodes) and mallory."""
  folder = tmp_path_factory.mktemp("keys")
  return {name: fb.keygen(folder / name) for name in ("alice", "mallory")}


@pytest.fixture(scope="module")
def apps(tmp_path_factory, keys):
  """``scaled`` exported to flower (IREE nodes): unsigned, signed by alice, signed by mallory."""
  folder = tmp_path_factory.mktemp("apps")
  out = {}
  for name, key in (("unsigned", None), ("alice", "alice"), ("mallory", "mallory")):
    out[name] = fb.export(scaled, *_inputs(), target="flower", out_dir=folder / name,
                          client_runtime="iree",
                          sign_with=None if key is None else keys[key].private_key)
  return out


# -- certificates and keys ------------------------------------------------------------------------
def _handshake(files: security.TlsFiles, client: ssl.SSLContext, host: str) -> str:
  """A TLS handshake with a server that serves ``files``' certificate on 127.0.0.1, by a client
  that dials it as ``host``: the negotiated version (or the client's SSLError)."""
  server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  server.load_cert_chain(files.certificate, files.private_key)
  with socket.create_server(("127.0.0.1", 0)) as listener:
    port = listener.getsockname()[1]

    def serve():
      conn, _ = listener.accept()
      try:
        with server.wrap_socket(conn, server_side=True) as tls:
          tls.recv(1)
      except (ssl.SSLError, OSError):
        pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
      with socket.create_connection(("127.0.0.1", port)) as raw, \
           client.wrap_socket(raw, server_hostname=host) as tls:
        version = tls.version()
        tls.sendall(b"x")
        return str(version)
    finally:
      thread.join(5)


def test_the_superlink_certificate_is_trusted_through_its_ca_for_its_hosts_only(tmp_path):
  files = security.make_tls(tmp_path / "tls")
  assert oct(files.private_key.stat().st_mode & 0o777) == "0o600"
  assert oct(files.ca_private_key.stat().st_mode & 0o777) == "0o600"
  with_ca = ssl.create_default_context(cafile=str(files.ca_certificate))
  assert _handshake(files, with_ca, "127.0.0.1").startswith("TLS")
  assert _handshake(files, with_ca, "localhost").startswith("TLS")
  with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn't match"):
    _handshake(files, with_ca, "superlink.example.org")
  with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
    _handshake(files, ssl.create_default_context(), "127.0.0.1")  # the system's CAs only
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    security.make_tls(tmp_path / "tls")


def test_node_keys_are_what_flower_reads(tmp_path):
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.hazmat.primitives.serialization import load_ssh_private_key
  from flwr.cli.supernode.register import try_load_public_key
  from flwr.supercore.primitives.asymmetric import public_key_to_bytes

  key = security.make_node_key(tmp_path / "nodes" / "site-a")
  assert oct(key.private_key.stat().st_mode & 0o777) == "0o600"
  assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
  private = load_ssh_private_key(key.private_key.read_bytes(), None)  # as flower-supernode loads it
  assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
  # flwr supernode register reads the public file; it must be the private key's half.
  assert try_load_public_key(key.public_key) == public_key_to_bytes(private.public_key())
  with pytest.raises(FileExistsError):
    security.make_node_key(tmp_path / "nodes" / "site-a")


def test_node_authentication_without_tls_is_refused_before_anything_starts(tmp_path):
  key = security.make_node_key(tmp_path / "n0")
  with pytest.raises(ValueError, match="needs TLS"):
    security.LocalSecurity(node_keys=(key,))
  tls = security.make_tls(tmp_path / "tls")
  other = security.make_node_key(tmp_path / "n1")
  sec = security.LocalSecurity(tls, (key, other), registered=(key.public_key,))
  assert sec.admitted(2) == 1 and sec.public_keys() == [key.public_key]


# -- a node that requires signed apps -------------------------------------------------------------
def _config(folder: Path, trust: Path | None) -> dict:
  folder.mkdir(exist_ok=True)
  _, x, w = _inputs()
  np.savez(folder / "data.npz", x=x[0], w=w[0])
  config = {"data": str(folder / "data.npz"), "label": folder.name, "store": str(folder / "store")}
  return {**config, "trust": str(trust)} if trust else config


def _signature(app: Path) -> bytes:
  return (app / "manifest.json.sig").read_bytes()


def _stored(folder: Path) -> list[str]:
  store = folder / "store"
  return sorted(p.name for p in store.iterdir()) if store.exists() else []


@pytest.mark.parametrize("case, match", [
    ("unsigned", "came without a signature"),
    ("another key", "the signature sent with the app was made with another key"),
    ("another manifest", "does not verify with the trusted key .*changed after it was signed"),
    ("not a signature", "is not a faxbridge signature"),
])
def test_a_node_with_trust_refuses_the_app_before_reading_anything_else(
    case, match, apps, keys, tmp_path):
  """The signature is checked first: the copy of the app here has a plan.json that is not even
  JSON, and the refusal is still the signature's, with nothing stored."""
  app = tmp_path / "app"
  shutil.copytree(apps["alice"], app)
  (app / "plan.json").write_text("{not json")
  if case == "another manifest":  # alice's own signature, of a manifest other than this app's
    edited = (app / "manifest.json").read_bytes() + b"\n"
    signature = signing.signature_json(edited, signing.load_private_key(keys["alice"].private_key))
  else:
    signature = {"unsigned": None, "another key": _signature(apps["mallory"]),
                 "not a signature": b"garbage"}[case]
  with pytest.raises(VerificationError, match=rf"node n0: refusing the app: .*{match}"):
    node.NodeRun(app, _config(tmp_path / "n0", keys["alice"].public_key), signature=signature)
  assert _stored(tmp_path / "n0") == []


def test_a_node_with_trust_runs_the_signed_app_and_later_messages_need_its_kept_signature(
    apps, keys, tmp_path):
  config = _config(tmp_path / "n0", keys["alice"].public_key)
  run = node.NodeRun(apps["alice"], config, signature=_signature(apps["alice"]))
  digest = protocol.sha256((apps["alice"] / "manifest.json").read_bytes())
  assert _stored(tmp_path / "n0") == [f"{digest}.manifest.sig"]
  # A work message brings no signature: the node checks the one it kept at install, again.
  later = node.NodeRun(apps["alice"], config)
  assert later.app.client_pieces == run.app.client_pieces
  # An app whose manifest differs from the one signed finds no kept signature and is refused.
  changed = tmp_path / "changed"
  shutil.copytree(apps["alice"], changed)
  (changed / "manifest.json").write_bytes((changed / "manifest.json").read_bytes() + b" ")
  with pytest.raises(VerificationError, match="came without a signature"):
    node.NodeRun(changed, config)
  # The signature is of the manifest's bytes: the same program exported unsigned has the very
  # manifest alice signed (exports are deterministic), so it is the signed app.
  assert (apps["unsigned"] / "manifest.json").read_bytes() == (apps["alice"] / "manifest.json").read_bytes()
  node.NodeRun(apps["unsigned"], config)
  # With the original signature, the changed manifest fails the check itself.
  with pytest.raises(VerificationError, match="changed after it was signed"):
    node.NodeRun(changed, config, signature=_signature(apps["alice"]))
  # A kept signature is checked, not trusted: replaced by mallory's, it is refused.
  (tmp_path / "n0" / "store" / f"{digest}.manifest.sig").write_bytes(_signature(apps["mallory"]))
  with pytest.raises(VerificationError, match=r"signature kept in .* made with another key"):
    node.NodeRun(apps["alice"], config)


def test_a_node_without_trust_runs_unsigned_apps(apps, tmp_path):
  run = node.NodeRun(apps["unsigned"], _config(tmp_path / "n0", None))
  assert run.app.client_pieces and _stored(tmp_path / "n0") == []


def test_the_install_message_carries_the_exports_signature(apps):
  from flwr.app import RecordDict

  record = protocol.signature_record(apps["alice"])
  assert protocol.signature_of(RecordDict({protocol.SIGNATURE: record})) == _signature(apps["alice"])
  assert protocol.signature_record(apps["unsigned"]) is None
  assert protocol.signature_of(RecordDict({})) is None


# -- real deployments -----------------------------------------------------------------------------
@pytest.fixture
def own_temp(tmp_path, monkeypatch) -> Path:
  """Temporary folders (the deployments' own, the keys verify makes) under this test's tmp_path,
  so that its processes are told from those of tests running beside it."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  return tmp_path


def _pem(public_key: Path) -> str:
  """A node's OpenSSH public key as the SuperLink logs it (PEM SubjectPublicKeyInfo)."""
  from cryptography.hazmat.primitives import serialization

  key = serialization.load_ssh_public_key(public_key.read_bytes())
  return key.public_bytes(serialization.Encoding.PEM,
                          serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _nodes(local: deployment.LocalDeployment) -> list[dict]:
  """``flwr supernode ls local --format json``: the nodes the SuperLink knows, with their status."""
  out = subprocess.run([FLWR, "supernode", "ls", "local", "--format", "json"],
                       env=local.env, cwd=local.root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  return json.loads(out.stdout[out.stdout.index("{"):])["nodes"]


@pytest.mark.slow
def test_tls_and_node_authentication_admit_only_registered_nodes(own_temp):
  tmp_path = own_temp
  """A SuperLink with TLS and SuperNode authentication, 2 nodes whose keys are registered and one
  whose key is not: the SuperLink lists the 2 online and never the third, which exits refused;
  plain HTTP and a client without the CA get nowhere, a client with it speaks TLS. And Flower's
  caveat: anyone with the CA registers a key of their own."""
  tls = security.make_tls(tmp_path / "tls")
  node_keys = [security.make_node_key(tmp_path / "keys" / f"node{k}") for k in range(3)]
  sec = security.LocalSecurity(tls, node_keys, registered=[k.public_key for k in node_keys[:2]])
  root = tmp_path / "deployment"
  with deployment.LocalDeployment(root, [{"label": f"n{k}"} for k in range(3)], sec) as local:
    port = local.port
    # TLS is on: plain HTTP is dropped, the system's CAs do not vouch for the SuperLink, ours do.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
      plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
      plain.request("GET", "/health")
      plain.getresponse()
    with pytest.raises(ssl.SSLCertVerificationError):
      http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                  context=ssl.create_default_context()).request("GET", "/health")
    secure = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=10, context=ssl.create_default_context(cafile=str(tls.ca_certificate)))
    secure.request("GET", "/health")
    assert secure.getresponse().status == 200 and secure.sock.version() == "TLSv1.3"
    # The unregistered node is refused at activation and exits; the registered ones go online.
    intruder = local.processes["supernode-2"]
    assert intruder.wait(timeout=180) != 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
      nodes = _nodes(local)
      if [n["status"] for n in nodes] == ["online", "online"]:
        break
      time.sleep(2)
    assert len(nodes) == 2 and all(n["status"] == "online" for n in nodes), nodes
    # the whole log: the SuperExec it had started writes its own exit below
    assert "Failed to activate SuperNode" in (root / "logs" / "supernode-2.log").read_text()
    link_log = (root / "logs" / "superlink.log").read_text()
    refused = [line for line in link_log.splitlines()
               if "No SuperNode found with the given public key" in line]
    assert refused and all(_pem(node_keys[2].public_key).replace("\n", "\\n") in line for line in refused)
    assert not any(_pem(k.public_key).replace("\n", "\\n") in line
                   for k in node_keys[:2] for line in refused)
    for k in range(2):
      assert "SuperNode ID:" in (root / "logs" / f"supernode-{k}.log").read_text()
    # Flower's caveat (docs/flower.md): registering takes no credential but the CA. Whoever
    # reaches the SuperLink's port registers a key of their own through its Control API.
    register = subprocess.run([FLWR, "supernode", "register",
                               str(node_keys[2].public_key), "local"], env=local.env, cwd=root,
                              capture_output=True, text=True, timeout=120)
    assert register.returncode == 0 and "registered successfully" in register.stdout, register
    assert len(_nodes(local)) == 3
  assert not deployment.leftovers(root) and not deployment.leftovers(tmp_path, below=True)


@pytest.mark.slow
def test_a_round_with_tls_and_node_authentication_equals_native_over_the_admitted_nodes(own_temp):
  tmp_path = own_temp
  """FedAvg on 5 SuperNodes over TLS, 4 of whose keys are registered: the fifth (with data of its
  own) is refused by the SuperLink, the round runs on the 4 and equals the native round of their
  data."""
  _, data5 = fedavg.example_inputs(5)
  data4 = jax.tree.map(lambda v: v[:4], data5)
  out = fb.export(fedavg.process, data4, target="flower", out_dir=tmp_path / "fedavg",
                  client_runtime="iree")
  manifest = json.loads((out / "manifest.json").read_text())
  names = [s["name"] for s in manifest["next"]["inputs"]]
  inputs5 = dict(zip(names, (np.asarray(v) for v in jax.tree.leaves(data5))))
  inputs4 = {k: v[:4] for k, v in inputs5.items()}
  tls = security.make_tls(tmp_path / "tls")
  node_keys = [security.make_node_key(tmp_path / "keys" / f"node{k}") for k in range(5)]
  sec = security.LocalSecurity(tls, node_keys, registered=[k.public_key for k in node_keys[:4]])
  kept = tmp_path / "kept"
  result = deployment.deploy(out, manifest, inputs5, 1, keep=kept, security=sec)
  print(result.info)
  record = json.loads((kept / "record.json").read_text())
  assert [n["label"] for n in record["install"]["nodes"]] == [f"client-{k:04d}" for k in range(4)]
  assert "Failed to activate SuperNode" in (kept / "logs" / "supernode-4.log").read_text()
  assert "SuperNode authentication (4 of 5 nodes' keys registered)" in result.info["Flower security"]
  expected = fverify.native_outputs(out, manifest, inputs4, 1)
  checks = fverify.compare_all(expected, result.outputs, fverify.RTOL, fverify.ATOL)
  assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
  # The fifth node's data would have shown: the round with it in place of the fourth differs.
  swapped = fverify.native_outputs(out, manifest, {k: v[[0, 1, 2, 4]] for k, v in inputs5.items()}, 1)
  assert any(not np.allclose(swapped[k], result.outputs[k]) for k in swapped if k.startswith("round1/"))
  assert not deployment.leftovers(tmp_path, below=True)


@pytest.mark.slow
def test_nodes_that_require_signed_apps_refuse_others_and_run_the_signed_one(apps, keys, own_temp):
  tmp_path = own_temp
  """2 SuperNodes with trust=alice.pub: an unsigned app and one signed by mallory are refused by
  every node at install (the run fails with the node's reason); alice's runs through fb.verify with
TLS and node keys made for the run, equal to native."""
  scale, x, w = _inputs(2)
  manifests = {name: json.loads((app / "manifest.json").read_text()) for name, app in apps.items()}
  names = [s["name"] for s in manifests["alice"]["computation"]["inputs"]]
  inputs = dict(zip(names, (np.asarray(v) for v in (scale, x, w))))
  sec = security.LocalSecurity(trust=keys["alice"].public_key)
  for name, match in (("unsigned", "came without a signature"),
                      ("mallory", "the signature sent with the app was made with another key")):
    with pytest.raises(VerificationError, match=rf"refused: node client-000\d: refusing the app: .*{match}"):
      deployment.deploy(apps[name], manifests[name], inputs, 0, security=sec)
  # The signed one through fb.verify's runtime options, with TLS and node keys made for the run:
  # checked here (trust=) and on every node (node_trust=).
  # (3 nodes: the export's native program was made for 3 clients.)
  report = fb.verify(apps["alice"], *_inputs(3), runtime="flower", trust=keys["alice"].public_key,
                     tls=True, node_trust=str(keys["alice"].public_key))
  assert report.ok, str(report)
  security_line = report.info["Flower security"]
  assert "TLS" in security_line and "SuperNode authentication (3 of 3" in security_line
  assert "nodes require the app signed by alice.pub" in security_line
  assert not deployment.leftovers(tmp_path, below=True)

"""TLS certificates and SuperNode keys for a Flower deployment, made with ``cryptography``.

Flower 1.42 secures a deployment with two things, both off in an ``--insecure`` one:

* **TLS** between every Flower process and the SuperLink (Fleet, Control and Runtime APIs share its
  one port): the SuperLink serves a certificate (``flower-superlink --ssl-ca-certfile CA
  --ssl-certfile CERT --ssl-keyfile KEY``) that SuperNodes (``--root-certificates CA``) and ``flwr``
  (``root-certificates = "CA"`` in the connection's entry of ``$FLWR_HOME/config.toml``) check
  against the CA that issued it. :func:`make_tls` makes a CA and a server certificate for the
  SuperLink's host names and addresses.
* **SuperNode authentication** (``flower-superlink --enable-supernode-auth``, which needs TLS): the
  SuperLink accepts only nodes whose public key was registered with it (``flwr supernode register
  KEY.pub CONNECTION``, through the Control API); each node signs every request with its private
  key (``flower-supernode --auth-supernode-private-key KEY``). Flower reads ECDSA keys on a NIST
  curve in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes): :func:`make_node_key`.

:class:`LocalSecurity` says which of these (and nodes that require signed apps, ``trust``) a
:class:`~faxbridge.converters.flower.deployment.LocalDeployment` turns on. Private keys are
written with mode 0600 and no file is ever replaced. From a shell (docs/flower.md)::

    python -m faxbridge.converters.flower.security tls DIR --host superlink.example.org
    python -m faxbridge.converters.flower.security node-key DIR/site-a
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from faxbridge.extend import write_new

LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclasses.dataclass(frozen=True)
class TlsFiles:
  """What :func:`make_tls` wrote (PEM files)."""

  ca_certificate: Path  # for everyone who connects: --root-certificates, root-certificates =
  ca_private_key: Path  # 0600: signs further certificates; no Flower process reads it
  certificate: Path  # the SuperLink's: --ssl-certfile (the CA goes to --ssl-ca-certfile)
  private_key: Path  # the SuperLink's, 0600: --ssl-keyfile


@dataclasses.dataclass(frozen=True)
class NodeKey:
  """A SuperNode's key pair (OpenSSH format, ECDSA P-384) as :func:`make_node_key` wrote it."""

  private_key: Path  # 0600: flower-supernode --auth-supernode-private-key
  public_key: Path  # flwr supernode register PUBLIC_KEY CONNECTION


@dataclasses.dataclass(frozen=True)
class LocalSecurity:
  """What a local deployment turns on.

  Args:
    tls: the SuperLink serves TLS with these files, and every SuperNode and ``flwr`` checks it
      against their CA; None: insecure HTTP on 127.0.0.1.
    node_keys: one key per SuperNode, in node order: turns on SuperNode authentication (needs
      ``tls``); empty: off.
    registered: the public keys registered with the SuperLink before the nodes start (the nodes
      whose key is not among them are refused); None: every node's.
    trust: an Ed25519 public key (``fb.keygen``) every node requires the app's signature by (node
      config ``trust``); None: nodes run unsigned apps.
  """

  tls: TlsFiles | None = None
  node_keys: Sequence[NodeKey] = ()
  registered: Sequence[Path] | None = None
  trust: Path | None = None

  def __post_init__(self) -> None:
    if self.node_keys and self.tls is None:
      raise ValueError("SuperNode authentication needs TLS: Flower refuses "
                       "--enable-supernode-auth on an insecure SuperLink; give tls=make_tls(...)")

  def public_keys(self) -> list[Path]:
    """The public keys to register with the SuperLink."""
    if not self.node_keys:
      return []
    return list(self.registered) if self.registered is not None else [k.public_key for k in self.node_keys]

  def admitted(self, nodes: int) -> int:
    """How many of ``nodes`` SuperNodes the SuperLink will accept (those with a registered key)."""
    if not self.node_keys:
      return nodes
    registered = {Path(p).read_bytes() for p in self.public_keys()}
    return sum(k.public_key.read_bytes() in registered for k in self.node_keys[:nodes])

  def describe(self, nodes: int) -> str:
    """One line for a report: what is on."""
    parts = []
    if self.tls is not None:
      parts.append(f"TLS (the SuperLink's certificate issued by {self.tls.ca_certificate.name})")
    if self.node_keys:
      parts.append(f"SuperNode authentication ({self.admitted(nodes)} of {nodes} nodes' keys "
                   "registered)")
    if self.trust is not None:
      parts.append(f"nodes require the app signed by {Path(self.trust).name}")
    return ", ".join(parts) or "none: insecure HTTP on 127.0.0.1, unsigned apps run"


def _names(hosts: Sequence[str]) -> list:
  from cryptography import x509

  names: list = []
  for host in hosts:
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
      names.append(x509.DNSName(host))
  return names


def _pem_key(key) -> bytes:
  from cryptography.hazmat.primitives import serialization

  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def make_tls(folder: str | os.PathLike, hosts: Sequence[str] = LOCAL_HOSTS, days: int = 365) -> TlsFiles:
  """A CA and a certificate it issues to the SuperLink, valid for ``hosts`` (DNS names or IP
  addresses, each a subjectAltName: clients check the address they dial against them) for
  ``days`` days: ``ca.pem``, ``ca.key``, ``superlink.pem``, ``superlink.key`` in ``folder``
  (made if missing). ECDSA P-256 keys, SHA-256 signatures.

  Raises:
    FileExistsError: one of the four files exists (nothing is replaced; files this call wrote
      before stay).
    ValueError: no host given.
  """
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

  if not hosts:
    raise ValueError("make_tls needs at least one host name or address of the SuperLink")
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  files = TlsFiles(folder / "ca.pem", folder / "ca.key", folder / "superlink.pem",
                   folder / "superlink.key")
  existing = [str(p) for p in dataclasses.astuple(files) if os.path.lexists(p)]
  if existing:
    raise FileExistsError(f"{existing} exist; refusing to overwrite TLS files (choose another "
                          "folder, or remove them yourself)")
  now = datetime.datetime.now(datetime.UTC)
  start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "faxbridge Flower deployment CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  cert = (x509.CertificateBuilder()
          .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
          .issuer_name(ca_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  write_new(files.ca_private_key, _pem_key(ca_key), 0o600)
  write_new(files.ca_certificate, ca.public_bytes(serialization.Encoding.PEM), 0o644)
  write_new(files.private_key, _pem_key(key), 0o600)
  write_new(files.certificate, cert.public_bytes(serialization.Encoding.PEM), 0o644)
  return files


def make_node_key(prefix: str | os.PathLike) -> NodeKey:
  """A SuperNode's key pair: ``PREFIX`` (private, OpenSSH format, mode 0600) and ``PREFIX.pub``
  (``ecdsa-sha2-nistp384 ...``), as ``ssh-keygen -t ecdsa -b 384 -N "" -f PREFIX`` writes them.
  Missing folders above PREFIX are made.

  Raises:
    FileExistsError: either file exists (nothing is replaced).
  """
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec

  key = NodeKey(Path(prefix), Path(f"{prefix}.pub"))
  key.private_key.parent.mkdir(parents=True, exist_ok=True)
  if os.path.lexists(key.public_key):
    raise FileExistsError(f"{key.public_key} exists; refusing to overwrite a key file")
  private = ec.generate_private_key(ec.SECP384R1())
  write_new(key.private_key, private.private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
      0o600)
  try:
    write_new(key.public_key, private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", 0o644)
  except BaseException:  # no half of a pair left behind: the private key is ours to remove
    key.private_key.unlink()
    raise
  return key


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m faxbridge.converters.flower.security tls DIR [--host H ...] | node-key PREFIX``."""
  parser = argparse.ArgumentParser(prog="python -m faxbridge.converters.flower.security",
                                   description="TLS files and SuperNode keys for a Flower deployment")
  commands = parser.add_subparsers(dest="command", required=True)
  tls = commands.add_parser("tls", help="a CA and the SuperLink's certificate")
  tls.add_argument("folder")
  tls.add_argument("--host", action="append",
                   help="a name or address nodes dial the SuperLink by (repeat; default "
                        f"{' '.join(LOCAL_HOSTS)})")
  tls.add_argument("--days", type=int, default=365)
  node = commands.add_parser("node-key", help="a SuperNode's key pair (PREFIX, PREFIX.pub)")
  node.add_argument("prefix")
  ns = parser.parse_args(argv)
  try:
    if ns.command == "tls":
      files = make_tls(ns.folder, ns.host or LOCAL_HOSTS, ns.days)
      print(f"flower-superlink --ssl-ca-certfile {files.ca_certificate} --ssl-certfile "
            f"{files.certificate} --ssl-keyfile {files.private_key} ...\n"
            f"flower-supernode --root-certificates {files.ca_certificate} ...\n"
            f"keep {files.ca_private_key} offline: it issues certificates")
    else:
      key = make_node_key(ns.prefix)
      print(f"flwr supernode register {key.public_key} CONNECTION   # on the SuperLink's side\n"
            f"flower-supernode --auth-supernode-private-key {key.private_key} ...   # on the node")
  except (FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


__all__ = ["LOCAL_HOSTS", "LocalSecurity", "NodeKey", "TlsFiles", "main", "make_node_key", "make_tls"]

if __name__ == "__main__":
  sys.exit(main())

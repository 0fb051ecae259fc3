"""Signed exports: Ed25519 key pairs, and detached signatures of an export's ``manifest.json``.

The manifest pins every other file of an export by sha256, so a signature of the manifest's bytes
signs the whole export. The signature lives beside the manifest, in ``manifest.json.sig`` (the one
file of an export the manifest does not list: it cannot pin its own signature). Whoever holds the
public key checks it with :func:`check_signature` before anything else of the export is read
(``fb.verify(..., trust=PUB)``, ``faxbridge verify DIR --trust PUB``, a Flower node configured
with ``trust=PUB``, which gets the signature by message: docs/flower.md).

Formats (docs/security.md#formats), standard so that other tools read them:

- private key (``PREFIX.key``, mode 0600): PEM, PKCS #8, unencrypted (``BEGIN PRIVATE KEY``);
- public key (``PREFIX.pub``): PEM, SubjectPublicKeyInfo (``BEGIN PUBLIC KEY``), what
  ``openssl pkey -pubout`` writes;
- fingerprint: ``sha256:`` and the hex sha256 of the raw 32-byte public key;
- ``manifest.json.sig``: JSON ``{"format": "faxbridge-signature", "version": 1, "algorithm":
  "Ed25519", "key": FINGERPRINT, "signature": BASE64}``; the signature is the plain Ed25519
  signature (RFC 8032, 64 bytes) of the manifest's bytes, so ``openssl pkeyutl -verify -rawin``
  checks it too. ``key`` names the signer only so that a refusal can say "another key" rather than
  "changed": it is not trusted, and the verdict is the signature's alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from faxbridge._src.errors import ExportError, VerificationError
from faxbridge._src.export_reader import MANIFEST as MANIFEST_FILE
from faxbridge._src.export_reader import MAX_JSON_BYTES as MAX_MANIFEST_BYTES
from faxbridge._src.export_reader import SIGNATURE_FILE

if TYPE_CHECKING:  # cryptography is imported when a key is used, not with faxbridge
  from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FORMAT = "faxbridge-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "Ed25519"
SIGNATURE_BYTES = 64
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")

# Reads of files a stranger may have written stop here: a key file is under 200 bytes, a signature
# file under 300, and no export's manifest comes near (a FedAvg manifest is a few KiB).
MAX_KEY_FILE_BYTES = 16 << 10
MAX_SIGNATURE_FILE_BYTES = 4 << 10


class KeyPair(NamedTuple):
  """What :func:`keygen` wrote: the two files and the public key's fingerprint."""

  private_key: Path
  public_key: Path
  fingerprint: str


def fingerprint(public_key: Ed25519PublicKey) -> str:
  """``sha256:`` and the hex sha256 of the raw 32-byte public key: what a person compares."""
  from cryptography.hazmat.primitives import serialization

  raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  return "sha256:" + hashlib.sha256(raw).hexdigest()


def write_new(path: Path, data: bytes, mode: int) -> None:
  """Create ``path`` with ``mode`` as the umask leaves it and write ``data``. Never replaces
  anything: O_EXCL refuses an existing file or symlink (dangling or not) in the same system call
  that creates, so no check-then-write race. A file not written whole is removed: this call made
  it.

  Raises:
    FileExistsError: ``path`` exists, naming it.
  """
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
  except FileExistsError:
    raise FileExistsError(f"{path} exists; refusing to overwrite a key file (choose another "
                          "name, or remove it yourself)") from None
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
  except BaseException:
    path.unlink(missing_ok=True)
    raise


def keygen(prefix: str | os.PathLike) -> KeyPair:
  """Make an Ed25519 key pair for signing exports: ``PREFIX.key`` (private, mode 0600) and
  ``PREFIX.pub`` (public, mode 0644 as the umask allows).

  Sign with the private key (``fb.export(..., sign_with="PREFIX.key")``); give the public key to
  whoever runs the exports (``fb.verify(..., trust="PREFIX.pub")``), and its fingerprint by
  another way, so they can tell it is yours. Missing folders above PREFIX are made. Neither file
  is ever replaced: an existing one is refused, and nothing is written.

  Example:
    >>> keys = fb.keygen("alice")
    >>> keys.private_key.name, oct(keys.private_key.stat().st_mode & 0o777), keys.public_key.name
    ('alice.key', '0o600', 'alice.pub')
    >>> keys.fingerprint  # doctest: +ELLIPSIS
    'sha256:...'

  Raises:
    FileExistsError: ``PREFIX.key`` or ``PREFIX.pub`` exists (named; neither file is written).
    OSError: the folder cannot be made or written.
  """
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

  private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
  private_path.parent.mkdir(parents=True, exist_ok=True)  # as fb.export makes out_dir's folders
  key = Ed25519PrivateKey.generate()
  private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
  public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
  write_new(private_path, private_pem, 0o600)
  try:
    write_new(public_path, public_pem, 0o644)
  except BaseException:  # no half of a pair left behind: the private key is ours to remove
    private_path.unlink()
    raise
  return KeyPair(private_path, public_path, fingerprint(key.public_key()))


def _read_regular(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
  """The bytes of ``path``, which must be a regular file (not a symlink, FIFO or device: opening
  one could hang or read another file) of at most ``limit`` bytes; else one ``error`` naming it."""
  flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
  try:
    fd = os.open(path, flags)
  except FileNotFoundError:
    raise error(f"{what} {path}: no such file") from None
  except OSError as e:  # ELOOP: a symlink; EACCES: not readable
    kind = "a symlink" if path.is_symlink() else (e.strerror or type(e).__name__)
    raise error(f"{what} {path}: cannot be read ({kind}); expected a regular file") from None
  with os.fdopen(fd, "rb") as f:
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
      raise error(f"{what} {path} is not a regular file")
    if info.st_size > limit:
      raise error(f"{what} {path} has {info.st_size} bytes, more than the {limit} a {what} has")
    data = f.read(limit + 1)
  if len(data) > limit:  # grew while being read
    raise error(f"{what} {path} has more than the {limit} bytes a {what} has")
  return data


def _inside(path: Path, folder: Path) -> bool:
  return path == folder or folder in path.parents


def load_private_key(path: str | os.PathLike, out_dir: str | os.PathLike | None = None
                     ) -> Ed25519PrivateKey:
  """The Ed25519 private key in ``path`` (PEM PKCS #8, as :func:`keygen` writes), checked before
  an export is made. A key inside ``out_dir`` is refused: it would travel with the export (or be
  deleted with the old one by ``force``), and only the signature may enter an export.

  Raises:
    ExportError: the file is missing, unreadable, not an Ed25519 private key, or inside ``out_dir``.
  """
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

  path = Path(path)
  if out_dir is not None:
    out = Path(os.path.abspath(out_dir))
    given = Path(os.path.abspath(path))
    if _inside(given, out) or _inside(given.resolve(), out.resolve()):
      raise ExportError(f"signing key {path} is inside the export directory {out}; a private key "
                        "never enters an export: keep it outside (faxbridge keygen writes it "
                        "where you say)")
  data = _read_regular(path, MAX_KEY_FILE_BYTES, "signing key", ExportError)
  try:
    key = serialization.load_pem_private_key(data, password=None)
  except TypeError:  # encrypted: a password would be needed
    raise ExportError(f"signing key {path} is encrypted; faxbridge reads unencrypted PKCS #8 "
                      "keys (faxbridge keygen writes one; protect it by its file mode)") from None
  except (ValueError, binascii.Error) as e:
    public = b"PUBLIC KEY" in data
    raise ExportError(
        f"signing key {path} is " + ("a public key; sign with the private key (PREFIX.key)"
                                     if public else
                                     f"not a PEM private key ({str(e).splitlines()[0]})")
        + "; faxbridge keygen PREFIX makes a pair") from None
  if not isinstance(key, Ed25519PrivateKey):
    raise ExportError(f"signing key {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 "
                      "key; faxbridge keygen PREFIX makes one")
  return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
  """The Ed25519 public key in ``path`` (PEM SubjectPublicKeyInfo, as :func:`keygen` writes).

  Raises:
    VerificationError: the file is missing, unreadable or not an Ed25519 public key.
  """
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

  path = Path(path)
  data = _read_regular(path, MAX_KEY_FILE_BYTES, "trusted key", VerificationError)
  try:
    key = serialization.load_pem_public_key(data)
  except (ValueError, binascii.Error) as e:
    private = b"PRIVATE KEY" in data
    raise VerificationError(
        f"trusted key {path} is " + ("a private key; trust the public key (PREFIX.pub), which is "
                                     "all a verifier needs" if private else
                                     f"not a PEM public key ({str(e).splitlines()[0]})")) from None
  if not isinstance(key, Ed25519PublicKey):
    raise VerificationError(f"trusted key {path} is a {type(key).__name__.lstrip('_')}, not an "
                            "Ed25519 public key (faxbridge keygen PREFIX makes one)")
  return key


def signature_json(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
  """The contents of ``manifest.json.sig`` for these manifest bytes (deterministic, as Ed25519 is:
  the same manifest and key give the same file)."""
  doc = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "algorithm": ALGORITHM,
         "key": fingerprint(key.public_key()),
         "signature": base64.b64encode(key.sign(manifest)).decode("ascii")}
  return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def sign_export(export_dir: str | os.PathLike, key: Ed25519PrivateKey) -> Path:
  """Write ``manifest.json.sig`` beside ``export_dir``'s manifest (fb.export calls it in its
  temporary folder, before the export is moved into place, so no export is ever half signed)."""
  export_dir = Path(export_dir)
  out = export_dir / SIGNATURE_FILE
  out.write_bytes(signature_json((export_dir / MANIFEST_FILE).read_bytes(), key))
  return out


def read_signature(export_dir: str | os.PathLike) -> bytes | None:
  """The bytes of ``export_dir``'s ``manifest.json.sig`` (a regular file of bounded size, not
  parsed), or None when the export is unsigned: what a reader forwards to another that checks it
  (the Flower ServerApp sends it to nodes, whose app bundle cannot carry it).

  Raises:
    VerificationError: the signature file is there but not a regular file, or too large.
  """
  path = Path(export_dir) / SIGNATURE_FILE
  if not (path.exists() or path.is_symlink()):
    return None
  return _read_regular(path, MAX_SIGNATURE_FILE_BYTES, "signature file", VerificationError)


def _signature_bytes(where: str, data: bytes) -> tuple[str, bytes]:
  """The claimed signer and the 64 signature bytes of a ``manifest.json.sig`` (``where`` names
  it), or one VerificationError saying how the file is not one."""
  def bad(why: str) -> VerificationError:
    return VerificationError(f"{where} is not a faxbridge signature ({why}), so the export is not "
                             "trusted and nothing was run")

  try:
    doc = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    raise bad("not JSON: truncated or garbage") from None
  expected = {"format", "version", "algorithm", "key", "signature"}
  if not isinstance(doc, dict) or set(doc) != expected:
    raise bad(f"expected a JSON object with exactly the keys {sorted(expected)}")
  if doc["format"] != SIGNATURE_FORMAT or doc["version"] != SIGNATURE_VERSION:
    raise bad(f"format {doc['format']!r} version {doc['version']!r}; this faxbridge reads "
              f"{SIGNATURE_FORMAT!r} version {SIGNATURE_VERSION}")
  if doc["algorithm"] != ALGORITHM:
    raise bad(f"algorithm {doc['algorithm']!r}, expected {ALGORITHM!r}")
  if not isinstance(doc["key"], str) or not FINGERPRINT.fullmatch(doc["key"]):
    raise bad("'key' is not a fingerprint sha256:<64 hex digits>")
  if not isinstance(doc["signature"], str):
    raise bad("'signature' is not a string")
  try:
    signature = base64.b64decode(doc["signature"], validate=True)
  except (binascii.Error, ValueError):
    raise bad("'signature' is not base64") from None
  if len(signature) != SIGNATURE_BYTES:
    raise bad(f"'signature' has {len(signature)} bytes, an Ed25519 signature {SIGNATURE_BYTES}")
  return doc["key"], signature


def check_signature(export_dir: str | os.PathLike, trusted: Ed25519PublicKey | str | os.PathLike,
                    signature: bytes | None = None, where: str | None = None) -> bytes:
  """Refuse ``export_dir`` unless ``manifest.json.sig`` is ``trusted``'s signature of
  ``manifest.json``; return the manifest bytes it signs.

  The first thing a reader that requires a signature does: only the trusted key, the manifest's
  bytes and the signature file are read (all three regular files of bounded size; the manifest is
  not parsed), so nothing of an untrusted export is interpreted or run. A caller that wants no
  window between this check and its own read of the manifest parses the returned bytes.

  ``signature``: the signature file's bytes, for a reader whose copy of the export cannot hold
  the file (a Flower node: app bundles carry only source and text files, so the ServerApp sends
  it); ``where`` names them in a refusal. None: ``export_dir/manifest.json.sig`` is read.

  Raises:
    VerificationError: one line naming the cause: the trusted key is not an Ed25519 public key,
      no export or manifest there, the export is unsigned, the signature file is malformed, it was
      made with another key, or the manifest changed after it was signed.
  """
  from cryptography.exceptions import InvalidSignature

  key = trusted if not isinstance(trusted, str | os.PathLike) else load_public_key(trusted)
  trusted_print = fingerprint(key)
  export_dir = Path(export_dir)
  if not export_dir.is_dir():
    raise VerificationError(f"{export_dir}: no such export directory")
  manifest_path, signature_path = export_dir / MANIFEST_FILE, export_dir / SIGNATURE_FILE
  if not (manifest_path.exists() or manifest_path.is_symlink()):
    raise VerificationError(f"{export_dir} has no manifest.json: not a faxbridge export")
  manifest = _read_regular(manifest_path, MAX_MANIFEST_BYTES, "manifest", VerificationError)
  if signature is None:
    signature = read_signature(export_dir)
    where = str(signature_path)
    if signature is None:
      raise VerificationError(f"{export_dir} is not signed (no {SIGNATURE_FILE}), and a signature "
                              f"by the trusted key {trusted_print} is required; nothing was run")
  elif len(signature) > MAX_SIGNATURE_FILE_BYTES:
    raise VerificationError(f"{where} has {len(signature)} bytes, more than the "
                            f"{MAX_SIGNATURE_FILE_BYTES} a signature file has; nothing was run")
  where = where or f"the signature of {manifest_path}"
  claimed, raw = _signature_bytes(where, signature)
  try:
    key.verify(raw, manifest)
  except InvalidSignature:
    if claimed != trusted_print:
      raise VerificationError(
          f"{where} was made with another key (it names {claimed}), not the trusted "
          f"{trusted_print}; nothing was run") from None
    raise VerificationError(
        f"{where} does not verify with the trusted key {trusted_print}: manifest.json was "
        "changed after it was signed (or the signature is of another manifest); nothing was "
        "run") from None
  return manifest

"""Signed exports (``faxbridge._src.signing``): key pairs with safe modes, a detached Ed25519
signature of the manifest written inside the export, and ``trust=`` / ``--trust`` refusing an
unsigned or wrongly signed export before anything else of it is read.

Independent answers: the signature is checked with ``cryptography`` directly and, where it is
installed, with the ``openssl`` command; which files a refused verification opened is watched with
an audit hook (every ``open`` of the process)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cli_programs as progs  # tests/ is on sys.path under pytest
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from test_cli import TESTS, cli_env, drive

import faxbridge as fb
from faxbridge._src import signing
from faxbridge._src.export import read_manifest
from faxbridge._src.verify import run_on_runtime

OPENSSL = shutil.which("openssl")


# -- which files a call opens (an audit hook sees every open of the process) ----------------------
_recording: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
  if event == "open" and _recording and isinstance(args[0], str | bytes | os.PathLike):
    _recording[-1].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed; records only inside opened_files()


class opened_files:
  """``with opened_files() as seen:`` the absolute paths opened inside (``seen.under(dir)``)."""

  def __enter__(self) -> opened_files:
    self.paths: list[str] = []
    _recording.append(self.paths)
    return self

  def __exit__(self, *exc: object) -> None:
    _recording.remove(self.paths)

  def under(self, folder: Path) -> set[str]:
    return {os.path.relpath(os.path.abspath(p), folder) for p in self.paths
            if os.path.abspath(p).startswith(str(folder) + os.sep)}


# -- keys and exports, made once per module ----------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, signing.KeyPair]:
  tmp = tmp_path_factory.mktemp("keys")
  return {name: fb.keygen(tmp / name) for name in ("alice", "mallory")}


@pytest.fixture(scope="module")
def exports(keys, tmp_path_factory) -> dict[str, Path]:
  """scaled_mean signed by alice, the same unsigned, and shifted_mean (same signature, another
  manifest) signed by alice; all stablehlo."""
  tmp = tmp_path_factory.mktemp("exports")
  args = progs.example_inputs()
  return {
      "signed": fb.export(progs.scaled_mean, *args, target="stablehlo", out_dir=tmp / "signed",
                          sign_with=keys["alice"].private_key),
      "plain": fb.export(progs.scaled_mean, *args, target="stablehlo", out_dir=tmp / "plain"),
      "other": fb.export(progs.shifted_mean, *args, target="stablehlo", out_dir=tmp / "other",
                         sign_with=keys["alice"].private_key),
  }


def _public(path: Path) -> Ed25519PublicKey:
  key = serialization.load_pem_public_key(path.read_bytes())
  assert isinstance(key, Ed25519PublicKey)
  return key


# -- keygen -----------------------------------------------------------------------------------------
def test_keygen_writes_standard_pem_files_with_safe_modes(tmp_path):
  old = os.umask(0o022)
  try:
    pair = fb.keygen(tmp_path / "k")
  finally:
    os.umask(old)
  assert (pair.private_key, pair.public_key) == (tmp_path / "k.key", tmp_path / "k.pub")
  assert pair.private_key.stat().st_mode & 0o777 == 0o600
  assert pair.public_key.stat().st_mode & 0o777 == 0o644
  assert pair.private_key.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
  assert pair.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
  private = serialization.load_pem_private_key(pair.private_key.read_bytes(), password=None)
  public = _public(pair.public_key)
  raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  assert private.public_key().public_bytes(serialization.Encoding.Raw,  # type: ignore[call-arg]
                                           serialization.PublicFormat.Raw) == raw
  assert pair.fingerprint == "sha256:" + hashlib.sha256(raw).hexdigest()
  # A fresh key each time; missing folders are made, as fb.export makes out_dir's.
  assert fb.keygen(tmp_path / "new" / "k").fingerprint != pair.fingerprint


@pytest.mark.parametrize("existing", ["k.key", "k.pub"])
def test_keygen_never_overwrites_either_file(tmp_path, existing):
  (tmp_path / existing).write_text("mine\n")
  refusal = re.escape(f"{tmp_path / existing} exists; refusing to overwrite")
  with pytest.raises(FileExistsError, match=refusal):
    fb.keygen(tmp_path / "k")
  assert (tmp_path / existing).read_text() == "mine\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # the other half not written


def test_keygen_refuses_a_symlink_in_the_way(tmp_path):
  (tmp_path / "elsewhere").write_text("theirs\n")
  (tmp_path / "k.key").symlink_to(tmp_path / "elsewhere")
  with pytest.raises(FileExistsError, match=r"k\.key exists"):
    fb.keygen(tmp_path / "k")
  assert (tmp_path / "elsewhere").read_text() == "theirs\n"


# -- signing ----------------------------------------------------------------------------------------
def test_a_signed_export_holds_exactly_one_more_file_the_signature_of_its_manifest(exports, keys):
  signed = exports["signed"]
  listed = set(read_manifest(signed)["files"])
  on_disk = {str(p.relative_to(signed)) for p in signed.rglob("*") if p.is_file()}
  assert on_disk == listed | {"manifest.json", "manifest.json.sig"}
  doc = json.loads((signed / "manifest.json.sig").read_text())
  assert doc["key"] == keys["alice"].fingerprint and doc["algorithm"] == "Ed25519"
  # Checked by cryptography directly, not through faxbridge's check.
  _public(keys["alice"].public_key).verify(base64.b64decode(doc["signature"]),
                                           (signed / "manifest.json").read_bytes())
  assert not any(p.suffix in (".key", ".pub") for p in signed.rglob("*"))  # no key travels
  assert ((signed / "manifest.json.sig").stat().st_mode & 0o777
          == (signed / "manifest.json").stat().st_mode & 0o777)  # umask modes, as every file


def test_an_export_without_sign_with_has_no_signature(exports):
  plain = exports["plain"]
  assert not (plain / "manifest.json.sig").exists()
  # The same manifest as the signed export: signing adds a file and changes nothing else.
  assert (plain / "manifest.json").read_bytes() == (exports["signed"] / "manifest.json").read_bytes()


def test_signing_is_deterministic(exports, keys, tmp_path):
  again = fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo",
                    out_dir=tmp_path / "again", sign_with=keys["alice"].private_key)
  assert ((again / "manifest.json.sig").read_bytes()
          == (exports["signed"] / "manifest.json.sig").read_bytes())


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
def test_openssl_checks_the_signature_and_its_keys_sign(exports, keys, tmp_path):
  """The formats are the standard ones: OpenSSL verifies faxbridge's signature, and a key pair
  made by OpenSSL signs an export that faxbridge's check accepts."""
  signed = exports["signed"]
  sig = tmp_path / "sig.bin"
  sig.write_bytes(base64.b64decode(json.loads((signed / "manifest.json.sig").read_text())
                                   ["signature"]))
  ok = subprocess.run([OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey", keys["alice"].public_key,
                       "-rawin", "-in", signed / "manifest.json", "-sigfile", sig],
                      capture_output=True, text=True)
  assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok
  wrong = subprocess.run([OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey",
                          keys["mallory"].public_key, "-rawin", "-in", signed / "manifest.json",
                          "-sigfile", sig], capture_output=True, text=True)
  assert wrong.returncode != 0
  key, pub = tmp_path / "ossl.key", tmp_path / "ossl.pub"
  subprocess.run([OPENSSL, "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
  subprocess.run([OPENSSL, "pkey", "-in", key, "-pubout", "-out", pub], check=True)
  copy = tmp_path / "copy"
  shutil.copytree(exports["plain"], copy)
  signing.sign_export(copy, signing.load_private_key(key))
  assert signing.check_signature(copy, pub) == (copy / "manifest.json").read_bytes()


# -- verify with trust --------------------------------------------------------------------------------
def test_a_signed_export_verifies_with_the_trusted_key(exports, keys):
  with opened_files() as seen:
    report = fb.verify(exports["signed"], *progs.example_inputs(), runtime="jax",
                       trust=keys["alice"].public_key)
  assert report.ok, report
  # The watcher of refusals below sees what verify reads once the signature is accepted.
  assert {"manifest.json", "manifest.json.sig", "native/computation.jax"} <= \
      seen.under(exports["signed"].resolve())
  assert report.info["signature"] == f"verified, Ed25519 key {keys['alice'].fingerprint}"


def test_without_trust_the_signature_is_the_one_extra_file_accepted(exports, tmp_path):
  """The signature is not checked (the full run without trust is in the slow CLI test): the file
  check passes, so verify gets as far as the inputs, which are refused for their shape."""
  scale, values = progs.example_inputs()
  with pytest.raises(fb.VerificationError, match=r"input 'values' \(CLIENTS\) has shape"):
    fb.verify(exports["signed"], scale, values[:, :2], runtime="jax")
  for stray in ("manifest.json.sig.bak", "pieces/manifest.json.sig"):
    copy = tmp_path / stray.replace("/", "_")
    shutil.copytree(exports["signed"], copy)
    (copy / stray).write_text("{}")
    with pytest.raises(fb.VerificationError, match=re.escape(f"{stray}: not in the manifest")):
      fb.verify(copy, *progs.example_inputs(), runtime="jax")


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _mutated(case: str, exports: dict[str, Path], keys: dict[str, signing.KeyPair],
             tmp: Path) -> tuple[Path, Path]:
  """(export, trusted key file) for a refusal case."""
  alice, mallory = keys["alice"], keys["mallory"]
  if case == "wrong-key":
    return exports["signed"], mallory.public_key
  out = _copy(exports["signed"], tmp / case)
  sig = out / "manifest.json.sig"
  if case == "unsigned":
    sig.unlink()
  elif case == "signature-of-another-manifest":
    shutil.copyfile(exports["other"] / "manifest.json.sig", sig)
  elif case == "manifest-edited-after-signing":
    manifest = read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "name": "renamed"}, indent=2,
                                                  sort_keys=True) + "\n")
  elif case == "manifest-garbage":  # refused for its signature, not parsed
    (out / "manifest.json").write_text("{'format_version': 1,")
  elif case == "signer-named-falsely":  # mallory's signature, its key field claiming alice
    signing.sign_export(out, signing.load_private_key(mallory.private_key))
    doc = json.loads(sig.read_text())
    sig.write_text(json.dumps({**doc, "key": alice.fingerprint}))
  elif case == "signature-truncated":
    sig.write_bytes(sig.read_bytes()[:60])
  elif case == "signature-garbage":
    sig.write_bytes(np.random.default_rng(0).bytes(200))
  elif case == "signature-short":
    doc = json.loads(sig.read_text())
    sig.write_text(json.dumps({**doc, "signature": base64.b64encode(
        base64.b64decode(doc["signature"])[:63]).decode()}))
  elif case == "signature-a-symlink":
    sig.unlink()
    sig.symlink_to(exports["signed"] / "manifest.json.sig")
  elif case == "trusted-key-not-a-key":
    not_a_key = tmp / "not_a_key.pub"
    not_a_key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice@laptop\n")
    return out, not_a_key
  elif case == "trusted-key-is-the-private-key":
    return out, alice.private_key
  elif case == "trusted-key-missing":
    return out, tmp / "nowhere.pub"
  else:
    raise AssertionError(case)
  return out, alice.public_key


REFUSALS = {
    "wrong-key": "was made with another key (it names sha256:",
    "unsigned": "is not signed (no manifest.json.sig), and a signature by the trusted key sha256:",
    "signature-of-another-manifest": "manifest.json was changed after it was signed (or the "
                                     "signature is of another manifest)",
    "manifest-edited-after-signing": "manifest.json was changed after it was signed",
    "manifest-garbage": "manifest.json was changed after it was signed",
    "signer-named-falsely": "does not verify with the trusted key",
    "signature-truncated": "is not a faxbridge signature (not JSON: truncated or garbage)",
    "signature-garbage": "is not a faxbridge signature (not JSON: truncated or garbage)",
    "signature-short": "'signature' has 63 bytes, an Ed25519 signature 64",
    "signature-a-symlink": "cannot be read (a symlink); expected a regular file",
    "trusted-key-not-a-key": "not_a_key.pub is not a PEM public key",
    "trusted-key-is-the-private-key": "alice.key is a private key; trust the public key",
    "trusted-key-missing": "nowhere.pub: no such file",
}


@pytest.fixture(scope="module")
def refusals(exports, keys, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
  tmp = tmp_path_factory.mktemp("refusals")
  return {case: _mutated(case, exports, keys, tmp) for case in REFUSALS}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_trust_refuses_before_reading_anything_else(refusals, case):
  export, trusted = refusals[case]
  with opened_files() as seen, pytest.raises(fb.VerificationError) as e:
    fb.verify(export, *progs.example_inputs(), runtime="jax", trust=trusted)
  assert REFUSALS[case] in str(e.value)
  assert "\n" not in str(e.value)
  assert seen.under(export) <= {"manifest.json", "manifest.json.sig"}
  with pytest.raises(fb.VerificationError, match=re.escape(REFUSALS[case])):
    run_on_runtime(export, "jax", _named_inputs(), trust=trusted)


def _named_inputs() -> dict[str, np.ndarray]:
  scale, values = progs.example_inputs()
  return {"scale": np.asarray(scale), "values": values}


def test_check_signature_returns_the_signed_bytes(exports, keys):
  signed = exports["signed"]
  assert signing.check_signature(signed, keys["alice"].public_key) == \
      (signed / "manifest.json").read_bytes()
  # A key object serves as well as a file (what a Flower node holds after loading its config).
  key = signing.load_public_key(keys["alice"].public_key)
  assert signing.check_signature(signed, key) == (signed / "manifest.json").read_bytes()


# -- sign_with: the key never enters an export ------------------------------------------------------
def test_sign_with_inside_out_dir_is_refused_and_the_key_kept(exports, keys, tmp_path):
  """With force, an earlier export holding the key would be replaced, key and all."""
  out = _copy(exports["plain"], tmp_path / "out")
  key = out / "my.key"
  shutil.copyfile(keys["alice"].private_key, key)
  before = {p.name for p in out.iterdir()}
  with pytest.raises(fb.ExportError, match=re.escape(f"signing key {key} is inside the export directory")):
    fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo", out_dir=out,
              force=True, sign_with=key)
  assert key.read_bytes() == keys["alice"].private_key.read_bytes()
  assert {p.name for p in out.iterdir()} == before
  # A link from outside to a key inside is the same key inside.
  link = tmp_path / "link.key"
  link.symlink_to(key)
  with pytest.raises(fb.ExportError, match="is inside the export directory"):
    fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo", out_dir=out,
              force=True, sign_with=link)
  assert key.exists()


SIGN_WITH_ERRORS = {
    "missing": "signing key {tmp}/nowhere.key: no such file",
    "public": "is a public key; sign with the private key",
    "garbage": "is not a PEM private key",
}


@pytest.mark.parametrize("case", sorted(SIGN_WITH_ERRORS))
def test_sign_with_not_a_private_key_is_refused_before_any_work(keys, tmp_path, case):
  key = {"missing": tmp_path / "nowhere.key", "public": keys["alice"].public_key,
         "garbage": tmp_path / "garbage.key"}[case]
  (tmp_path / "garbage.key").write_text("not a key\n")
  with pytest.raises(fb.ExportError, match=re.escape(SIGN_WITH_ERRORS[case].format(tmp=tmp_path))):
    fb.export(progs.scaled_mean, *progs.example_inputs(), target="stablehlo",
              out_dir=tmp_path / "out", sign_with=key)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.key"]  # nothing written


# -- the command line: one interpreter runs every case (see test_cli.DRIVER) ---------------------
@pytest.fixture(scope="module")
def cli_runs(exports, keys, refusals, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
  tmp = tmp_path_factory.mktemp("cli_signing")
  inputs = tmp / "inputs.npz"
  np.savez(inputs, **_named_inputs())
  (tmp / "taken.pub").write_text("mine\n")
  verify = ["verify", "--runtime", "jax", "--inputs", inputs]
  cases: dict[str, tuple] = {
      "keygen": (tmp, ["keygen", tmp / "bob"]),
      "keygen-again": (tmp, ["keygen", tmp / "taken"]),
      "export-signed": (TESTS, ["export", "cli_programs:scaled_mean", "--target", "stablehlo",
                                "-o", tmp / "cli_signed", "--sign", keys["alice"].private_key]),
      "export-key-inside": (TESTS, ["export", "cli_programs:scaled_mean", "--target", "stablehlo",
                                    "-o", exports["plain"], "--force", "--sign",
                                    exports["plain"] / "plan.json"]),
      "verify-trusted": (TESTS, [verify[0], tmp / "cli_signed", *verify[1:], "--trust",
                                 keys["alice"].public_key]),
      **{f"refuse-{case}": (TESTS, [verify[0], export, *verify[1:], "--trust", trusted])
         for case, (export, trusted) in refusals.items()},
  }
  return drive(cases, tmp / "results.json")


def _assert_one_line_exit_2(rc: int, out: str, err: str, expected: str) -> None:
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert expected in lines[0] and lines[0].startswith("faxbridge")
  assert out == ""


@pytest.mark.slow  # cli_runs: the CLI in a fresh Python, ~7 s
def test_cli_keygen_prints_the_fingerprint_and_never_overwrites(cli_runs, tmp_path):
  rc, out, err = cli_runs["keygen"]
  assert rc == 0, err
  lines = out.splitlines()
  key_file = Path(lines[0].split()[2])
  assert key_file.name == "bob.key" and key_file.stat().st_mode & 0o777 == 0o600
  raw = _public(key_file.with_suffix(".pub")).public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)
  assert lines[-1] == f"fingerprint: sha256:{hashlib.sha256(raw).hexdigest()}"
  _assert_one_line_exit_2(*cli_runs["keygen-again"], "taken.pub exists; refusing to overwrite")


@pytest.mark.slow  # cli_runs: the CLI in a fresh Python, ~7 s
def test_cli_export_sign_and_verify_trust(cli_runs):
  rc, out, err = cli_runs["export-signed"]
  assert rc == 0, err
  assert "manifest.json.sig" in out  # the summary lists the signature with the files
  rc, out, err = cli_runs["verify-trusted"]
  assert rc == 0, (out, err)
  assert re.search(r"\n  signature +verified, Ed25519 key sha256:[0-9a-f]{64}\n", out), out
  assert out.splitlines()[-1].startswith("OK: 1 output on jax equals native")


@pytest.mark.slow  # cli_runs: the CLI in a fresh Python, ~7 s
def test_cli_export_refuses_a_key_inside_the_output(cli_runs, exports):
  _assert_one_line_exit_2(*cli_runs["export-key-inside"], "is inside the export directory")
  assert (exports["plain"] / "plan.json").exists()


@pytest.mark.slow  # cli_runs: the CLI in a fresh Python, ~7 s
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_trust_refusal_is_one_line_exit_2(cli_runs, case):
  _assert_one_line_exit_2(*cli_runs[f"refuse-{case}"], REFUSALS[case])


@pytest.mark.slow
def test_keygen_export_verify_from_fresh_interpreters(tmp_path):
  """The whole path as a user types it, each command its own process."""
  def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=TESTS,
                          env=cli_env(), capture_output=True, text=True, timeout=300)

  assert cli("keygen", tmp_path / "k").returncode == 0
  assert cli("keygen", tmp_path / "other").returncode == 0
  done = cli("export", "cli_programs:scaled_mean", "--target", "stablehlo", "-o", tmp_path / "e",
             "--save-inputs", "--sign", tmp_path / "k.key")
  assert done.returncode == 0, done.stderr
  done = cli("verify", tmp_path / "e", "--trust", tmp_path / "k.pub")
  assert done.returncode == 0, done.stderr
  assert re.search(r"\n  signature +verified, Ed25519 key sha256:", done.stdout), done.stdout
  done = cli("verify", tmp_path / "e")  # without --trust the signature is not read
  assert done.returncode == 0, done.stderr
  assert "signature" not in done.stdout
  done = cli("verify", tmp_path / "e", "--trust", tmp_path / "other.pub")
  assert done.returncode == 2 and "was made with another key" in done.stderr
  assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1

"""The ``faxbridge`` command as a user runs it (``python -m faxbridge`` in a subprocess): every usage
error is one line on stderr with exit code 2 and no traceback; a verification whose runtime
computes something else exits 1 with a MISMATCH report; a float64 export verifies with or without
JAX_ENABLE_X64=1 (its manifest turns 64-bit on)."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cli_programs as progs  # tests/ is on sys.path under pytest
import numpy as np
import pytest

import faxbridge as fb
from faxbridge._src.export import read_manifest, sha256

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TIMEOUT_S = 300


def cli_env(x64: bool = False) -> dict[str, str]:
  """This checkout's faxbridge first; programs import from the working directory (the CLI puts it
  on sys.path); 64-bit JAX only when asked, whatever the calling environment holds."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "PYTHONPATH")}
  env["PYTHONPATH"] = str(REPO)
  if x64:
    env["JAX_ENABLE_X64"] = "1"
  return env


def _start(args: list[str], cwd: Path = TESTS, x64: bool = False) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=cwd,
                          env=cli_env(x64), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=TIMEOUT_S)
  return proc.returncode, out, err


def _cli(args: list[str], cwd: Path = TESTS, x64: bool = False) -> tuple[int, str, str]:
  return _finish(_start(args, cwd, x64))


def _save_inputs(path: Path, export_dir: Path, args: tuple) -> Path:
  specs = read_manifest(export_dir)["computation"]["inputs"]
  np.savez(path, **{s["name"]: np.asarray(v) for s, v in zip(specs, args)})
  return path


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> tuple[Path, Path]:
  """scaled_mean exported to stablehlo (in this process: the export is not under test here) and
  its example inputs as an .npz by manifest name."""
  tmp = tmp_path_factory.mktemp("cli")
  args = progs.example_inputs()
  out = fb.export(progs.scaled_mean, *args, target="stablehlo", out_dir=tmp / "scaled")
  return out, _save_inputs(tmp / "inputs.npz", out, args)


# --- usage errors: one line, exit 2, no traceback ------------------------------------------------

USAGE_CASES = {
    # name: (argv, what stderr says); {tmp}, {export}, {inputs} are filled in
    "module-missing": (["export", "no_such_module:prog", "-o", "{tmp}/o"],
                       "no module named 'no_such_module'"),
    "attribute-missing": (["export", "cli_programs:no_such_attr", "-o", "{tmp}/o"],
                          "has no attribute 'no_such_attr'"),
    "not-module-colon-attr": (["export", "cli_programs", "-o", "{tmp}/o"], "expected MODULE:ATTR"),
    "not-a-program": (["export", "cli_programs:not_a_program", "-o", "{tmp}/o"],
                      "not an fb.computation or fb.IterativeProcess"),
    "no-example-inputs": (["export", "bare_program:total", "-o", "{tmp}/o"],
                          "has no example_inputs()"),
    "unknown-target": (["export", "cli_programs:scaled_mean", "--target", "onnx", "-o", "{tmp}/o"],
                       "argument --target: invalid choice: 'onnx'"),
    "export-dir-exists": (["export", "cli_programs:scaled_mean", "-o", "{export}"],
                          "exists; pass --force to replace it"),
    "float64-without-x64": (["export", "cli_programs:mean64", "--example-inputs", "inputs64",
                             "--target", "stablehlo", "-o", "{tmp}/f64"],
                            "leaf args[0] (arguments) has dtype float64 but jax_enable_x64 is off"),
    "export-dir-missing": (["verify", "{tmp}/nowhere", "--runtime", "jax", "--inputs", "{inputs}"],
                           "no such export directory"),
    "manifest-missing": (["verify", "{tmp}/empty", "--runtime", "jax", "--inputs", "{inputs}"],
                         "has no manifest.json"),
    "manifest-not-json": (["verify", "{tmp}/bad_json", "--runtime", "jax", "--inputs", "{inputs}"],
                          "manifest.json is not JSON"),
    "inputs-missing": (["verify", "{export}", "--runtime", "jax", "--inputs", "{tmp}/none.npz"],
                       "none.npz: no such file"),
    "inputs-not-npz": (["verify", "{export}", "--runtime", "jax", "--inputs", "{tmp}/inputs.txt"],
                       "inputs.txt is not an .npz file"),
    "inputs-npy": (["verify", "{export}", "--runtime", "jax", "--inputs", "{tmp}/one.npy"],
                   "is a single .npy array, not an .npz"),
    "option-of-another-target": (["export", "cli_programs:scaled_mean", "--target", "stablehlo",
                                  "--local", "xla", "-o", "{tmp}/o"],
                                 "target 'stablehlo' has no option 'local' (its options are "
                                 "stablehlo_version)"),
    "unregistered-target": (["verify", "{tmp}/unregistered", "--inputs", "{inputs}"],
                            "no registered runtime reads exports of target 'gone'"),
    "unknown-runtime": (["verify", "{export}", "--runtime", "onnx", "--inputs", "{inputs}"],
                        "argument --runtime: invalid choice: 'onnx'"),
    "rounds-zero": (["verify", "{export}", "--runtime", "jax", "--inputs", "{inputs}", "--rounds",
                     "0"], "argument --rounds: must be at least 1, got 0"),
    "rounds-not-a-number": (["verify", "{export}", "--inputs", "{inputs}", "--rounds", "two"],
                            "argument --rounds: expected a whole number, got 'two'"),
    "inputs-unknown-name": (["verify", "{export}", "--runtime", "jax", "--inputs",
                             "{tmp}/extra.npz"], "unknown input(s) ['weights']"),
    "inputs-per-client-shape": (["verify", "{export}", "--runtime", "jax", "--inputs",
                                 "{tmp}/shape.npz"], "input 'values' (CLIENTS) has shape (3, 2, 2)"),
    # No --inputs, no --program and no DIR.inputs.npz beside the export: say all three ways.
    "verify-without-inputs": (["verify", "{export}", "--runtime", "jax"],
                              "no inputs: pass --inputs FILE.npz or --program MODULE:ATTR"),
    "inputs-and-program": (["verify", "{export}", "--runtime", "jax", "--inputs", "{inputs}",
                            "--program", "cli_programs:scaled_mean"],
                           "give --inputs FILE or --program MODULE:ATTR, not both"),
    "verify-program-missing": (["verify", "{export}", "--runtime", "jax", "--program",
                                "cli_programs:no_such_attr"], "has no attribute 'no_such_attr'"),
    # A single computation runs once: --rounds was silently ignored.
    "verify-rounds-of-a-computation": (["verify", "{export}", "--runtime", "jax", "--rounds", "3"],
                                       "--rounds applies to an iterative process"),
}


# One interpreter runs every case through faxbridge._src.cli.main as `python -m faxbridge` would (exit
# codes from SystemExit, anything uncaught printed as Python prints it): a fresh interpreter per
# case imports JAX each time, which the quick suite cannot afford; the slow suite does that too.
DRIVER = """
import contextlib, io, json, os, sys, traceback
from faxbridge._src.cli import main
cases, results = json.loads(sys.argv[1]), {}
for name, (cwd, argv, *env) in cases.items():
  os.chdir(cwd)
  saved = dict(os.environ)
  os.environ.update(env[0] if env else {})
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main(argv)
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    except BaseException:
      traceback.print_exc()
      rc = 1
  os.environ.clear()
  os.environ.update(saved)
  results[name] = [rc, out.getvalue(), err.getvalue()]
with open(sys.argv[2], "w") as f:
  json.dump(results, f)
"""


@pytest.fixture(scope="module")
def usage_setup(scaled, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
  """The files the cases name, and each case's working directory and argv."""
  export, inputs = scaled
  tmp = tmp_path_factory.mktemp("usage")
  (tmp / "empty").mkdir()
  (tmp / "bad_json").mkdir()
  (tmp / "bad_json" / "manifest.json").write_text("{'format_version': 1,")
  (tmp / "inputs.txt").write_text("scale = 2.0\n")
  # An export of a target no installed package registers (a plug-in since uninstalled).
  shutil.copytree(export, tmp / "unregistered")
  manifest = read_manifest(tmp / "unregistered")
  (tmp / "unregistered" / "manifest.json").write_text(json.dumps({**manifest, "target": "gone"}))
  np.save(tmp / "one.npy", np.zeros(3, np.float32))
  data = dict(np.load(inputs))
  np.savez(tmp / "extra.npz", **data, weights=data["values"])
  np.savez(tmp / "shape.npz", scale=data["scale"], values=data["values"][:, :2])
  (tmp / "bare_program.py").write_text(  # a program module without example_inputs()
      "import faxbridge as fb\n\n\n"
      "@fb.computation(in_placements=(fb.CLIENTS,))\n"
      "def total(x):\n"
      "  return fb.sum(x)\n")
  return {name: (tmp if name == "no-example-inputs" else TESTS,
                 [a.format(tmp=tmp, export=export, inputs=inputs) for a in argv])
          for name, (argv, _) in USAGE_CASES.items()}


def drive(cases: dict[str, tuple], results: Path) -> dict[str, tuple[int, str, str]]:
  """Run ``{name: (cwd, argv[, env])}`` through DRIVER in one interpreter: (rc, stdout, stderr)."""
  cases = {name: (str(cwd), [str(a) for a in argv], *rest) for name, (cwd, argv, *rest)
           in cases.items()}
  proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(results)],
                        cwd=TESTS, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr
  return {name: tuple(r) for name, r in json.loads(results.read_text()).items()}


@pytest.fixture(scope="module")
def usage_runs(usage_setup, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
  return drive(usage_setup, tmp_path_factory.mktemp("driver") / "results.json")


def _assert_usage_error(case: str, rc: int, out: str, err: str) -> None:
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert USAGE_CASES[case][1] in lines[0]
  assert lines[0].startswith("faxbridge")
  assert out == ""


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_usage_error_is_one_line_and_exit_code_2(usage_runs, case):
  _assert_usage_error(case, *usage_runs[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_usage_error_from_a_fresh_interpreter(usage_setup, case):
  cwd, argv = usage_setup[case]
  _assert_usage_error(case, *_cli(argv, cwd=cwd))


def test_an_existing_export_dir_is_left_as_it_was(scaled, usage_runs):
  export, _ = scaled
  assert usage_runs["export-dir-exists"][0] == 2
  manifest = read_manifest(export)
  assert all(sha256(export / rel) == digest for rel, digest in manifest["files"].items())


# --- a runtime that computes something else: exit 1 and the MISMATCH report ----------------------


def _swap_pieces(into: Path, source: Path) -> list[str]:
  """Put ``source``'s jax.export pieces in ``into`` and re-write their sha256s in its manifest:
  an export whose files are consistent but whose pieces compute another program (what a converter
  bug would produce)."""
  manifest = read_manifest(into)
  swapped = []
  for path in sorted((source / "pieces").rglob("*.jax")):
    rel = str(path.relative_to(source))
    if rel in manifest["files"] and sha256(into / rel) != sha256(path):
      shutil.copyfile(path, into / rel)
      manifest["files"][rel] = sha256(into / rel)
      swapped.append(rel)
  (into / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return swapped


@pytest.mark.slow  # keeps the quick suite under two minutes; runs in CI
def test_verify_exits_1_with_a_mismatch_report_when_the_runtime_computes_something_else(
    scaled, tmp_path):
  export, inputs = scaled
  tampered = tmp_path / "tampered"
  shutil.copytree(export, tampered)
  other = fb.export(progs.shifted_mean, *progs.example_inputs(), target="stablehlo",
                    out_dir=tmp_path / "shifted")
  assert _swap_pieces(tampered, other)
  rc, out, err = _cli(["verify", tampered, "--runtime", "jax", "--inputs", inputs])
  assert rc == 1, (out, err)
  assert out.splitlines()[-1].startswith("MISMATCH: 1 of 1 output on jax differs from native: out")
  assert [line.split()[0] for line in out.splitlines()
          if line.endswith("FAIL (exceeds tolerance)")] == ["out"]
  assert "  process  a fresh Python process" in out  # the runtime ran: its values are what differ
  assert err == ""


@pytest.mark.slow
def test_the_untampered_export_verifies_from_the_cli(scaled):
  export, inputs = scaled
  rc, out, err = _cli(["verify", export, "--runtime", "jax", "--inputs", inputs])
  assert rc == 0, (out, err)
  assert out.splitlines()[-1].startswith("OK: 1 output on jax equals native")


# --- float64 with jax_enable_x64 ---------------------------------------------------------------


@pytest.mark.slow
def test_float64_export_verifies_with_x64_and_without(tmp_path):
  out, inputs = tmp_path / "mean64", tmp_path / "inputs64.npz"
  rc, stdout, err = _cli(["export", "cli_programs:mean64", "--example-inputs", "inputs64",
                          "--target", "stablehlo", "-o", out, "--save-inputs", inputs], x64=True)
  assert rc == 0, err
  assert [s["dtype"] for s in read_manifest(out)["computation"]["inputs"]] == ["float64"]
  assert np.load(inputs)["values"].dtype == np.float64
  without = _start(["verify", out, "--runtime", "jax", "--inputs", inputs])
  rc, stdout, err = _cli(["verify", out, "--runtime", "jax", "--inputs", inputs], x64=True)
  assert rc == 0, (stdout, err)
  assert stdout.splitlines()[-1].startswith("OK: 1 output on jax")
  rc, stdout, err = _finish(without)  # the manifest's float64 leaves turn 64-bit on
  assert rc == 0, (stdout, err)
  assert stdout.splitlines()[-1].startswith("OK: 1 output on jax")


# --- what a user sees: version, targets, inspect, export and verify summaries ---------------------


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, str, str]]]:
  """The everyday commands, in one interpreter (stderr is not a terminal: no progress)."""
  tmp = tmp_path_factory.mktemp("user")
  export = tmp / "out" / "scaled"
  cases = {
      "help": (TESTS, ["--help"]),
      "bare": (TESTS, []),  # was an argparse error
      "verbose-after-the-command": (TESTS, ["targets", "-v"]),  # was rejected
      "version": (TESTS, ["--version"]),
      "targets": (TESTS, ["targets"]),
      "targets-tff-missing": (TESTS, ["targets"], {"FAXBRIDGE_TFF_PYTHON": str(tmp / "no-python")}),
      "inspect": (TESTS, ["inspect", "cli_programs:centred", "--example-inputs", "centred_inputs",
                          "--html", tmp / "round.html"]),
      "inspect-jaxpr": (TESTS, ["inspect", "cli_programs:scaled_mean", "--jaxpr"]),
      "export": (TESTS, ["export", "cli_programs:scaled_mean", "--target", "stablehlo", "-o",
                         export, "--save-inputs"]),
      "verify-saved-inputs": (TESTS, ["verify", export, "--runtime", "jax"]),
      "export-centred": (TESTS, ["export", "cli_programs:centred", "--example-inputs",
                                 "centred_inputs", "--target", "stablehlo", "-o", tmp / "centred"]),
      "verify-program": (TESTS, ["verify", tmp / "centred", "--runtime", "jax", "--program",
                                 "cli_programs:centred", "--example-inputs", "centred_inputs"]),
  }
  return tmp, drive(cases, tmp / "results.json")


@pytest.mark.slow  # user_runs: every everyday command in a fresh Python, ~18 s
def test_every_everyday_command_succeeds_quietly_when_stderr_is_not_a_terminal(user_runs):
  _, runs = user_runs
  for name, (rc, out, err) in runs.items():
    assert rc == 0, (name, out, err)
    assert err == "", (name, err)  # no progress, no TensorFlow or absl noise
    assert out, name


@pytest.mark.slow  # user_runs: every everyday command in a fresh Python, ~18 s
def test_a_bare_faxbridge_prints_the_help(user_runs):
  rc, out, err = user_runs[1]["bare"]
  assert (rc, err) == (0, "") and out == user_runs[1]["help"][1]


@pytest.mark.slow  # user_runs: every everyday command in a fresh Python, ~18 s
def test_help_is_plain_text_and_every_argument_says_what_it_is(user_runs):
  """No RST markup, and every option and positional of every command has help (with its default
  where it has one)."""
  from faxbridge._src import cli

  out = user_runs[1]["help"][1]
  assert "``" not in out, out
  commands = next(a for a in cli.command_parser()._actions
                  if isinstance(a, argparse._SubParsersAction)).choices
  assert set(commands) == {"targets", "export", "verify", "inspect", "demo", "keygen"}
  for name, parser in commands.items():
    for action in parser._actions:
      assert action.help, (name, action.dest)
      if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
        assert f"default: {action.default}" in action.help, (name, action.dest, action.help)


@pytest.mark.slow  # user_runs: every everyday command in a fresh Python, ~18 s
def test_version_names_faxbridge_and_jax(user_runs):
  import jax

  out = user_runs[1]["version"][1]
  assert out.startswith(f"faxbridge {fb.__version__} (jax {jax.__version__}, Python 3.")


def _runtime_lines(out: str) -> dict[tuple[str, str], str]:
  """(target, runtime) -> the runtime's line under that target in `faxbridge targets`."""
  lines, target = {}, None
  for line in out.splitlines():
    if line and not line.startswith(" ") and ":" in line:
      target = line.split(":")[0]
    elif line.strip().startswith("runtime "):
      lines[(target, line.split()[1])] = line
  return lines


def test_targets_lists_every_target_with_its_runtimes_and_whether_they_are_installed(user_runs):
  import importlib.util

  from faxbridge._src import registry

  _, runs = user_runs
  out = runs["targets"][1]
  for name, target in registry.targets().items():
    assert f"{name}: {target.summary}" in out
    for option in target.options:
      assert f"  option  {option.flag}" in out
  expected = {(t, r.name) for t in registry.targets() for r in registry.readers(t)}
  assert expected >= {("tff", "tff"), ("stablehlo", "iree"), ("stablehlo", "jax"),
                      ("tflite", "litert"), ("flower", "flower")}
  lines = _runtime_lines(out)
  assert set(lines) == expected
  # Installed as this machine has them, checked here independently of the CLI.
  venv_tff = REPO / ".venv-tff"
  here = {"jax": True,
          "iree": all(importlib.util.find_spec(m) for m in ("iree.compiler", "iree.runtime")),
          "litert": importlib.util.find_spec("ai_edge_litert") is not None,
          "flower": importlib.util.find_spec("flwr") is not None,
          "tff": bool(os.environ.get("FAXBRIDGE_TFF_PYTHON")) or (
              (venv_tff / "bin" / "python").is_file() and (venv_tff / ".ready").is_file())}
  for (_, runtime), line in lines.items():
    assert line.split()[2] == ("installed" if here[runtime] else "MISSING"), line
  missing = _runtime_lines(runs["targets-tff-missing"][1])[("tff", "tff")]
  assert "MISSING" in missing and "no-python does not exist" in missing
  assert f"install: {registry.runtime('tff').install}" in missing


def test_inspect_names_leaves_as_the_user_does_and_gives_each_stages_traffic(user_runs):
  _, runs = user_runs
  out = runs["inspect"][1]
  assert out.startswith("cli_programs:centred: 2 stages, traced for 3 clients\n")  # not "2 stage(s)"
  assert "(s)" not in out
  rows = {line.split()[0]: line.split() for line in out.splitlines()
          if line[:1] in ("p", "d", "o") and "[" in line.split()[0]}
  assert rows["params['w']"][1:3] == ["SERVER", "f32[2]"]
  assert rows["data[0]"][1:3] == ["CLIENTS", "f32[5,2]"]  # per client
  assert rows["data[1]"][1:3] == ["CLIENTS", "f32[]"]
  assert rows["out['spread']"][1:3] == ["SERVER", "f32[2]"]
  form = fb.split(progs.centred, *progs.centred_inputs())
  traffic = form.bytes_per_client()
  assert [t["download"] for t in traffic] == [16, 8] and [t["upload"] for t in traffic] == [12, 8]
  for i, t in enumerate(traffic):
    assert f"stage {i}: each client downloads {t['download']} B and uploads {t['upload']} B" in out
  assert "weighted_mean(fb.map(…), weight data[1])" in out  # the weight by the user's name
  assert "broadcast  params['w'] f32[2] (8 B)" in out


def test_inspect_prints_the_traced_program_only_when_asked(user_runs):
  _, runs = user_runs
  jaxpr = runs["inspect-jaxpr"][1]
  assert jaxpr.startswith("federated computation scaled_mean (clients=3)")
  assert "@CLIENTS = fb.broadcast" in jaxpr and "fb.mean" in jaxpr
  assert "where a = scale, b = values" in jaxpr  # the printer's letters, by the user's names
  assert "stage 0: each client downloads 4 B and uploads 8 B" in jaxpr
  assert "federated computation" not in runs["inspect"][1]


def test_inspect_html_is_a_well_formed_self_contained_drawing_of_the_round(user_runs):
  import html.parser
  import xml.etree.ElementTree as ET

  tmp, _ = user_runs
  page = (tmp / "round.html").read_text()
  root = ET.fromstring(page.split("\n", 1)[1])  # after <!DOCTYPE html>: XHTML, so XML parses it
  text = "".join(root.itertext())
  # The two round trips with their traffic per client and the user's names (the layout itself is
  # tested in a browser: tests/test_drawing.py).
  for want in ("stage 0", "stage 1", "16 B per client", "12 B per client", "8 B per client",
               "3 in this trace", "weight: data[1]", "sum: fb.map(…)", "['spread']",
               "stage 1 broadcast mean, out['mean']", "mean ← aggregate of stage 0"):
    assert want in text, (want, text)
  # Nothing to fetch: no scripts, no links or sources (the namespaces are names, not fetched).
  assert not [e for e in root.iter() if e.tag.endswith(("script", "link", "img"))]
  assert not [e for e in root.iter() for k in e.attrib if k in ("src", "href")]
  parser = html.parser.HTMLParser()
  parser.feed(page)
  parser.close()


def test_export_lists_the_files_it_wrote_and_saves_inputs_beside_the_export(user_runs):
  tmp, runs = user_runs
  export = tmp / "out" / "scaled"
  out = runs["export"][1]
  files = sorted(p for p in export.rglob("*") if p.is_file())
  for p in files:
    assert any(line.startswith(str(p.relative_to(export)) + " ") for line in out.splitlines())
  assert f"total: {len(files)} files" in out
  sidecar = tmp / "out" / "scaled.inputs.npz"
  assert f"example inputs: {sidecar}" in out
  _, values = progs.example_inputs()
  saved = np.load(sidecar)
  assert sorted(saved.files) == ["scale", "values"]
  np.testing.assert_array_equal(saved["values"], values)
  assert saved["scale"].dtype == np.float32


@pytest.mark.parametrize("case, outputs", [("verify-saved-inputs", ["out"]),
                                           ("verify-program", ["out['mean']", "out['spread']"])])
def test_verify_without_inputs_uses_the_saved_or_the_programs_example_inputs(user_runs, case,
                                                                               outputs):
  _, runs = user_runs
  out = runs[case][1]
  # A row per output, by the user's name (the manifest's are out_mean, out_spread), each passing.
  rows = [line.split() for line in out.splitlines() if line.startswith(("out ", "out["))]
  assert [r[0] for r in rows] == outputs and all(r[-1] == "pass" for r in rows), out
  assert out.splitlines()[-1].startswith(f"OK: all {len(outputs)} outputs on jax equal native"
                                         if len(outputs) > 1 else "OK: 1 output on jax equals native")


# --- progress on a terminal ---------------------------------------------------------------------


def _with_terminal_stderr(args: list[str], cwd: Path = TESTS, extra_env: dict | None = None
                          ) -> tuple[int, str, str]:
  """Run the CLI with stderr on a pseudo-terminal (as in a person's shell), stdout on a pipe."""
  import pty
  import threading

  leader, follower = pty.openpty()
  env = {**cli_env(), **(extra_env or {})}
  proc = subprocess.Popen([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=follower, text=True)
  os.close(follower)
  chunks: list[bytes] = []

  def drain():  # the terminal's buffer is small: read while it runs
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
  out, _ = proc.communicate(timeout=TIMEOUT_S)
  reader.join(timeout=10)
  os.close(leader)
  return proc.returncode, out, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_progress_goes_to_a_terminal_stderr_step_by_step(tmp_path):
  rc, out, err = _with_terminal_stderr(["export", "cli_programs:scaled_mean", "--target",
                                        "stablehlo", "-o", tmp_path / "scaled"])
  assert rc == 0, (out, err)
  steps = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
  assert steps == ["importing cli_programs:scaled_mean",
                   "loading the stablehlo exporter",
                   "tracing and splitting scaled_mean",
                   "computation: lowering stage0_server_prepare to StableHLO",
                   "computation: lowering stage0_client_work to StableHLO",
                   "computation: lowering server_result to StableHLO",
                   "serializing the native reference"], err
  assert "exported cli_programs:scaled_mean" in out and "[" not in out.splitlines()[0][:1]


class _Terminal(io.StringIO):
  """A stderr that says it is a terminal, so the CLI reports progress."""

  def isatty(self) -> bool:
    return True


def _library_functions() -> dict[tuple[str, str], object]:
  """Every function and class of every faxbridge module loaded now, by (module, name)."""
  return {(name, attr): value for name, module in list(sys.modules.items())
          if name.startswith("faxbridge") and module is not None
          for attr, value in vars(module).items() if callable(value)}


def test_progress_is_heard_not_patched_the_library_is_the_same_while_the_cli_runs(
    tmp_path, monkeypatch):
  """In this process: the CLI prints the library's events, and every library function seen while
  it runs (checked at each event) and after is the one that was there before."""
  from faxbridge._src import cli, events
  from faxbridge._src import export as fe

  before = _library_functions()
  assert ("faxbridge._src.export", "split_program") in before
  changed: list = []

  def check(event):
    now = _library_functions()
    changed.extend((key, event.name) for key, value in before.items() if now.get(key) is not value)

  err = _Terminal()
  monkeypatch.setattr(sys, "stderr", err)
  monkeypatch.chdir(TESTS)
  split_program = fe.split_program
  with fb.events.listen(check):
    rc = cli.main(["export", "cli_programs:scaled_mean", "--target", "stablehlo", "-o",
                   str(tmp_path / "out"), "--save-inputs"])
    assert rc == 0, err.getvalue()
    rc = cli.main(["verify", str(tmp_path / "out"), "--runtime", "iree"])
    assert rc == 0, err.getvalue()
  assert fe.split_program is split_program
  assert not changed, changed
  after = _library_functions()
  assert not [key for key, value in before.items() if after.get(key) is not value]
  assert not events.listening()  # the CLI's listener went with its command
  steps = [line.split("] ", 1)[1] for line in err.getvalue().splitlines() if line.startswith("[")]
  for step in ("tracing and splitting scaled_mean", "serializing the native reference",
               "loading runtime iree", "iree: computation", "running natively (XLA)",
               "native: computation"):
    assert step in steps, steps


@pytest.mark.slow
def test_verify_on_a_terminal_shows_each_round_on_the_runtime_and_natively(tmp_path):
  rc, out, err = _cli(["export", "examples.fedavg:process", "--target", "stablehlo", "-o",
                       tmp_path / "fedavg", "--save-inputs"], cwd=REPO)
  assert rc == 0, err
  for runtime in ("iree", "jax"):  # in this process, and in a fresh one that reports its rounds
    rc, out, err = _with_terminal_stderr(["verify", tmp_path / "fedavg", "--runtime", runtime,
                                          "--rounds", "2"], cwd=REPO)
    assert rc == 0, (out, err)
    steps = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
    assert steps[:3] == [f"checking {len(read_manifest(tmp_path / 'fedavg')['files'])} files "
                         "against the manifest's sha256", f"loading runtime {runtime}",
                         f"running on {runtime}"], steps
    rounds = {who: [s for s in steps if s.startswith(f"{who}: ")] for who in (runtime, "native")}
    for who in (runtime, "native"):
      assert rounds[who] == [f"{who}: initialize", f"{who}: round 1 of 2",
                             f"{who}: round 2 of 2"], steps
    assert steps.index(f"{runtime}: round 2 of 2") < steps.index("running natively (XLA)") \
        < steps.index("native: initialize")
    assert out.splitlines()[-1].startswith("OK: ")


@pytest.mark.slow
def test_verify_on_a_terminal_shows_the_rounds_tff_reports_while_it_runs(tmp_path):
  rc, out, err = _cli(["export", "examples.fedavg:process", "--target", "tff", "-o",
                       tmp_path / "fedavg", "--save-inputs"], cwd=REPO)
  assert rc == 0, err
  rc, out, err = _with_terminal_stderr(["verify", tmp_path / "fedavg", "--runtime", "tff",
                                        "--rounds", "2"], cwd=REPO)
  assert rc == 0, (out, err)
  lines = [line for line in err.splitlines() if line.startswith("[")]
  steps = [line.split("] ", 1)[1] for line in lines]
  start = steps.index("starting TFF 0.87 in .venv-tff (rounds run there)")
  tff = [s for s in steps[start:] if s == "tff: initialize" or s.startswith("tff: round ")]
  # The runner's rounds, then (a single-stage round) the MapReduceForm and DistributeAggregateForm
  # rebuilds' rounds, all before the native side starts.
  assert tff == ["tff: initialize", "tff: round 1 of 2", "tff: round 2 of 2"], steps
  for form in ("MapReduceForm", "DistributeAggregateForm"):
    run = f"tff (next rebuilt from {form})"
    assert [s for s in steps if s.startswith(f"{run}: ")] == [
        f"{run}: initialize", f"{run}: round 1 of 2", f"{run}: round 2 of 2"], steps
  assert steps.index("tff: round 2 of 2") < steps.index("running natively (XLA)")
  # Each round was printed when TFF started it (the file is read while the runner runs), not all
  # at the end: the rounds' times differ.
  seconds = [float(line[1:].split(" s]")[0]) for line, s in zip(lines, steps)
             if s.startswith("tff") and "round" in s]
  assert seconds[-1] > seconds[0], lines
  assert out.splitlines()[-1].startswith("OK: ")


@pytest.mark.slow
def test_demo_exports_the_default_targets_demo_and_proves_it(tmp_path):
  """`make demo`'s command as a user runs it: the installed `faxbridge` script, from a directory
  outside the repository with nothing on PYTHONPATH, exports the default target's demo (the bundled
  FedAvg, installed as faxbridge.examples) and proves it on the demo's runtime, every round compared."""
  from faxbridge._src import registry

  target = registry.default_target()
  demo = target.demo
  script = Path(sys.executable).parent / "faxbridge"
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "PYTHONPATH")}
  proc = subprocess.run([str(script), "demo", "-o", str(tmp_path), "--rounds", "2"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  rc, out, err = proc.returncode, proc.stdout, proc.stderr
  assert rc == 0, (out, err)
  export = tmp_path / f"{demo.program.split(':')[0].rsplit('.', 1)[-1]}_{target.name}"
  manifest = read_manifest(export)
  assert manifest["target"] == target.name and manifest["kind"] == "iterative_process"
  assert f"exported {demo.program} to {export}" in out
  assert f"running 2 rounds on {demo.runtime} " in out
  assert "round2/" in out and out.splitlines()[-1].startswith("OK: "), out


@pytest.mark.slow
def test_tensorflow_and_absl_logs_are_hidden_unless_verbose(tmp_path):
  noise = ("absl::InitializeLog", "oneDNN custom operations", "Ignored output_format")
  args = ["export", "cli_programs:scaled_mean", "--target", "tflite", "-o"]
  rc, out, err = _with_terminal_stderr([*args, tmp_path / "quiet"])
  assert rc == 0, (out, err)
  assert "computation: converting stage0_client_work to TFLite" in err
  assert not [n for n in noise if n in err], err
  rc, out, err = _with_terminal_stderr(["-v", *args, tmp_path / "verbose"])
  assert rc == 0, (out, err)
  assert [n for n in noise if n in err], "no native log to hide: the check above proves nothing"
  rc, out, err = _with_terminal_stderr([*args, tmp_path / "verbose-after", "-v"])  # after the command
  assert rc == 0, (out, err)
  assert [n for n in noise if n in err], err


# --- the examples of `faxbridge --help` and of the README run as written --------------------------


def _help_examples() -> list[str]:
  from faxbridge._src import cli

  return cli.examples()


def test_the_help_shows_the_examples_and_the_readme_runs_the_same_commands(user_runs):
  out = user_runs[1]["help"][1]
  examples = _help_examples()
  assert len(examples) >= 5
  assert all(f"  {e}" in out for e in examples)
  readme = (REPO / "README.md").read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
  block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
  commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
  assert commands and set(commands) <= set(examples), (commands, examples)


@pytest.mark.slow
def test_every_help_example_runs_as_written(tmp_path):
  """Each example line of `faxbridge --help`, in order, from a folder where `examples` imports (a
  copy of the repository's examples/), as a user would paste them."""
  import shlex

  shutil.copytree(REPO / "examples", tmp_path / "examples")
  for line in _help_examples():
    argv = shlex.split(line)
    assert argv[0] == "faxbridge"
    rc, out, err = _cli(argv[1:], cwd=tmp_path)
    assert rc == 0, (line, out, err)
    if argv[1] == "verify":
      assert out.splitlines()[-1].startswith("OK: "), (line, out)
    if "verify build/fedavg_tff" in line:  # every round of the process, by the user's names
      assert "round5/out[0]['w1']" in out and "[next rebuilt from MapReduceForm] all " in out, out
  assert (tmp_path / "build" / "fedavg_tff.inputs.npz").is_file()
  assert (tmp_path / "build" / "fedavg_round.html").is_file()
  written = {p.name for p in tmp_path.iterdir()}
  assert written == {"examples", "build"}, written  # nothing outside build/, which .gitignore covers

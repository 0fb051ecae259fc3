"""A target from outside the repository: a package written into a temporary folder and declared the
way Python plug-ins are (an entry point of group ``faxbridge.targets`` / ``faxbridge.runtimes`` in
a ``*.dist-info`` on the path), driven through ``faxbridge targets``, ``export`` and ``verify``
with no other edit.

The plug-in (``tinyjax``) is a real target: its exporter writes every piece of the split as a
``jax.export`` file and the form as a JSON plan; its runtime reads them back and runs the rounds
one client at a time with the form interpreter of ``faxbridge.extend``. A second runtime reading
the same target adds 1 to every float output: a runtime that computes something else, which verify
must catch (exit 1). It imports only ``faxbridge.extend`` (and jax, numpy), as an outside package
would.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faxbridge._src import registry
from faxbridge._src.export import read_manifest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TIMEOUT_S = 300

PLUGIN = {
    "tinyjax/__init__.py": '''
        """tinyjax: each piece as a jax.export file and the form as tiny_plan.json (a plug-in)."""
        from faxbridge.extend import Option, Runtime, Target

        TARGET = Target(
            "tinyjax", exporter="tinyjax.target:export",
            summary="each piece as a jax.export file and tiny_plan.json (a plug-in)",
            options=(Option("indent", int, 0, "indentation of tiny_plan.json (0: one line)"),),
            runtimes=("tinyjax",), steps=("tinyjax.piece",),
            versions="tinyjax.target:versions")
        RUNTIME = Runtime("tinyjax", runner="tinyjax.runtime:run",
                          summary="tiny_plan.json's pieces reloaded and run in this process")
        OFF_BY_ONE = Runtime("tinyjax-off", runner="tinyjax.runtime:run_off_by_one",
                             summary="the same, plus 1 on every float output (a broken runtime)",
                             reads=("tinyjax",), available="tinyjax.runtime:available")
        ''',
    "tinyjax/target.py": '''
        import json

        import jax
        from jax.extend import core as jcore

        from faxbridge.extend import emit, strip_locations


        def versions():
          return {"tinyjax": "0.1"}


        def export(split, out, indent):
          computations = {}
          for name, form in split.forms.items():
            def files(piece, name=name):
              emit("tinyjax.piece", f"{name}: writing {piece.name} as jax.export",
                   computation=name, piece=piece.name)
              specs = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in piece.inputs]
              fn = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr), keep_unused=True)
              rel = f"tiny/{name}/{piece.name}.jax"
              (out / rel).parent.mkdir(parents=True, exist_ok=True)
              (out / rel).write_bytes(strip_locations(jax.export.export(fn)(*specs)).serialize())
              return {"jax": rel}
            computations[name] = form.with_files(files).to_json()
          plan = {"kind": split.kind, "state": split.state, "computations": computations}
          (out / "tiny_plan.json").write_text(json.dumps(plan, indent=indent or None, sort_keys=True))
          return {"tiny_plan": "tiny_plan.json"}
        ''',
    "tinyjax/runtime.py": '''
        import json

        import jax
        import numpy as np

        from faxbridge.extend import (FederatedForm, PerClientBackend, RuntimeResult, interpret,
                                      number_of_clients, run_program)


        def available():
          return True, "this Python (a plug-in)"


        def run(export_dir, manifest, inputs, rounds, who="tinyjax"):
          plan = json.loads((export_dir / manifest["tiny_plan"]).read_text())
          forms = {n: FederatedForm.from_json(c, n) for n, c in plan["computations"].items()}
          loaded = {}

          def call(piece, args):
            rel = piece.files["jax"]
            if rel not in loaded:
              loaded[rel] = jax.export.deserialize(bytearray((export_dir / rel).read_bytes()))
            return [np.asarray(x) for x in loaded[rel].call(*args)]

          def run_one(name, named):
            form = forms[name]
            backend = PerClientBackend(number_of_clients(form, named), call)
            return interpret(form, backend, backend.inputs(form, named))

          outputs = run_program(plan["kind"], run_one, inputs, rounds, plan["state"], who=who)
          return RuntimeResult(outputs, info={"tiny_pieces": len(loaded)})


        def run_off_by_one(export_dir, manifest, inputs, rounds):
          result = run(export_dir, manifest, inputs, rounds, who="tinyjax-off")
          return RuntimeResult({k: v + 1 if v.dtype.kind == "f" else v
                                for k, v in result.outputs.items()})
        ''',
    "tinyjax-0.1.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: tinyjax
        Version: 0.1
        """,
    "tinyjax-0.1.dist-info/entry_points.txt": """
        [faxbridge.targets]
        tinyjax = tinyjax:TARGET
        broken = tinyjax_is_not_here:TARGET

        [faxbridge.runtimes]
        tinyjax = tinyjax:RUNTIME
        tinyjax-off = tinyjax:OFF_BY_ONE
        """,
}

# A small iterative process, imported relative to the working directory as users' programs are.
PROGRAMS = {
    "tiny_programs.py": '''
        import jax.numpy as jnp
        import numpy as np

        import faxbridge as fb


        @fb.computation()
        def initialize():
          return {"w": jnp.zeros((2,), jnp.float32), "steps": jnp.int32(0)}


        @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
        def step(state, data):
          delta = fb.mean(fb.map(lambda w, x: jnp.mean(x, axis=0) - w, fb.broadcast(state["w"]),
                                 data))
          new = {"w": state["w"] + 0.5 * delta, "steps": state["steps"] + 1}
          return new, {"change": jnp.sum(delta * delta)}


        process = fb.IterativeProcess(initialize, step)


        def example_inputs():
          data = np.random.default_rng(3).normal(size=(4, 5, 2)).astype(np.float32)
          return process.initialize(), data
        ''',
}


def write(folder: Path, files: dict[str, str]) -> Path:
  """``files`` (relative path -> text) in ``folder``."""
  for rel, text in files.items():
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
  return folder


def _folders(tmp: Path) -> tuple[Path, Path]:
  """The plug-in's folder (put on ``PYTHONPATH`` to install it) and the working directory holding
  the program (not on any path the plug-in's entry points could be found from)."""
  return write(tmp / "site", PLUGIN), write(tmp / "work", PROGRAMS)


def _env(plugin: Path | None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "PYTHONPATH")}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([str(plugin)] if plugin else [])])
  return env


def _cli(args: list, cwd: Path, plugin: Path | None) -> tuple[int, str, str]:
  if args[0] == "--progress":  # on a terminal: a pseudo-terminal as stderr
    from test_cli import _with_terminal_stderr

    return _with_terminal_stderr(args[1:], cwd, {"PYTHONPATH": _env(plugin)["PYTHONPATH"]})
  proc = subprocess.run([sys.executable, "-m", "faxbridge", *map(str, args)], cwd=cwd,
                        env=_env(plugin), capture_output=True, text=True, timeout=TIMEOUT_S)
  return proc.returncode, proc.stdout, proc.stderr


# One interpreter runs a list of commands through faxbridge._src.cli.main as `python -m faxbridge`
# would, in order (an export, then its verification): a fresh interpreter per command imports JAX
# each time, which the quick suite cannot afford; the slow test runs each as its own process. A
# command led by "--progress" runs with a stderr that says it is a terminal.
DRIVER = """
import contextlib, io, json, os, sys, traceback
from faxbridge._src.cli import main

class Terminal(io.StringIO):  # for `--progress`: a stderr that says it is a terminal
  def isatty(self):
    return True

results = []
for argv in json.loads(sys.argv[1]):
  terminal = argv[0] == "--progress"
  argv = argv[1:] if terminal else argv
  out, err = io.StringIO(), Terminal() if terminal else io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main(argv)
    except SystemExit as e:
      rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      rc = 1
  results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _drive(commands: list[list], cwd: Path, plugin: Path | None) -> list[tuple[int, str, str]]:
  argvs = [[str(a) for a in argv] for argv in commands]
  proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=cwd,
                        env=_env(plugin), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr
  return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


def _commands(tmp: Path) -> dict[str, list]:
  out = tmp / "out"
  return {
      "targets": ["targets"],
      "export": ["--progress", "export", "tiny_programs:process", "--target=tinyjax", "--indent",
                 "2", "-o", out, "--save-inputs"],
      "verify": ["verify", out, "--runtime=tinyjax", "--rounds", "3"],
      "verify-default-runtime": ["verify", out, "--rounds", "2"],
      "verify-off-by-one": ["verify", out, "--runtime=tinyjax-off", "--rounds", "2"],
      "option-of-another-target": ["export", "tiny_programs:process", "--target=tinyjax",
                                   "--local", "xla", "-o", tmp / "other"],
      "option-wrong-type": ["export", "tiny_programs:process", "--target=tinyjax", "--indent",
                            "two", "-o", tmp / "other"],
      "broken-target": ["export", "tiny_programs:process", "--target=broken", "-o", tmp / "other"],
  }


def _check(tmp: Path, runs: dict[str, tuple[int, str, str]]) -> None:
  rc, out, err = runs["targets"]
  assert rc == 0, err
  block = out.split("tinyjax: ", 1)[1].split("\n\n", 1)[0]
  assert block.startswith("each piece as a jax.export file and tiny_plan.json (a plug-in)")
  assert "  option  --indent (default 0): indentation of tiny_plan.json" in block
  assert "  runtime tinyjax " in block and "  runtime tinyjax-off " in block
  assert "installed  this Python (a plug-in)" in block
  assert "broken plug-in faxbridge.targets/broken: entry point broken = tinyjax_is_not_here" in out
  # the built-in pairs of this process's registry, and the plug-in's two
  pairs = len({(t, r.name) for t in registry.targets() for r in registry.readers(t)}) + 2
  assert out.splitlines()[-1].startswith(f"{pairs} of {pairs} target/runtime pairs") or "MISSING" in out

  rc, out, err = runs["export"]
  assert rc == 0, err
  export = tmp / "out"
  # Its steps (declared in Target.steps), between the core's, as the CLI prints them.
  steps = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")]
  assert steps == ["importing tiny_programs:process", "loading the tinyjax exporter",
                   "tracing and splitting step",
                   "initialize: writing server_result as jax.export",
                   "next: writing stage0_server_prepare as jax.export",
                   "next: writing stage0_client_work as jax.export",
                   "next: writing server_result as jax.export",
                   "serializing the native reference"], err
  manifest = read_manifest(export)
  assert manifest["target"] == "tinyjax" and manifest["kind"] == "iterative_process"
  assert set(manifest["versions"]) == {"faxbridge", "jax", "tinyjax"}
  pieces = sorted(p.relative_to(export).as_posix() for p in (export / "tiny").rglob("*.jax"))
  assert pieces and {p.split("/")[1] for p in pieces} == {"initialize", "next"}
  assert (export / "tiny_plan.json").read_text().startswith('{\n  "computations"')  # --indent 2
  assert json.loads((export / "tiny_plan.json").read_text())["state"] == manifest["state"]

  rc, out, err = runs["verify"]
  assert rc == 0, (out, err)
  assert out.splitlines()[-1].startswith("OK: ") and " on tinyjax " in out.splitlines()[-1]
  assert "round3/" in out  # every round of the process was compared
  rc, out, err = runs["verify-default-runtime"]
  assert rc == 0 and " on tinyjax " in out.splitlines()[-1], (out, err)

  rc, out, err = runs["verify-off-by-one"]
  assert rc == 1, (out, err)
  assert out.splitlines()[-1].startswith("MISMATCH: ") and "on tinyjax-off" in out, out
  assert err == ""

  for case, says in [("option-of-another-target", "target 'tinyjax' has no option 'local' (its "
                      "options are indent)"),
                     ("option-wrong-type", "argument --indent: invalid int value: 'two'"),
                     ("broken-target", "invalid choice: 'broken'")]:
    rc, out, err = runs[case]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, (case, err)
    assert "Traceback" not in err and "KeyError" not in err
  assert not (tmp / "other").exists()


def _check_without_plugin(tmp: Path, runs: list[tuple[int, str, str]]) -> None:
  """The same export with the plug-in gone: the target and its runtimes are unknown; each command
  is one line and exit 2 (no KeyError, no traceback)."""
  says = ["no registered runtime reads exports of target 'tinyjax'",
          "argument --runtime: invalid choice: 'tinyjax'",
          "argument --target: invalid choice: 'tinyjax'"]
  assert len(runs) == len(says)
  for (rc, out, err), said in zip(runs, says):
    assert rc == 2 and out == "" and said in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _without_plugin(tmp: Path) -> list[list]:
  return [["verify", tmp / "out"], ["verify", tmp / "out", "--runtime=tinyjax"],
          ["export", "tiny_programs:process", "--target=tinyjax", "-o", tmp / "other"]]


def test_a_target_from_an_entry_point_exports_and_verifies_through_the_cli(tmp_path):
  plugin, work = _folders(tmp_path)
  commands = _commands(tmp_path)
  runs = dict(zip(commands, _drive(list(commands.values()), work, plugin)))
  _check(tmp_path, runs)
  # Without the plug-in (in a fresh interpreter: entry points are read once a process), see the
  # slow test below; tests/test_cli.py's usage errors cover unknown targets and runtimes.


@pytest.mark.slow
def test_a_target_from_an_entry_point_through_fresh_interpreters(tmp_path):
  """The same, each command as its own ``python -m faxbridge`` (entry points read anew)."""
  plugin, work = _folders(tmp_path)
  runs = {name: _cli(argv, work, plugin) for name, argv in _commands(tmp_path).items()}
  _check(tmp_path, runs)
  _check_without_plugin(tmp_path, [_cli(argv, work, None) for argv in _without_plugin(tmp_path)])


# --- the core names no target --------------------------------------------------------------------
BUILT_IN = re.compile(r"\b(tff|stablehlo|tflite|iree|litert|flower)\b", re.IGNORECASE)


def test_the_cli_and_the_registry_name_no_target_or_runtime():
  for rel in ("faxbridge/_src/cli.py", "faxbridge/_src/registry.py"):
    text = (REPO / rel).read_text()
    found = sorted({m.group(0) for m in BUILT_IN.finditer(text)})
    found += re.findall(r"""["']jax["']""", text)  # the runtime's name (jax itself is imported)
    assert not found, (rel, found)


def _docstrings(tree: ast.AST) -> set[int]:
  return {id(node.body[0].value) for node in ast.walk(tree)
          if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
          and node.body and isinstance(node.body[0], ast.Expr)
          and isinstance(node.body[0].value, ast.Constant)}


def test_no_string_of_the_core_names_a_target():
  """Outside docstrings (which may say what the built-in targets are), no string in faxbridge/
  names a target or runtime: the core reads them from the registry."""
  found = []
  for path in sorted((REPO / "faxbridge").rglob("*.py")):
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found += [f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs and BUILT_IN.search(node.value)]
  assert not found, found

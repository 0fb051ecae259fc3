"""The ``faxbridge`` command: inspect, export and verify federated computations.

A program is named ``MODULE:ATTR`` (an ``fb.computation`` or ``fb.IterativeProcess``); its example
inputs come from ``MODULE.example_inputs()`` (or ``--example-inputs NAME``), which returns the
computation's positional arguments. For an iterative process the arguments of ``next`` after the
state are used.

  faxbridge inspect examples.fedavg:computation
  faxbridge export examples.fedavg:process --target=tff -o build/fedavg_tff
  faxbridge verify build/fedavg_tff --runtime=tff --inputs build/fedavg_tff.inputs.npz
  faxbridge demo

Exit codes: 0 success; 1 a verification ran and some output differs (the report says which);
2 a usage error or an export/inputs that cannot be verified (one line on stderr, nothing compared).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge import registry
from faxbridge.errors import FaxbridgeError


class UsageError(Exception):
  """A mistake on the command line (a name that does not resolve, a file that is not there): one
  line on stderr and exit code 2, never a traceback."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # type: ignore[override]
    # One line (argparse prints its whole usage block first); the usage is one -h away.
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _at_least_one(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def _load(spec: str, inputs_fn: str) -> tuple[Any, tuple]:
  from faxbridge.computation import Computation
  from faxbridge.iterative import IterativeProcess

  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise UsageError(f"expected MODULE:ATTR (e.g. examples.fedavg:process), got {spec!r}")
  sys.path.insert(0, os.getcwd())  # programs are named relative to where the command runs
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    # Only the named module (or a package above it) missing is a usage error; a module that fails
    # to import something of its own is the program's bug, and its traceback says where.
    if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
      raise
    raise UsageError(f"no module named {e.name!r} (from {spec!r}, imported relative to "
                     f"{os.getcwd()})") from None
  try:
    program = getattr(module, attr)
  except AttributeError:
    raise UsageError(f"module {module_name!r} ({module.__file__}) has no attribute {attr!r}") \
        from None
  if not isinstance(program, Computation | IterativeProcess):
    raise UsageError(f"{spec} is of type {type(program).__name__}, not an fb.computation or "
                     "fb.IterativeProcess")
  make_inputs = getattr(module, inputs_fn, None)
  if not callable(make_inputs):
    raise UsageError(f"module {module_name!r} has no {inputs_fn}() giving example inputs "
                     "(or name another with --example-inputs)")
  args = make_inputs()
  if not isinstance(args, tuple | list):
    raise UsageError(f"{module_name}.{inputs_fn}() returned a {type(args).__name__}; it must "
                     "return the positional arguments as a tuple")
  args = tuple(args)
  if isinstance(program, IterativeProcess):
    args = args[1:]
  return program, args


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``--inputs`` file by name (no pickles), or a UsageError saying why not."""
  if not Path(path).is_file():
    raise UsageError(f"--inputs {path}: no such file")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    # numpy's own message guesses (a text file "contains pickled data"): say what is expected.
    raise UsageError(f"--inputs {path} is not an .npz file (write one with np.savez(path, "
                     "name=array, ...) or faxbridge export --save-inputs)") from None
  if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file loads as one unnamed array
    raise UsageError(f"--inputs {path} is a single .npy array, not an .npz of arrays by name "
                     "(write it with np.savez(path, name=array, ...))")
  with data:
    try:
      return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise UsageError(f"--inputs {path}: cannot read its arrays ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _save_inputs(path: Path, out_dir: Path, args: tuple) -> None:
  import jax

  from faxbridge.export import read_manifest
  from faxbridge.verify import _blocks

  block, _ = _blocks(read_manifest(out_dir))
  leaves = jax.tree.leaves(args)
  # A Python scalar is typed as the export typed it (weakly), not as numpy's float64/int64.
  np.savez(path, **{s["name"]: np.asarray(v) if hasattr(v, "dtype") else
                    np.asarray(v, dtype=np.dtype(s["dtype"]))
                    for s, v in zip(block["inputs"], leaves)})


def cmd_export(ns: argparse.Namespace) -> int:
  import faxbridge as fb

  # Before the program is imported and traced: the cheap mistakes first.
  if Path(ns.output).exists() and not ns.force:
    raise UsageError(f"{ns.output} exists; pass --force to replace it")
  program, args = _load(ns.program, ns.example_inputs)
  options = {}
  if ns.local:
    options["local"] = ns.local
  if ns.stablehlo_version:
    options["stablehlo_version"] = ns.stablehlo_version
  if ns.lowering:
    options["lowering"] = ns.lowering
  start = time.perf_counter()
  out = fb.export(program, *args, target=ns.target, out_dir=ns.output, force=ns.force, **options)
  print(f"exported {ns.program} to {out} ({ns.target}) in {time.perf_counter() - start:.2f} s")
  if ns.save_inputs:
    _save_inputs(Path(ns.save_inputs), out, args)
    print(f"example inputs written to {ns.save_inputs}")
  return 0


def cmd_verify(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge.verify import read_export_manifest

  read_export_manifest(Path(ns.dir))  # no directory, no manifest, not JSON: one line, exit 2
  inputs = _read_npz(ns.inputs)
  report = fb.verify(ns.dir, runtime=ns.runtime, inputs=inputs, rounds=ns.rounds)
  print(report)
  return 0 if report.ok else 1


def cmd_inspect(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge.iterative import IterativeProcess

  program, args = _load(ns.program, ns.example_inputs)
  comp = program.next if isinstance(program, IterativeProcess) else program
  if isinstance(program, IterativeProcess):
    args = (program.state_spec(), *args)
  print(comp.trace(*args).pretty())
  form = fb.split(comp, *args)
  print(f"\n{len(form.stages)} stage(s); clients={form.clients}")
  for stage, traffic in zip(form.stages, form.bytes_per_client()):
    kinds = ", ".join(sorted({a.kind for a in stage.aggregations}))
    print(f"  stage {stage.index}: broadcast {len(stage.broadcasts)} tensors, upload "
          f"{len(stage.uploads)} ({kinds}); per client {traffic['download']} B down, "
          f"{traffic['upload']} B up")
  return 0


def cmd_demo(ns: argparse.Namespace) -> int:
  """The main job on the bundled default example: FedAvg exported to TFF and proven on TFF 0.87."""
  import faxbridge as fb
  from examples import fedavg

  out = Path(ns.output or tempfile.mkdtemp(prefix="faxbridge-demo-")) / "fedavg_tff"
  _, data = fedavg.example_inputs()
  start = time.perf_counter()
  fb.export(fedavg.process, data, target="tff", out_dir=out, force=True)
  print(f"exported examples.fedavg:process to {out} in {time.perf_counter() - start:.1f} s:")
  for path in sorted(out.rglob("*")):
    if path.is_file():
      print(f"  {path.relative_to(out)}  ({path.stat().st_size} bytes)")
  print(f"\nrunning {ns.rounds} rounds on TFF 0.87 and natively...")
  report = fb.verify(out, data, runtime="tff", rounds=ns.rounds)
  print(report)
  return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
  """Run the command; the exit code is 0 on success, 1 when a verification ran and outputs differ,
  2 for a usage error or a faxbridge error (one line on stderr; nothing verified)."""
  parser = _Parser(prog="faxbridge", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("export", help="export a program for a target")
  p.add_argument("program", help="MODULE:ATTR of an fb.computation or fb.IterativeProcess")
  p.add_argument("--target", default="tff", choices=sorted(registry.TARGETS))
  p.add_argument("-o", "--output", required=True, help="the export directory to create")
  p.add_argument("--force", action="store_true", help="replace an existing directory")
  p.add_argument("--local", choices=["tensorflow", "xla"], help="tff: form of local computations")
  p.add_argument("--stablehlo-version", help="stablehlo: version of the portable artifacts")
  p.add_argument("--lowering", choices=["tf", "jax2tf"], help="tflite: how pieces reach TF")
  p.add_argument("--example-inputs", default="example_inputs", help="function giving the inputs")
  p.add_argument("--save-inputs", help="also write the example inputs, by name, to this .npz")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("verify", help="run an export on a runtime and natively, and compare")
  p.add_argument("dir")
  p.add_argument("--runtime", default="tff", choices=sorted(registry.RUNTIMES))
  p.add_argument("--inputs", required=True, help=".npz of the inputs by manifest name")
  p.add_argument("--rounds", type=_at_least_one, default=5, help="rounds of an iterative process")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("inspect", help="print the traced program with placements and its stages")
  p.add_argument("program")
  p.add_argument("--example-inputs", default="example_inputs")
  p.set_defaults(fn=cmd_inspect)

  p = sub.add_parser("demo", help="export the bundled FedAvg to TFF and verify it on TFF 0.87")
  p.add_argument("-o", "--output", help="where to write (default: a temporary folder)")
  p.add_argument("--rounds", type=_at_least_one, default=5)
  p.set_defaults(fn=cmd_demo)

  ns = parser.parse_args(argv)
  try:
    return ns.fn(ns)
  except UsageError as e:
    print(f"faxbridge {ns.command}: error: {e}", file=sys.stderr)
    return 2
  except FaxbridgeError as e:
    print(f"faxbridge {ns.command}: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

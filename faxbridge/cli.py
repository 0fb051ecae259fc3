"""The ``faxbridge`` command: inspect, export and verify federated computations.

A program is named ``MODULE:ATTR`` (an ``fb.computation`` or ``fb.IterativeProcess``); its example
inputs come from ``MODULE.example_inputs()`` (or ``--example-inputs NAME``), which returns the
computation's positional arguments. For an iterative process the arguments of ``next`` after the
state are used.

  faxbridge inspect examples.fedavg:computation
  faxbridge export examples.fedavg:process --target=tff -o build/fedavg_tff
  faxbridge verify build/fedavg_tff --runtime=tff --inputs build/fedavg_tff.inputs.npz
  faxbridge demo
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge.errors import FaxbridgeError


def _load(spec: str, inputs_fn: str) -> tuple[Any, tuple]:
  from faxbridge.iterative import IterativeProcess

  if ":" not in spec:
    raise SystemExit(f"faxbridge: expected MODULE:ATTR, got {spec!r}")
  module_name, attr = spec.split(":", 1)
  sys.path.insert(0, os.getcwd())  # programs are named relative to where the command runs
  module = importlib.import_module(module_name)
  program = getattr(module, attr)
  make_inputs = getattr(module, inputs_fn, None)
  if make_inputs is None:
    raise SystemExit(f"faxbridge: {module_name} has no {inputs_fn}() giving example inputs")
  args = tuple(make_inputs())
  if isinstance(program, IterativeProcess):
    args = args[1:]
  return program, args


def _save_inputs(path: Path, out_dir: Path, args: tuple) -> None:
  import jax

  from faxbridge.export import read_manifest
  from faxbridge.verify import _blocks

  block, _ = _blocks(read_manifest(out_dir))
  leaves = jax.tree.leaves(args)
  np.savez(path, **{s["name"]: np.asarray(v) for s, v in zip(block["inputs"], leaves)})


def cmd_export(ns) -> int:
  import faxbridge as fb

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


def cmd_verify(ns) -> int:
  import faxbridge as fb

  data = np.load(ns.inputs, allow_pickle=False)
  report = fb.verify(ns.dir, runtime=ns.runtime, inputs={k: data[k] for k in data.files},
                     rounds=ns.rounds)
  print(report)
  return 0 if report.ok else 1


def cmd_inspect(ns) -> int:
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


def cmd_demo(ns) -> int:
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
  parser = argparse.ArgumentParser(prog="faxbridge", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("export", help="export a program for a target")
  p.add_argument("program", help="MODULE:ATTR of an fb.computation or fb.IterativeProcess")
  p.add_argument("--target", default="tff", choices=["tff", "stablehlo", "tflite"])
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
  p.add_argument("--runtime", default="tff", choices=["tff", "iree", "litert", "jax"])
  p.add_argument("--inputs", required=True, help=".npz of the inputs by manifest name")
  p.add_argument("--rounds", type=int, default=5, help="rounds of an iterative process")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("inspect", help="print the traced program with placements and its stages")
  p.add_argument("program")
  p.add_argument("--example-inputs", default="example_inputs")
  p.set_defaults(fn=cmd_inspect)

  p = sub.add_parser("demo", help="export the bundled FedAvg to TFF and verify it on TFF 0.87")
  p.add_argument("-o", "--output", help="where to write (default: a temporary folder)")
  p.add_argument("--rounds", type=int, default=5)
  p.set_defaults(fn=cmd_demo)

  ns = parser.parse_args(argv)
  try:
    return ns.fn(ns)
  except FaxbridgeError as e:
    print(f"faxbridge: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

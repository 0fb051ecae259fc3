"""The ``faxbridge`` command: inspect, export and verify federated computations.

A program is named ``MODULE:ATTR`` (an ``fb.computation`` or ``fb.IterativeProcess``), imported
relative to the working directory; its example inputs come from ``MODULE.example_inputs()`` (or
``--example-inputs NAME``), which returns the computation's positional arguments. For an iterative
process the arguments of ``next`` after the state are used.

examples (from the repository root):
  faxbridge targets
  faxbridge inspect examples.fedavg:computation --html fedavg_round.html
  faxbridge export examples.fedavg:process --target=tff -o build/fedavg_tff --save-inputs --force
  faxbridge verify build/fedavg_tff --runtime=tff
  faxbridge export examples.two_stage:computation --target=stablehlo -o build/two_stage --force
  faxbridge verify build/two_stage --runtime=iree --program examples.two_stage:computation

``--save-inputs`` with no file writes DIR.inputs.npz beside the export DIR; ``verify DIR`` reads it
when neither ``--inputs`` nor ``--program`` is given.

Exit codes: 0 success; 1 a verification ran and some output differs (the table says which);
2 a usage error or an export/inputs that cannot be verified (one line on stderr, nothing compared).
Progress goes to stderr when it is a terminal; results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge._src import registry
from faxbridge._src.errors import FaxbridgeError


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
  from faxbridge._src.computation import Computation
  from faxbridge._src.iterative import IterativeProcess

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

  from faxbridge._src.export import read_manifest
  from faxbridge._src.verify import _blocks

  block, _ = _blocks(read_manifest(out_dir))
  leaves = jax.tree.leaves(args)
  # A Python scalar is typed as the export typed it (weakly), not as numpy's float64/int64.
  np.savez(path, **{s["name"]: np.asarray(v) if hasattr(v, "dtype") else
                    np.asarray(v, dtype=np.dtype(s["dtype"]))
                    for s, v in zip(block["inputs"], leaves)})


# --- progress and quiet native logs --------------------------------------------------------------
class Progress:
  """Steps of a long command on stderr, each with the seconds since the command started; silent
  unless stderr is a terminal (pipes, CI logs and tests see only the results on stdout)."""

  def __init__(self, enabled: bool):
    self.enabled, self.start = enabled, time.perf_counter()

  def __call__(self, message: str) -> None:
    if self.enabled:
      print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

  def watch(self, module: str, attr: str, label: Callable[..., str]
            ) -> contextlib.AbstractContextManager:
    """While inside, announce each call of ``module.attr`` with ``label(*its arguments)``."""

    def wrap(original):
      @functools.wraps(original)
      def announced(*args, **kwargs):
        with contextlib.suppress(Exception):  # a label that cannot be made is no reason to fail
          self(label(*args, **kwargs))
        return original(*args, **kwargs)
      return announced

    return self._replace(module, attr, wrap)

  def rounds(self, module: str, who: str) -> contextlib.AbstractContextManager:
    """Announce each round of ``run_program`` as imported by ``module`` (plan runtimes, native)."""

    def wrap(run_program):
      @functools.wraps(run_program)
      def counted(kind, run, *rest, **kwargs):
        # run_program(kind, run, inputs, rounds, ...): only `run` is wrapped, the rest passed on.
        rounds = rest[1] if len(rest) > 1 else kwargs.get("rounds", "?")
        done = {"next": 0}

        def run_one(name, *args, **kw):
          if name == "next":
            done["next"] += 1
            self(f"{who}: round {done['next']} of {rounds}")
          else:
            self(f"{who}: {name}")
          return run(name, *args, **kw)

        return run_program(kind, run_one, *rest, **kwargs)
      return counted

    return self._replace(module, "run_program", wrap)

  @contextlib.contextmanager
  def _replace(self, module: str, attr: str, wrap: Callable) -> Iterator[None]:
    """``module.attr`` replaced by ``wrap(it)`` while inside. Functions are looked up in their
    module's globals at call time, so this reaches every caller there: the library has no
    progress hooks of its own, and this keeps the CLI's reporting out of export and verify. A name
    that has moved is skipped (progress is a courtesy, never a reason to fail); nothing is replaced
    when progress is off, so pipes and tests run the library untouched."""
    if not self.enabled:
      yield
      return
    try:
      mod = importlib.import_module(module)
      original = getattr(mod, attr)
    except (ImportError, AttributeError):
      yield
      return
    setattr(mod, attr, wrap(original))
    try:
      yield
    finally:
      setattr(mod, attr, original)


@contextlib.contextmanager
def _native_logs_hidden(hide: bool) -> Iterator[None]:
  """TensorFlow, TFLite and absl write their C++ logs (oneDNN notices, "Ignored output_format",
  "All log messages before absl::InitializeLog()") straight to file descriptor 2, ignoring
  TF_CPP_MIN_LOG_LEVEL in TF 2.21. While inside, descriptor 2 goes to a scratch file and Python's
  sys.stderr (progress, errors, tracebacks) to a copy of the real one; a crash shows the captured
  log after its traceback so nothing is lost. ``--verbose`` leaves everything as it is."""
  if not hide:
    yield
    return
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no descriptor 2 at all (a daemon): nothing to hide it from
    yield
    return
  scratch = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
  os.dup2(scratch.fileno(), 2)
  python_stderr = sys.stderr
  swapped = False
  with contextlib.suppress(AttributeError, OSError, ValueError):
    # A StringIO (tests, an embedding program) has no descriptor: it is left alone.
    swapped = python_stderr.fileno() == 2
  if swapped:
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
  try:
    yield
  except BaseException as e:
    if not isinstance(e, UsageError | FaxbridgeError | SystemExit | KeyboardInterrupt):
      scratch.seek(0)
      captured = scratch.read().decode(errors="replace").strip()
      if captured:
        print(f"native log before the error:\n{captured[-4000:]}", file=sys.stderr)
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    scratch.close()
    if swapped:
      sys.stderr.close()
      sys.stderr = python_stderr


def _quiet_python_logs() -> None:
  """TensorFlow's and absl's Python-side warnings; set before TensorFlow is imported."""
  import logging

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging
  except ImportError:
    return
  absl_logging.set_verbosity(absl_logging.ERROR)


# --- commands -------------------------------------------------------------------------------------
def _sidecar(export_dir: str | os.PathLike) -> Path:
  """Where ``--save-inputs`` (no file given) writes the inputs and ``verify`` looks for them:
  beside the export, because every file inside it is pinned by the manifest's sha256s."""
  return Path(str(Path(export_dir)).rstrip("/") + ".inputs.npz")


_TARGET_STEPS = {  # module, function, what one call of it means (one per piece)
    "stablehlo": ("faxbridge.converters.stablehlo.export", "export_piece",
                  lambda piece, *a, **k: f"lowering {piece.name} to StableHLO"),
    "tflite": ("faxbridge.converters.tflite.export", "convert_piece",
               lambda piece, *a, **k: f"converting {piece.name} to TFLite"),
    "tff": ("faxbridge.converters.tff.local", "local_computation",
            lambda piece, *a, **k: f"lowering {piece.name} to a TF local computation"),
}


def cmd_export(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge._src import render

  # Before the program is imported and traced: the cheap mistakes first.
  if Path(ns.output).exists() and not ns.force:
    raise UsageError(f"{ns.output} exists; pass --force to replace it")
  progress = ns.progress
  progress(f"importing {ns.program}")
  program, args = _load(ns.program, ns.example_inputs)
  options = {}
  if ns.local:
    options["local"] = ns.local
  if ns.stablehlo_version:
    options["stablehlo_version"] = ns.stablehlo_version
  if ns.lowering:
    options["lowering"] = ns.lowering
  start = time.perf_counter()
  progress(f"loading the {ns.target} exporter")
  registry.TARGETS[ns.target].load()
  if ns.target == "tflite" or (ns.target == "tff" and ns.local != "xla"):
    # These lower through TensorFlow, whose import (seconds) would otherwise be billed to the
    # first piece's step.
    progress("importing TensorFlow")
    import tensorflow  # noqa: F401
  with contextlib.ExitStack() as stack:
    stack.enter_context(progress.watch(
        "faxbridge._src.export", "split_program",
        lambda p, *a, **k: f"tracing and splitting {getattr(p, '__name__', p)}"))
    stack.enter_context(progress.watch(*_TARGET_STEPS[ns.target]))
    stack.enter_context(progress.watch(
        "faxbridge._src.export", "_native", lambda *a, **k: "serializing the native reference"))
    out = fb.export(program, *args, target=ns.target, out_dir=ns.output, force=ns.force,
                    **options)
  seconds = time.perf_counter() - start
  print(f"exported {ns.program} to {out} ({ns.target}) in {seconds:.1f} s\n")
  print(render.files_summary(out))
  if ns.save_inputs is not None:
    path = Path(ns.save_inputs) if ns.save_inputs else _sidecar(out)
    _save_inputs(path, out, args)
    print(f"\nexample inputs: {path} ({render.size_text(path.stat().st_size)})")
  return 0


def cmd_verify(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge._src import render
  from faxbridge._src.verify import read_export_manifest

  progress = ns.progress
  export_dir = Path(ns.dir)
  manifest = read_export_manifest(export_dir)  # no dir, no manifest, not JSON: one line, exit 2
  args: tuple = ()
  inputs = None
  if ns.inputs and ns.program:
    raise UsageError("give --inputs FILE or --program MODULE:ATTR, not both")
  if ns.inputs:
    inputs = _read_npz(ns.inputs)
  elif ns.program:
    progress(f"importing {ns.program} for its example inputs")
    _, args = _load(ns.program, ns.example_inputs)
  elif _sidecar(export_dir).is_file():
    inputs = _read_npz(str(_sidecar(export_dir)))
  else:
    raise UsageError(f"no inputs: pass --inputs FILE.npz or --program MODULE:ATTR (its example "
                     f"inputs), or export with --save-inputs to write {_sidecar(export_dir)}")
  entry = registry.RUNTIMES[ns.runtime]
  progress(f"loading runtime {ns.runtime}")
  with contextlib.suppress(ImportError):  # a missing runtime is reported by verify, as usual
    entry.load()
  start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    stack.enter_context(progress.watch(
        "faxbridge._src.verify", "check_files",
        lambda d, m: f"checking {len(m.get('files', {}))} files against the manifest's sha256"))
    stack.enter_context(progress.watch(
        "faxbridge._src.verify", "_check_native_shapes", lambda *a: f"running on {ns.runtime}"))
    stack.enter_context(progress.watch(
        "faxbridge.converters.runtimes.tff.client", "invoke",
        lambda *a, **k: "starting TFF 0.87 in .venv-tff (rounds run there)"))
    stack.enter_context(progress.rounds("faxbridge.converters.plan", ns.runtime))
    stack.enter_context(progress.watch(
        "faxbridge._src.verify", "native_outputs", lambda *a, **k: "running natively (XLA)"))
    stack.enter_context(progress.rounds("faxbridge._src.verify", "native"))
    report = fb.verify(export_dir, *args, runtime=ns.runtime, inputs=inputs, rounds=ns.rounds)
  seconds = time.perf_counter() - start
  labels = render.output_labels(manifest)
  print(f"{report.export_dir} on {report.runtime}\n")
  print(render.verify_table(report, labels))
  print(f"\n{render.verdict(report, seconds, labels)}")
  return 0 if report.ok else 1


def _forms(program: Any, args: tuple) -> dict:
  """The federated forms of a program, as export splits it: ``computation``, or ``initialize``
  and ``next``."""
  from faxbridge._src.export import split_program

  return split_program(program, args).forms


def cmd_inspect(ns: argparse.Namespace) -> int:
  from faxbridge._src import drawing, render
  from faxbridge._src.iterative import IterativeProcess

  progress = ns.progress
  progress(f"importing {ns.program}")
  program, args = _load(ns.program, ns.example_inputs)
  progress("tracing and splitting")
  forms = _forms(program, args)
  if ns.jaxpr:
    comp = program.next if isinstance(program, IterativeProcess) else program
    full = (program.state_spec(), *args) if isinstance(program, IterativeProcess) else args
    traced = comp.trace(*full)
    form = forms["next" if isinstance(program, IterativeProcess) else "computation"]
    print(f"{traced.pretty()}\n{render.jaxpr_legend(traced, form)}\n")
  print("\n\n".join(render.form_text(form, f"{ns.program} {name}" if len(forms) > 1
                                      else ns.program) for name, form in forms.items()))
  if ns.html:
    Path(ns.html).write_text(drawing.round_html(forms, f"faxbridge inspect {ns.program}"))
    print(f"\nthe round drawn: {ns.html}")
  return 0


# What each runtime imports in this Python (tff runs in its own environment; jax needs nothing more).
_RUNTIME_MODULES = {"iree": ("iree.compiler", "iree.runtime"), "litert": ("ai_edge_litert",)}


def _installed(runtime: str) -> tuple[bool, str]:
  """Whether ``runtime`` can run here, and where it runs or what is missing."""
  if runtime == "tff":
    from faxbridge._src.errors import VerificationError
    from faxbridge.converters.runtimes.tff.launch import tff_python

    try:
      return True, str(tff_python())
    except VerificationError as e:
      return False, str(e).split(". ")[0]
  modules = _RUNTIME_MODULES.get(runtime, ())
  missing = []
  for m in modules:
    try:
      found = importlib.util.find_spec(m) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      missing.append(m)
  if missing:
    return False, f"{', '.join(missing)} not importable"
  return True, f"{', '.join(modules)} in this Python" if modules else "this Python (jax.export)"


def cmd_targets(ns: argparse.Namespace) -> int:
  rows = []
  for name, target in registry.TARGETS.items():
    readers = [r for r in registry.RUNTIMES.values() if name in r.reads]
    print(f"{name}: {target.summary}")
    for runtime in readers:
      ok, where = _installed(runtime.name)
      how = "" if ok else f"; install: {runtime.needs or 'pip install -e . (the core environment)'}"
      print(f"  runtime {runtime.name:7s} {'installed' if ok else 'MISSING  '}  {where}{how}")
      rows.append(ok)
    print()
  print(f"{sum(rows)} of {len(rows)} target/runtime pairs can verify here; "
        "`faxbridge verify DIR --runtime=NAME` runs one")
  return 0


def cmd_demo(ns: argparse.Namespace) -> int:
  """The main job on the bundled default example: FedAvg exported to TFF and proven on TFF 0.87."""
  import faxbridge as fb
  from examples import fedavg
  from faxbridge._src import render
  from faxbridge._src.export import read_manifest

  progress = ns.progress
  out = Path(ns.output or tempfile.mkdtemp(prefix="faxbridge-demo-")) / "fedavg_tff"
  _, data = fedavg.example_inputs()
  start = time.perf_counter()
  progress("loading the tff exporter and TensorFlow")
  registry.TARGETS["tff"].load()
  import tensorflow  # noqa: F401  (its import is seconds: a step of its own, not the first piece's)
  with progress.watch(*_TARGET_STEPS["tff"]):
    fb.export(fedavg.process, data, target="tff", out_dir=out, force=True)
  print(f"exported examples.fedavg:process to {out} in {time.perf_counter() - start:.1f} s\n")
  print(render.files_summary(out))
  print(f"\nrunning {ns.rounds} rounds on TFF 0.87 and natively...")
  start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    stack.enter_context(progress.watch(
        "faxbridge.converters.runtimes.tff.client", "invoke",
        lambda *a, **k: "starting TFF 0.87 in .venv-tff (rounds run there)"))
    stack.enter_context(progress.rounds("faxbridge._src.verify", "native"))
    report = fb.verify(out, data, runtime="tff", rounds=ns.rounds)
  labels = render.output_labels(read_manifest(out))
  print(render.verify_table(report, labels))
  print(f"\n{render.verdict(report, time.perf_counter() - start, labels)}")
  return 0 if report.ok else 1


def _version() -> str:
  import platform

  import jax

  import faxbridge

  return (f"faxbridge {faxbridge.__version__} (jax {jax.__version__}, Python "
          f"{platform.python_version()})")


def main(argv: list[str] | None = None) -> int:
  """Run the command; the exit code is 0 on success, 1 when a verification ran and outputs differ,
  2 for a usage error or a faxbridge error (one line on stderr; nothing verified)."""
  parser = _Parser(prog="faxbridge", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=_version())
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="show TensorFlow's, TFLite's and absl's own logs (hidden by default)")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("targets", help="list targets, the runtimes that read them, and which are "
                     "installed here")
  p.set_defaults(fn=cmd_targets)

  p = sub.add_parser("export", help="export a program for a target")
  p.add_argument("program", help="MODULE:ATTR of an fb.computation or fb.IterativeProcess")
  p.add_argument("--target", default="tff", choices=sorted(registry.TARGETS))
  p.add_argument("-o", "--output", required=True, help="the export directory to create")
  p.add_argument("--force", action="store_true", help="replace an existing directory")
  p.add_argument("--local", choices=["tensorflow", "xla"], help="tff: form of local computations")
  p.add_argument("--stablehlo-version", help="stablehlo: version of the portable artifacts")
  p.add_argument("--lowering", choices=["tf", "jax2tf"], help="tflite: how pieces reach TF")
  p.add_argument("--example-inputs", default="example_inputs", help="function giving the inputs")
  p.add_argument("--save-inputs", nargs="?", const="", metavar="FILE",
                 help="also write the example inputs, by name, to FILE (.npz; default: "
                 "OUTPUT.inputs.npz beside the export, which verify reads by default)")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("verify", help="run an export on a runtime and natively, and compare")
  p.add_argument("dir")
  p.add_argument("--runtime", default="tff", choices=sorted(registry.RUNTIMES))
  p.add_argument("--inputs", help=".npz of the inputs by manifest name (default: DIR.inputs.npz "
                 "written by export --save-inputs)")
  p.add_argument("--program", help="MODULE:ATTR whose example inputs to verify with")
  p.add_argument("--example-inputs", default="example_inputs",
                 help="with --program: the function giving the inputs")
  p.add_argument("--rounds", type=_at_least_one, default=5, help="rounds of an iterative process")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("inspect", help="the program's inputs, outputs and stages with their traffic")
  p.add_argument("program")
  p.add_argument("--example-inputs", default="example_inputs")
  p.add_argument("--html", metavar="FILE", help="also draw the round into FILE (self-contained "
                 "HTML with an inline SVG)")
  p.add_argument("--jaxpr", action="store_true",
                 help="also print the traced jaxpr with every value's placement")
  p.set_defaults(fn=cmd_inspect)

  p = sub.add_parser("demo", help="export the bundled FedAvg to TFF and verify it on TFF 0.87")
  p.add_argument("-o", "--output", help="where to write (default: a temporary folder)")
  p.add_argument("--rounds", type=_at_least_one, default=5)
  p.set_defaults(fn=cmd_demo)

  ns = parser.parse_args(argv)
  # Decided before stderr is redirected: progress only for a person watching a terminal.
  ns.progress = Progress(sys.stderr.isatty())
  if not ns.verbose:
    _quiet_python_logs()
  try:
    with _native_logs_hidden(not ns.verbose):
      return ns.fn(ns)
  except UsageError as e:
    print(f"faxbridge {ns.command}: error: {e}", file=sys.stderr)
    return 2
  except FaxbridgeError as e:
    print(f"faxbridge {ns.command}: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  except BrokenPipeError:
    # `faxbridge inspect ... | head`: the reader has gone; what it read is all it wanted. Python
    # would otherwise print a traceback when it flushes stdout at exit.
    with contextlib.suppress(OSError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
  sys.exit(main())

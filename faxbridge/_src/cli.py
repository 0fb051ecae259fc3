"""The ``faxbridge`` command: inspect, export and verify federated computations.

Targets, runtimes, their options, progress and the examples of ``--help`` come from the registry
(``faxbridge._src.registry``): this module names none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from faxbridge._src import events, native_logs, registry, signing, verify
from faxbridge._src.errors import FaxbridgeError, RoundFailedError
from faxbridge._src.locations import definition

USAGE = """A program is named MODULE:ATTR (an fb.computation or fb.IterativeProcess), imported
relative to the working directory; its example inputs come from MODULE.example_inputs() (or
--example-inputs NAME), which returns the computation's positional arguments. For an iterative
process the arguments of next after the state are used. The bundled examples are importable as
examples.NAME from the repository root and as faxbridge.examples.NAME from anywhere.

examples (from the repository root, in this order):
{examples}

--save-inputs with no file writes DIR.inputs.npz beside the export DIR; verify DIR reads it when
neither --inputs nor --program is given. verify without --runtime uses the first runtime that reads
the export's target.

Exit codes: 0 success; 1 a verification ran and some output differs (the table says which) or
a round failed on the runtime (a node dropped out; one line says where its state is kept);
2 a usage error or an export/inputs that cannot be verified (one line on stderr, nothing compared);
130 interrupted (Ctrl-C). Progress goes to stderr when it is a terminal; results go to stdout.
"""

# The examples that need no particular target, before and after those each target adds
# (``Target.examples``); the drawing goes into build/, which the targets' examples create.
FIRST_EXAMPLES = ("faxbridge targets",)
LAST_EXAMPLES = ("faxbridge inspect examples.fedavg:computation --html build/fedavg_round.html",)


def examples() -> list[str]:
  """The command lines ``--help`` shows, in the order they run."""
  return [*FIRST_EXAMPLES, *(e for t in registry.targets().values() for e in t.examples),
          *LAST_EXAMPLES]


class UsageError(Exception):
  """A mistake on the command line (a name that does not resolve, a file that is not there): one
  line on stderr and exit code 2, never a traceback."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # type: ignore[override]
    # One line (argparse prints its whole usage block first); the usage is one -h away.
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


_VERBOSE_HELP = "show the native libraries' own logs (TensorFlow's, absl's; hidden by default)"


class _CommandParser(_Parser):
  """A command's parser. -v is taken before or after the command (faxbridge -v export ... or
  faxbridge export ... -v): each command has it too, with a default that leaves the value parsed
  before the command alone."""

  def __init__(self, **kwargs: Any) -> None:
    super().__init__(**kwargs)
    self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help=_VERBOSE_HELP)


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
  _check_fits(program, args, f"{module_name}.{inputs_fn}()", definition(make_inputs))
  if isinstance(program, IterativeProcess):
    args = args[1:]
  return program, args


def _check_fits(program: Any, args: tuple, origin: str, defined: str) -> None:
  """A PlacementError naming ``origin`` (``module.example_inputs()``, defined at ``defined``),
  what it returned and what the computation takes, when ``args`` are not the program's inputs
  (their number, the clients axis): raised while tracing, it would name this command's line."""
  import jax

  from faxbridge._src.computation import arg_names, check_inputs
  from faxbridge._src.errors import PlacementError
  from faxbridge._src.iterative import IterativeProcess

  comp = program.next if isinstance(program, IterativeProcess) else program
  full = (program.state_spec(), *args[1:]) if isinstance(program, IterativeProcess) else args
  try:
    check_inputs(comp, full)
  except PlacementError as e:
    leaf = lambda x: (f"{getattr(x, 'dtype', type(x).__name__)}"
                      f"[{','.join(map(str, np.shape(x)))}]")
    returned = ", ".join(str(jax.tree.map(leaf, a)) for a in args)
    takes = ", ".join(f"{name}: {place.value}" for name, place in
                      zip(arg_names(comp.fn, len(comp.in_placements)), comp.in_placements))
    state = " (its first, the state, is replaced by the process's)" \
        if isinstance(program, IterativeProcess) else ""
    raise PlacementError(
        f"the example inputs {origin} returned{f' (defined at {defined})' if defined else ''} "
        f"do not fit {comp.__name__}: {e}. It returned ({returned}){state}; {comp.__name__} "
        f"takes ({takes})") from None


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


def _check_writable_file(path: str, flag: str) -> None:
  """A UsageError unless ``path`` can be written as a file: its folder exists and it is not a
  directory. Asked before any work, so a typo in a folder name does not cost the export."""
  where = Path(path)
  if where.is_dir():
    raise UsageError(f"{flag} {path} is a directory; name a file")
  folder = where.parent
  if not folder.is_dir():
    raise UsageError(f"{flag} {path}: no such folder {folder}"
                     + (" (it is a file)" if folder.exists() else "; create it first"))
  if not os.access(folder, os.W_OK | os.X_OK) or (where.exists() and not os.access(where, os.W_OK)):
    raise UsageError(f"{flag} {path}: not writable")


def _save_inputs(path: Path, out_dir: Path, args: tuple) -> None:
  import jax

  from faxbridge._src.export import read_manifest
  from faxbridge._src.verify import signature_blocks

  block, _ = signature_blocks(read_manifest(out_dir))
  leaves = jax.tree.leaves(args)
  # A Python scalar is typed as the export typed it (weakly), not as numpy's float64/int64.
  by_name: dict[str, Any] = {s["name"]: np.asarray(v) if hasattr(v, "dtype") else
                             np.asarray(v, dtype=np.dtype(s["dtype"]))
                             for s, v in zip(block["inputs"], leaves)}
  np.savez(path, **by_name)


# --- progress and quiet native logs --------------------------------------------------------------
class Progress:
  """Steps of a long command on stderr, each with the seconds since the command started; silent
  unless stderr is a terminal (pipes, CI logs and tests see only the results on stdout).

  The command's own steps are calls; the library's are its events (``faxbridge._src.events``),
  received while :meth:`listening`. Nothing of the library is replaced to report them. Its clock,
  started once with the command, is also the one the command's summary reads (:meth:`elapsed`), so
  the last step's time and the summary's never disagree."""

  def __init__(self, enabled: bool):
    self.enabled, self.start = enabled, time.perf_counter()

  def elapsed(self, at: float | None = None) -> float:
    """Seconds from the command's start to ``at`` (a ``time.perf_counter()`` value) or now."""
    return (time.perf_counter() if at is None else at) - self.start

  def __call__(self, message: str, at: float | None = None) -> None:
    if self.enabled:
      print(f"[{self.elapsed(at):6.1f} s] {message}", file=sys.stderr, flush=True)

  def event(self, event: events.Event) -> None:
    self(event.message, event.time)

  @contextlib.contextmanager
  def listening(self) -> Iterator[None]:
    """While inside, print every event of the library (no listener at all when progress is off,
    so the library runs as if nobody watched)."""
    if not self.enabled:
      yield
      return
    with events.listen(self.event):
      yield


@contextlib.contextmanager
def _native_logs_hidden(hide: bool) -> Iterator[None]:
  """Native libraries (TensorFlow's C++ runtime and converters, absl) write their logs (oneDNN
  notices, "Ignored output_format", "All log messages before absl::InitializeLog()") straight to
  file descriptor 2. While a command runs they are caught (``native_logs.captured_stderr``); a crash
  shows the ones that can explain it after its traceback so nothing is lost. ``--verbose`` leaves
  everything as it is."""
  native_logs.show_native_logs(not hide)
  if not hide:
    yield
    return
  with native_logs.captured_stderr() as captured:
    try:
      yield
    except BaseException as e:
      if not isinstance(e, UsageError | FaxbridgeError | SystemExit | KeyboardInterrupt):
        explained = native_logs.without_start_up_noise(captured())
        if explained:
          print(f"native log before the error:\n{explained[-4000:]}", file=sys.stderr)
      raise


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


def _given_options(ns: argparse.Namespace, prefix: str, declared_options: tuple[registry.Option, ...]
                   ) -> dict[str, Any]:
  """The option flags given (dest ``PREFIX<name>``), as the chosen target's or runtime's types."""
  declared = {o.name: o for o in declared_options}
  options = {}
  for name, value in vars(ns).items():
    if name.startswith(prefix) and value is not None:
      name = name[len(prefix):]
      # An option the target or runtime does not declare goes on as given, to be refused naming both.
      options[name] = _option_value(declared[name], value) if name in declared else value
  return options


def _option_value(option: registry.Option, value: Any) -> Any:
  """A flag's value as the option's type (argparse converted it already when only one target
  declares the option; several targets may type one name differently)."""
  if value is None or isinstance(value, bool) or option.type in (str, bool):
    return value
  try:
    return option.type(value)
  except (TypeError, ValueError):
    raise UsageError(f"{option.flag} {value!r}: expected a value of type {option.type.__name__}") \
        from None


def cmd_export(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge._src import render
  from faxbridge._src.export import check_out_dir

  # Before the program is imported and traced: the cheap mistakes first (fb.export asks again).
  out_dir = check_out_dir(ns.output, ns.force)
  if ns.sign:
    signing.load_private_key(ns.sign, out_dir)
  if ns.save_inputs:
    _check_writable_file(ns.save_inputs, "--save-inputs")
  target = registry.target(ns.target) if ns.target else registry.default_target()
  if target is None:
    raise UsageError("no --target given and no registered target is the default")
  options = _given_options(ns, "option_", target.options)
  target.check_options(options)  # export checks them too; here before the program is imported
  progress = ns.progress
  progress(f"importing {ns.program}")
  program, args = _load(ns.program, ns.example_inputs)
  with progress.listening():
    out = fb.export(program, *args, target=target.name, out_dir=ns.output, force=ns.force,
                    sign_with=ns.sign, **options)
  print(f"exported {ns.program} to {out} ({target.name}) in {progress.elapsed():.1f} s\n")
  print(render.files_summary(out))
  if ns.save_inputs is not None:
    path = Path(ns.save_inputs) if ns.save_inputs else _sidecar(out)
    _save_inputs(path, out, args)
    print(f"\nexample inputs: {path} ({render.size_text(path.stat().st_size)})")
  return 0


# fb.verify's own default, shown in --help (read off its signature: one owner of the number).
_VERIFY_ROUNDS: int = inspect.signature(verify.verify).parameters["rounds"].default

def _x64_for(manifest: dict) -> None:
  """Turn on JAX's 64-bit mode when the export's inputs or outputs are 64-bit, as its manifest
  records them (the ``computation``, ``initialize`` and ``next`` blocks): the export decides, so
  ``faxbridge verify`` needs no JAX_ENABLE_X64 from the user. The mode is process-wide and read when
  arrays are made, so this runs before any input is read. A 32-bit export leaves the mode as the
  environment set it (its pieces may still hold 64-bit values inside)."""
  import jax

  # The manifest was checked against its schema: each block present has its inputs and outputs.
  leaves = [leaf for name in ("computation", "initialize", "next") if name in manifest
            for leaf in (*manifest[name]["inputs"], *manifest[name]["outputs"])]
  if any(leaf["dtype"] in verify.WIDE_DTYPES for leaf in leaves):
    jax.config.update("jax_enable_x64", True)


def cmd_verify(ns: argparse.Namespace) -> int:
  import faxbridge as fb
  from faxbridge._src import render
  from faxbridge._src.verify import read_export_manifest

  progress = ns.progress
  export_dir = Path(ns.dir)
  if ns.trust:  # before the manifest is parsed: an export not signed by the key is not read
    signing.check_signature(export_dir, ns.trust)
  manifest = read_export_manifest(export_dir)  # no dir, no manifest, not JSON: one line, exit 2
  chosen = verify.chosen_runtime(manifest, ns.runtime)  # a runtime that cannot read it: refused
  options = _given_options(ns, "runtime_option_", chosen.options)
  chosen.check_options(options)  # and an option it does not take, before anything is imported
  if ns.rounds is not None and manifest.get("kind") != "iterative_process":
    raise UsageError(f"--rounds applies to an iterative process; {export_dir} holds a single "
                     f"computation (kind {manifest.get('kind')!r}), which runs once")
  _x64_for(manifest)  # before the inputs (and the program's example inputs) become arrays
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
  try:
    with progress.listening():
      report = fb.verify(export_dir, *args, runtime=ns.runtime, inputs=inputs,
                         rounds=ns.rounds or _VERIFY_ROUNDS, trust=ns.trust, **options)
  except RoundFailedError as e:  # the runtime ran and a round failed there: a failed verification
    print(f"faxbridge verify: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  print(render.verification_text(report, progress.elapsed()))
  return 0 if report.ok else 1


def cmd_keygen(ns: argparse.Namespace) -> int:
  keys = signing.keygen(ns.prefix)
  print(f"private key: {keys.private_key} (mode 0600; sign with it: faxbridge export ... --sign "
        f"{keys.private_key}; it never enters an export)")
  print(f"public key:  {keys.public_key} (give it to whoever verifies: faxbridge verify DIR "
        f"--trust {keys.public_key})")
  print(f"fingerprint: {keys.fingerprint}")
  return 0


def _forms(program: Any, args: tuple) -> dict:
  """The federated forms of a program, as export splits it: ``computation``, or ``initialize``
  and ``next``."""
  from faxbridge._src.export import split_program

  return split_program(program, args).forms


def cmd_inspect(ns: argparse.Namespace) -> int:
  from faxbridge._src import drawing, render
  from faxbridge._src.iterative import IterativeProcess

  if ns.html:
    _check_writable_file(ns.html, "--html")  # before the program is imported and traced
  progress = ns.progress
  progress(f"importing {ns.program}")
  program, args = _load(ns.program, ns.example_inputs)
  with progress.listening():
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


def _option_help(option: registry.Option) -> str:
  choices = f" {{{','.join(map(str, option.choices))}}}" if option.choices else ""
  return f"{option.flag}{choices} (default {option.default}): {option.help}"


def cmd_targets(ns: argparse.Namespace) -> int:
  rows = []
  listed = set()
  for name, target in registry.targets().items():
    print(f"{name}: {target.summary}")
    for option in target.options:
      print(f"  option  {_option_help(option)}")
    for runtime in registry.readers(name):
      listed.add(runtime.name)
      ok, where = runtime.availability()
      how = "" if ok else f"; install: {runtime.install or 'pip install -e . (the core environment)'}"
      print(f"  runtime {runtime.name:7s} {'installed' if ok else 'MISSING  '}  {where}{how}")
      for option in runtime.options:  # verify's flags of this runtime
        print(f"    option  {_option_help(option)}")
      rows.append(ok)
    print()
  unread = [r for r in registry.runtimes().values() if r.name not in listed]
  for runtime in unread:
    print(f"runtime {runtime.name}: {runtime.summary} (reads {', '.join(runtime.reads) or 'no target'},"
          " none registered)")
  for where, why in registry.broken().items():
    print(f"broken plug-in {where}: {why}")
  if unread or registry.broken():
    print()
  print(f"{sum(rows)} of {len(rows)} target/runtime pairs can verify here; "
        "`faxbridge verify DIR --runtime=NAME` runs one")
  return 0


def _demos() -> dict[str, registry.Target]:
  return {name: t for name, t in registry.targets().items() if t.demo is not None}


def cmd_demo(ns: argparse.Namespace) -> int:
  """The main job on a target's demo program (``Target.demo``: the bundled FedAvg on the default
  target): exported, then proven on the demo's runtime."""
  import faxbridge as fb
  from faxbridge._src import render

  demos = _demos()
  if not demos:
    raise UsageError("no registered target declares a demo")
  default = registry.default_target()
  target = demos[ns.target] if ns.target else \
      default if default is not None and default.name in demos else next(iter(demos.values()))
  demo = target.demo
  assert demo is not None  # _demos() holds only targets with one
  runtime = registry.runtime(demo.runtime)
  rounds = ns.rounds or demo.rounds
  progress = ns.progress
  progress(f"importing {demo.program}")
  program, args = _load(demo.program, demo.example_inputs)
  module = demo.program.partition(":")[0].rsplit(".", 1)[-1]
  out = Path(ns.output or tempfile.mkdtemp(prefix="faxbridge-demo-")) / f"{module}_{target.name}"
  with progress.listening():
    fb.export(program, *args, target=target.name, out_dir=out, force=True)
  print(f"exported {demo.program} to {out} in {progress.elapsed():.1f} s\n")
  print(render.files_summary(out))
  print(f"\nrunning {rounds} rounds on {runtime.name} ({runtime.summary}) and natively...")
  with progress.listening():
    report = fb.verify(out, *args, runtime=runtime.name, rounds=rounds)
  print(render.verification_text(report, progress.elapsed()))
  return 0 if report.ok else 1


def _default_note(option: registry.Option) -> str:
  """`` (default: ...)`` for an option's help, unless its help already says it."""
  if "default" in option.help:
    return ""
  if option.default in ("", None):
    return " (default: none)"
  if option.type is bool:
    return f" (default: {'on' if option.default else 'off'})"
  return f" (default: {option.default})"


def _add_option_flags(parser: argparse.ArgumentParser,
                      owners: Iterable[registry.Target | registry.Runtime] | None = None,
                      title: str = "options of the targets (faxbridge targets lists them)",
                      prefix: str = "option_") -> None:
  """A flag per option name the targets (or ``owners``: the runtimes) declare (``--some-option``
  for ``some_option``, dest ``PREFIX<name>``), its help naming the target(s) or runtime(s), their
  defaults and choices."""
  group = parser.add_argument_group(title)
  declared: dict[str, list[tuple[registry.Target | registry.Runtime, registry.Option]]] = {}
  for owner in registry.targets().values() if owners is None else owners:
    for option in owner.options:
      declared.setdefault(option.name, []).append((owner, option))
  for name, pairs in declared.items():
    option = pairs[0][1]
    kwargs: dict[str, Any] = {
        "dest": f"{prefix}{name}", "default": None,
        "help": "; ".join(f"{t.name}: {o.help}{_default_note(o)}" for t, o in pairs)}
    if len(pairs) == 1 and option.type is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    elif len(pairs) == 1:
      kwargs.update(type=option.type, choices=option.choices)
    if "action" not in kwargs and option.choices is None:
      kwargs["metavar"] = name.upper()
    try:
      group.add_argument(option.flag, **kwargs)
    except argparse.ArgumentError:
      # The name of one of the command's own flags: the option is still fb.export's to take.
      continue


def _add_example_inputs(parser: argparse.ArgumentParser, when: str = "") -> None:
  parser.add_argument("--example-inputs", default="example_inputs", metavar="NAME",
                      help=f"{when}the function of MODULE that returns the program's example "
                      "inputs (default: example_inputs)")


def _version() -> str:
  import platform

  import jax

  import faxbridge

  return (f"faxbridge {faxbridge.__version__} (jax {jax.__version__}, Python "
          f"{platform.python_version()})")


def command_parser() -> argparse.ArgumentParser:
  """The ``faxbridge`` command's parser: its commands, and their options from the registry."""
  parser = _Parser(prog="faxbridge", description="\n\n".join([
      "faxbridge: inspect, export and verify federated computations.",
      USAGE.format(examples="\n".join(f"  {line}" for line in examples()))]),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=_version())
  parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

  p = sub.add_parser("targets", help="list targets, the runtimes that read them, and which are "
                     "installed here")
  p.set_defaults(fn=cmd_targets)

  p = sub.add_parser("export", help="export a program for a target")
  p.add_argument("program", help="MODULE:ATTR of an fb.computation or fb.IterativeProcess")
  default = registry.default_target()
  p.add_argument("--target", choices=sorted(registry.targets()),
                 help=f"the target (default: {default.name if default else 'none: name one'}; "
                 "`faxbridge targets` lists them)")
  p.add_argument("-o", "--output", required=True, help="the export directory to create")
  p.add_argument("--force", action="store_true",
                 help="replace OUTPUT if it is a faxbridge export or an empty directory (anything "
                 "else there is refused, never deleted)")
  _add_example_inputs(p)
  p.add_argument("--save-inputs", nargs="?", const="", metavar="FILE",
                 help="also write the example inputs, by name, to FILE (.npz; default: "
                 "OUTPUT.inputs.npz beside the export, which verify reads by default)")
  p.add_argument("--sign", metavar="KEYFILE",
                 help="sign the export with this Ed25519 private key (faxbridge keygen makes one; "
                 "kept outside OUTPUT): writes manifest.json.sig (default: unsigned)")
  _add_option_flags(p)
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("verify", help="run an export on a runtime and natively, and compare")
  p.add_argument("dir", help="an export directory (written by faxbridge export)")
  p.add_argument("--runtime", choices=sorted(registry.runtimes()),
                 help="the runtime (default: the first that reads the export's target)")
  p.add_argument("--inputs", metavar="FILE", help=".npz of the inputs by manifest name "
                 "(default: DIR.inputs.npz written by export --save-inputs)")
  p.add_argument("--program", metavar="MODULE:ATTR",
                 help="verify with this program's example inputs")
  _add_example_inputs(p, "with --program: ")
  p.add_argument("--rounds", type=_at_least_one, metavar="N",
                 help=f"rounds of an iterative process (default: {_VERIFY_ROUNDS}); a single "
                 "computation runs once")
  p.add_argument("--trust", metavar="PUBKEYFILE",
                 help="require the export to be signed by this Ed25519 public key, checked before "
                 "anything else of it is read (default: a signature is not checked)")
  _add_option_flags(p, registry.runtimes().values(), "options of the runtimes (faxbridge targets "
                    "lists them)", "runtime_option_")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("keygen", help="make an Ed25519 key pair to sign exports: PREFIX.key "
                     "(private, mode 0600) and PREFIX.pub (public); never overwrites either")
  p.add_argument("prefix", help="where to write: PREFIX.key and PREFIX.pub")
  p.set_defaults(fn=cmd_keygen)

  p = sub.add_parser("inspect", help="the program's inputs, outputs and stages with their traffic")
  p.add_argument("program", help="MODULE:ATTR of an fb.computation or fb.IterativeProcess")
  _add_example_inputs(p)
  p.add_argument("--html", metavar="FILE", help="also draw the round into FILE (self-contained "
                 "HTML with an inline SVG)")
  p.add_argument("--jaxpr", action="store_true",
                 help="also print the traced jaxpr with every value's placement")
  p.set_defaults(fn=cmd_inspect)

  p = sub.add_parser("demo", help="export a target's demo program (the bundled FedAvg on the "
                     "default target) and prove it on the demo's runtime")
  p.add_argument("-o", "--output", help="where to write (default: a temporary folder)")
  p.add_argument("--target", choices=sorted(_demos()),
                 help="whose demo (default: the default target's)")
  p.add_argument("--rounds", type=_at_least_one, metavar="N",
                 help="rounds to verify (default: the demo's: " + ", ".join(
                     f"{t.demo.rounds} for {name}" for name, t in _demos().items() if t.demo) + ")")
  p.set_defaults(fn=cmd_demo)

  return parser


def main(argv: list[str] | None = None) -> int:
  """Run the command; the exit code is 0 on success, 1 when a verification ran and outputs differ
  or a round failed on the runtime, 2 for a usage error or a faxbridge error (one line on stderr;
  nothing verified)."""
  parser = command_parser()
  ns = parser.parse_args(argv)
  if ns.command is None:  # a bare `faxbridge`: what it can do, not an error
    parser.print_help()
    return 0
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
  except KeyboardInterrupt:
    # Ctrl-C: what was being written has been removed on the way out (fb.export writes beside and
    # swaps; a runtime ends the processes it started), so one line says so; 130 is the shell's
    # 128 + SIGINT, what scripts expect of an interrupted command.
    print(f"faxbridge {ns.command}: interrupted", file=sys.stderr)
    # A timer the interrupted code would have cancelled (JAX's "backend initialization is taking
    # more than 60 s" warning, started while its backend comes up) would hold the exit a minute
    # and then print its warning: nothing it reports is still happening.
    for thread in threading.enumerate():
      if isinstance(thread, threading.Timer):
        thread.cancel()
    return 130
  except OSError as e:
    # The file system refused something the checks before the work could not foresee (a disk
    # full, a folder removed meanwhile): the user's to fix, so one line, not a traceback.
    print(f"faxbridge {ns.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

"""Export targets and the runtimes that execute their exports: plug-ins, declared by the packages
that implement them, read by export, verify and the CLI.

A target or runtime is a :class:`Target` or :class:`Runtime` object, declared in its own package
(the built-in ones in ``faxbridge.converters.*``'s ``__init__``) and registered either as a Python
entry point (groups ``faxbridge.targets`` and ``faxbridge.runtimes``, each entry point naming the
object; read on first use) or by :func:`register_target` / :func:`register_runtime`. The core names
no target: everything it knows about one is its entry here.

* a target's exporter is ``export(split: SplitProgram, out_dir: Path, **options) -> manifest part``;
  its options are declared (:class:`Option`) and checked here before it is called;
* a runtime's runner is ``run(export_dir, manifest, inputs, rounds, **options) -> RuntimeResult``;
  its options are declared the same way and checked here before it is called.

Functions are named ``"module:function"`` and imported on first use: the libraries a target or
runtime builds on can take seconds to import, and a package that only declares an entry must stay
cheap to import.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from faxbridge._src import native_logs
from faxbridge._src.errors import ExportError, FaxbridgeError, VerificationError

TARGET_GROUP = "faxbridge.targets"
RUNTIME_GROUP = "faxbridge.runtimes"


@dataclasses.dataclass
class RuntimeResult:
  """What a runtime returns: outputs by name (``round{r}/NAME`` for iterative processes), named
  extra result sets to compare the same way (further runs, e.g. the program rebuilt from another
  form of it by the runtime; the name is the report's label of the run), and ``info``: notes for
  the report's reader, each value under a label a person reads (``"execution context"``)."""

  outputs: dict[str, np.ndarray]
  extra_outputs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Invocations (``computation``, ``initialize``, ``round{r}``) the runtime ran on some of the
  # clients only (a round completed over the nodes that replied): the indices, into the inputs'
  # clients axis, of those whose data it aggregated. verify runs the native program of each such
  # invocation on exactly those clients. Absent: all clients.
  clients: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def _checked_options(declared_options: tuple[Option, ...], options: Mapping[str, Any], owner_name: str,
                     owner: str, error: type[FaxbridgeError]) -> dict[str, Any]:
  """Every option of ``declared_options`` with its value (the default where none is given), or
  one ``error`` naming the option and its owner (a target's or a runtime's)."""
  declared = {o.name: o for o in declared_options}
  unknown = sorted(set(options) - set(declared))
  if unknown:
    takes = f"its options are {', '.join(sorted(declared))}" if declared else "it takes none"
    raise error(f"{owner} {owner_name!r} has no option {unknown[0]!r} ({takes})")
  for name, value in options.items():
    declared[name].check(value, owner_name, error, owner)
  return {name: option.default if options.get(name) is None else options[name]
          for name, option in declared.items()}


def _load(reference: str) -> Callable[..., Any]:
  """The function named ``"module:function"``, imported now. A plug-in is where TensorFlow and other
  native libraries are imported (often lazily, on first use): it is imported and runs with their native
  start-up noise dropped and anything else they print shown (``native_logs.quietly``)."""
  module, _, attr = reference.partition(":")
  with native_logs.quiet_start_up():
    imported = importlib.import_module(module)
  return native_logs.quietly(getattr(imported, attr))


# -- declarations ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Option:
  """One option of a target's exporter (``fb.export(..., name=value)``) or of a runtime's runner
  (``fb.verify(..., name=value)``), and on the command line ``--name-with-dashes VALUE``. ``None``
  always means the default."""

  name: str
  type: type = str  # str, int, float or bool
  default: Any = None
  help: str = ""
  choices: tuple[Any, ...] | None = None

  @property
  def flag(self) -> str:
    return "--" + self.name.replace("_", "-")

  # Callable, not type[...]: in this class body `type` is the field above.
  def check(self, value: Any, target: str, error: Callable[[str], FaxbridgeError] = ExportError,
            owner: str = "target") -> None:
    """Raises ``error`` naming the option and its owner (``owner`` ``target``) when ``value`` does
    not fit."""
    if value is None:
      return
    # bool is an int in Python, but a flag is not a number (nor a number a flag).
    fits = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
    if self.type is float and isinstance(value, int) and not isinstance(value, bool):
      fits = True
    if not fits:
      raise error(f"option {self.name}={value!r} of {owner} {target!r} must be of type "
                  f"{self.type.__name__}, not {type(value).__name__}")
    if self.choices is not None and value not in self.choices:
      raise error(f"option {self.name}={value!r} of {owner} {target!r} must be one of "
                  f"{', '.join(map(repr, self.choices))}")


@dataclasses.dataclass(frozen=True)
class Demo:
  """What ``faxbridge demo`` runs for a target: ``program`` (``MODULE:ATTR``, imported relative to
  the working directory, with its ``example_inputs()``) exported to the target and verified on
  ``runtime`` for ``rounds`` rounds."""

  program: str
  runtime: str
  rounds: int = 5
  example_inputs: str = "example_inputs"


@dataclasses.dataclass(frozen=True)
class Target:
  """An export target.

  Attributes:
    name: what ``fb.export(target=...)`` and ``--target`` take.
    exporter: ``"module:function"`` of ``export(split, out_dir, **options) -> manifest part``.
    summary: one line for ``faxbridge targets``.
    options: the exporter's options; anything else given to ``fb.export`` is refused.
    runtimes: the runtimes that read its exports, the one ``fb.verify`` uses by default first
      (a runtime may also declare that it reads a target: :attr:`Runtime.reads`).
    steps: the names of the progress events its exporter emits (``faxbridge._src.events``).
    install: how to install what the exporter needs, when the core environment lacks it.
    versions: ``"module:function"`` returning ``{package: version}`` for the manifest (what the
      export's format depends on), or None.
    examples: command lines shown by ``faxbridge --help``.
    demo: what ``faxbridge demo`` runs with this target, or None.
    default: the target ``fb.export`` and ``faxbridge export`` use when none is named.
    ragged: whether its exporter takes programs whose clients hold their own numbers of examples
      (``fb.ragged`` inputs, ``fb.fold``: the form's ``RaggedSpec`` s and folds); ``fb.export``
      refuses such a program for a target that does not say so, naming the cause.
  """

  name: str
  exporter: str
  summary: str
  options: tuple[Option, ...] = ()
  runtimes: tuple[str, ...] = ()
  steps: tuple[str, ...] = ()
  install: str = ""
  versions: str | None = None
  examples: tuple[str, ...] = ()
  demo: Demo | None = None
  default: bool = False
  ragged: bool = False

  def load(self) -> Callable[..., dict]:
    return _load(self.exporter)

  def version_info(self) -> dict[str, str]:
    return dict(_load(self.versions)()) if self.versions else {}

  def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option with its value (the default where none is given).

    Raises:
      ExportError: an option the target does not declare, or a value of the wrong type or not
        among its choices; one error, naming the option and the target.
    """
    return _checked_options(self.options, options, self.name, "target", ExportError)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """A runtime that executes exports.

  Attributes:
    name: what ``fb.verify(runtime=...)`` and ``--runtime`` take.
    runner: ``"module:function"`` of ``run(export_dir, manifest, inputs, rounds, **options) ->
      RuntimeResult``.
    summary: one line for ``faxbridge targets``.
    options: the runner's options (``fb.verify(..., name=value)``, ``faxbridge verify
      --name-with-dashes VALUE``); anything else given is refused. The runner gets every declared
      option, with its default where none was given.
    reads: targets whose exports it executes (besides those that list it in ``Target.runtimes``).
    install: how to install what it needs, when the core environment lacks it.
    available: ``"module:function"`` returning ``(ok, where it runs or what is missing)``, cheap
      (no import of the runtime itself); None: it runs wherever faxbridge does.
  """

  name: str
  runner: str
  summary: str
  reads: tuple[str, ...] = ()
  install: str = ""
  available: str | None = None
  options: tuple[Option, ...] = ()

  def load(self) -> Callable[..., RuntimeResult]:
    return _load(self.runner)

  def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option with its value (the default where none is given).

    Raises:
      VerificationError: an option the runtime does not declare, or a value of the wrong type or
        not among its choices; one error, naming the option and the runtime.
    """
    return _checked_options(self.options, options, self.name, "runtime", VerificationError)

  def availability(self) -> tuple[bool, str]:
    """Whether it can run here, and where it runs or what is missing (a failing probe is an
    answer too: it cannot run)."""
    if self.available is None:
      return True, "this Python"
    try:
      ok, where = _load(self.available)()
    except Exception as e:  # a probe's own bug must not hide the other runtimes
      return False, f"its availability probe failed: {type(e).__name__}: {e}"
    return bool(ok), str(where)


def importable(*modules: str) -> tuple[bool, str]:
  """An ``available`` probe's answer for a runtime that needs ``modules`` in this Python, found
  without importing them."""
  missing = []
  for name in modules:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      missing.append(name)
  if missing:
    return False, f"{', '.join(missing)} not importable"
  return True, f"{', '.join(modules)} in this Python"


# -- the registry -----------------------------------------------------------------------------------
class _Table:
  """Entries of one kind: entry points of ``group`` (read on first use) and registrations."""

  def __init__(self, group: str, kind: type[Target] | type[Runtime], what: str):
    self.group, self.kind, self.what = group, kind, what
    self.entries: dict[str, Any] = {}
    self.broken: dict[str, str] = {}  # name -> why its entry point could not be used
    self.discovered = False
    self.lock = threading.Lock()

  def add(self, entry: Any, source: str) -> None:
    if not isinstance(entry, self.kind):
      raise TypeError(f"{source} is a {type(entry).__name__}, not a faxbridge {self.kind.__name__}")
    known = self.entries.get(entry.name)
    if known is not None and known != entry:
      raise ValueError(f"{self.what} {entry.name!r} is registered twice, differently ({source})")
    self.entries[entry.name] = entry

  def remove(self, name: str) -> None:
    self.discover()  # so that an entry point read later cannot bring it back
    self.entries.pop(name, None)

  def discover(self) -> None:
    with self.lock:
      if self.discovered:
        return
      for point in importlib.metadata.entry_points(group=self.group):
        source = f"entry point {point.name} = {point.value} (group {self.group})"
        try:
          entry = point.load()
          if getattr(entry, "name", None) != point.name:
            raise ValueError(f"it names {getattr(entry, 'name', None)!r}, not {point.name!r}")
          self.add(entry, source)
        except Exception as e:  # one broken plug-in must not take the others down
          self.broken[point.name] = f"{source}: {type(e).__name__}: {e}"
      self.discovered = True

  def all(self) -> Mapping[str, Any]:
    self.discover()
    return MappingProxyType(self.entries)

  def get(self, name: str, error: type[FaxbridgeError]) -> Any:
    entries = self.all()
    if name in entries:
      return entries[name]
    if name in self.broken:
      raise error(f"{self.what} {name!r} cannot be loaded: {self.broken[name]}")
    if not entries:
      raise error(f"unknown {self.what} {name!r}: none is registered (entry points of group "
                  f"{self.group!r}); is faxbridge installed? (pip install -e .)")
    raise error(f"unknown {self.what} {name!r}; known: {', '.join(sorted(entries))}")


_TARGETS = _Table(TARGET_GROUP, Target, "export target")
_RUNTIMES = _Table(RUNTIME_GROUP, Runtime, "runtime")


def register_target(target: Target) -> Target:
  """Add ``target`` (e.g. from a notebook or a test; packages declare an entry point instead)."""
  _TARGETS.discover()
  _TARGETS.add(target, f"register_target({target.name!r})")
  return target


def register_runtime(runtime: Runtime) -> Runtime:
  """Add ``runtime`` (e.g. from a notebook or a test; packages declare an entry point instead)."""
  _RUNTIMES.discover()
  _RUNTIMES.add(runtime, f"register_runtime({runtime.name!r})")
  return runtime


def unregister_target(name: str) -> None:
  """Remove the target ``name`` (registered or from an entry point) for the rest of the process."""
  _TARGETS.remove(name)


def unregister_runtime(name: str) -> None:
  """Remove the runtime ``name`` (registered or from an entry point) for the rest of the process."""
  _RUNTIMES.remove(name)


def targets() -> Mapping[str, Target]:
  """Every registered target by name, in registration order."""
  return _TARGETS.all()


def runtimes() -> Mapping[str, Runtime]:
  """Every registered runtime by name, in registration order."""
  return _RUNTIMES.all()


def broken() -> dict[str, str]:
  """Entry points that could not be loaded, by ``group/name``: why."""
  _TARGETS.discover()
  _RUNTIMES.discover()
  return {**{f"{TARGET_GROUP}/{k}": v for k, v in _TARGETS.broken.items()},
          **{f"{RUNTIME_GROUP}/{k}": v for k, v in _RUNTIMES.broken.items()}}


def target(name: str) -> Target:
  """The target called ``name``. Raises ExportError listing the known ones."""
  return _TARGETS.get(name, ExportError)


def runtime(name: str) -> Runtime:
  """The runtime called ``name``. Raises VerificationError listing the known ones."""
  return _RUNTIMES.get(name, VerificationError)


def default_target() -> Target | None:
  """The target used when none is named: the first (by name) that declares ``default``."""
  chosen = sorted((t for t in targets().values() if t.default), key=lambda t: t.name)
  return chosen[0] if chosen else None


def readers(target_name: str) -> list[Runtime]:
  """The runtimes that execute exports of ``target_name``: the target's own list in its order
  (its default first), then any other runtime declaring that it reads the target, by name."""
  found = runtimes()
  named = targets()[target_name].runtimes if target_name in targets() else ()
  ordered = [found[r] for r in named if r in found]
  ordered += sorted((r for r in found.values() if target_name in r.reads and r not in ordered),
                    key=lambda r: r.name)
  return ordered


__all__ = [
  "RUNTIME_GROUP",
  "TARGET_GROUP",
  "Demo",
  "Option",
  "Runtime",
  "RuntimeResult",
  "Target",
  "broken",
  "default_target",
  "importable",
  "readers",
  "register_runtime",
  "register_target",
  "runtime",
  "runtimes",
  "target",
  "targets",
  "unregister_runtime",
  "unregister_target",
]

"""Shared test settings: the code under test is this checkout's, reproducible hypothesis runs, a
check that an error names user code, what the processes of one run share (the bundled examples'
exports, IREE's compile cache: see run_shared.py) and which tests share an xdist worker
(xdist_groups.py)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator

import hypothesis
import pytest
import xdist_groups
from run_shared import example_program, made_once, shared_dir

import faxbridge
import faxbridge.converters

REPO = pathlib.Path(__file__).resolve().parents[1]

# XLA:CPU compiles with LLVM's optimizations off (a user's own XLA_FLAGS win). The suite compiles
# thousands of small programs and runs each a few times, so compiling is most of its CPU: this
# takes about a seventh off the quick suite. The arithmetic is the same IEEE arithmetic (fast math
# is off either way) and every comparison keeps its tolerance, or is exact on integers. Set before
# any test starts a backend (importing jax starts none); the processes tests start inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")


def foreign_imports(repo: pathlib.Path) -> list[str]:
  """The faxbridge packages imported from another tree than ``repo``. An editable install made
  from another checkout maps ``faxbridge.converters`` (``converters/`` beside ``faxbridge/``) there
  even when ``faxbridge`` itself comes from here, and the suite would test a mix of two trees."""
  found = []
  for module in (faxbridge, faxbridge.converters):
    root = pathlib.Path(module.__file__).resolve().parents[1]
    if root != repo:
      found.append(f"{module.__name__} from {module.__file__} (tree {root})")
  return found


def pytest_sessionstart(session: pytest.Session) -> None:
  foreign = foreign_imports(REPO)
  if foreign:
    pytest.exit(f"these tests in {REPO} would test another tree's code: {'; '.join(foreign)}. "
                f"Reinstall from here (pip install --no-deps -e {REPO}) or use this checkout's "
                ".venv.", returncode=pytest.ExitCode.USAGE_ERROR)

# Fixed examples (derandomize) and a modest budget: property tests stay fast and reproducible.
hypothesis.settings.register_profile(
    "faxbridge",
    derandomize=True,
    max_examples=8,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile("faxbridge")


@pytest.fixture
def assert_points_at():
  """``assert_points_at(error, path, marker)``: the message names ``path:N``, N the line ending
  in ``# marker``."""

  def check(error: BaseException, path: str, marker: str) -> None:
    lines = pathlib.Path(path).read_text().splitlines()
    found = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, f"marker {marker!r} found {len(found)} times in {path}"
    assert f"{path}:{found[0]}" in str(error), str(error)

  return check


# -- shared by the processes of one run --------------------------------------------------------------
@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> pathlib.Path:
  """A directory every worker of this run shares (see run_shared.shared_dir)."""
  return shared_dir(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _iree_cache(run_dir) -> Iterator[None]:
  # One IREE compile cache for the run and every process it starts (the CLI's too), away from the
  # user's: a module compiled once (an example's export and its byte-identical interop fixture) is
  # not compiled again. Entries are keyed by content and written atomically.
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FAXBRIDGE_IREE_CACHE", str(run_dir / "iree-cache"))
    yield


@pytest.fixture(scope="session")
def example_export(run_dir) -> Callable[[str, str, str], tuple[pathlib.Path, tuple]]:
  """``example_export(name, kind, target)``: (export directory, program arguments) of a bundled
  example's computation or process (``kind``), exported once per run for every test that reads it.
  Exports are deterministic (test_fixtures checks them byte for byte), so one serves all."""

  def get(name: str, kind: str, target: str) -> tuple[pathlib.Path, tuple]:
    program, args = example_program(name, kind)
    out = made_once(run_dir, f"example-{name}-{kind}-{target}",
                    lambda path: faxbridge.export(program, *args, target=target, out_dir=path))
    return out, args

  return get


def pytest_configure(config: pytest.Config) -> None:
  xdist_groups.register(config)

"""Shared test settings: the code under test is this checkout's, reproducible hypothesis runs, and
a check that an error names user code."""

from __future__ import annotations

import pathlib

import hypothesis
import pytest

import faxbridge
import faxbridge.converters

REPO = pathlib.Path(__file__).resolve().parents[1]


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

"""Shared test settings: reproducible hypothesis runs, and a check that an error names user code."""

from __future__ import annotations

import pathlib

import hypothesis
import pytest

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

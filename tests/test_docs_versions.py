"""Every version number the docs state comes from one place, and a test holds it there.

* The StableHLO versions of ``docs/targets.md`` (what ``week_12``, ``week_4``, ``max`` and ``none``
  mean with the pinned jaxlib) are checked against the answer of the installed jaxlib, through the
  stablehlo target's own option (``resolve_version``).
* Every "NAME X.Y[.Z]" of a package the project pins (jax, jaxlib, TF, TFF, federated-language,
  numpy, IREE, LiteRT, drjax, dp-accounting, Python, faxbridge), in README.md and docs/*.md, prose
  and JSON examples alike, must be a version of that package in a lock file (``requirements/*.lock``),
  the Makefile (TFF itself, the Pythons) or ``pyproject.toml`` (faxbridge).
"""

from __future__ import annotations

import re
from pathlib import Path

import jaxlib
import pytest

from faxbridge.converters.stablehlo import TARGET as STABLEHLO
from faxbridge.converters.stablehlo.export import resolve_version

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# How the docs name each pinned package -> its names in the lock files (normalized: lower case, '-').
PACKAGES = {
    r"jax": ("jax",),
    r"jaxlib": ("jaxlib",),
    r"TF|TensorFlow|tensorflow": ("tensorflow", "tensorflow-cpu"),
    r"TFF|TensorFlow Federated|tensorflow[_-]federated": ("tensorflow-federated",),
    r"federated[_-]language": ("federated-language",),
    r"numpy": ("numpy",),
    r"IREE": ("iree-base-compiler", "iree-base-runtime"),
    r"LiteRT|ai-edge-litert": ("ai-edge-litert",),
    r"drjax": ("drjax",),
    r"Flower|flwr": ("flwr",),
    r"dp-accounting(?: library)?": ("dp-accounting",),
    r"Python|python": ("python",),
    r"faxbridge": ("faxbridge",),
}
# Stated on purpose though no lock holds them, each with the file that says why.
NOT_LOCKED = {("jaxlib", "0.4.14"): "requirements/tff.txt"}  # TFF 0.87's pin, never published


def _norm(name: str) -> str:
  return name.lower().replace("_", "-")


def pinned() -> dict[str, set[str]]:
  """Package -> the versions the project pins: lock files, the Makefile, pyproject.toml."""
  out: dict[str, set[str]] = {}
  texts = [p.read_text() for p in sorted((REPO / "requirements").glob("*.lock"))]
  texts.append((REPO / "Makefile").read_text())
  for line in "\n".join(texts).splitlines():
    for name, version in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==(\d[\d.]*\d)", line):
      out.setdefault(_norm(name), set()).add(version)
  out["python"] = set(re.findall(r"find_python,(\d+\.\d+)\)", (REPO / "Makefile").read_text()))
  out["faxbridge"] = set(re.findall(r'^version = "([\d.]+)"', (REPO / "pyproject.toml").read_text(),
                                    re.M))
  return out


def stated(text: str) -> list[tuple[str, str, int]]:
  """(package, version, line) of every version of a pinned package that ``text`` states."""
  found = []
  for alias, packages in PACKAGES.items():
    pattern = rf"(?<![\w.-])(?:{alias})(?![\w-])[\s:=\"(]*(\d+\.\d+(?:\.\d+)*)(?![\w.]*\d)"
    for m in re.finditer(pattern, text):
      found.append((packages[0], m.group(1), text.count("\n", 0, m.start()) + 1))
  return found


def _agrees(package: str, version: str, versions: set[str]) -> bool:
  """A stated version agrees with a pinned one that it abbreviates (TF 2.14 of 2.14.1); Pythons
  are pinned as X.Y, and an example's full X.Y.Z agrees with it."""
  parts = version.split(".")
  for pin in versions:
    pin_parts = pin.split(".")
    if package == "python" and parts[:2] == pin_parts[:2]:
      return True
    if pin_parts[:len(parts)] == parts:
      return True
  return False


def stale(text: str, versions: dict[str, set[str]]) -> list[str]:
  """The statements of ``text`` that no pin agrees with (``line: package version``)."""
  out = []
  for package, version, line in stated(text):
    names = next(p for p in PACKAGES.values() if p[0] == package)
    pins = set().union(*(versions.get(n, set()) for n in names))
    if not _agrees(package, version, pins) and (package, version) not in NOT_LOCKED:
      out.append(f"{line}: {package} {version} (pinned: {sorted(pins)})")
  return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stated_version_is_a_pinned_one(page):
  assert stale(page.read_text(), pinned()) == []


def test_the_check_reads_the_docs_and_fails_on_a_stale_number():
  versions = pinned()
  assert versions["jax"] >= {"0.12.0.1", "0.4.14"} and versions["tensorflow-federated"] == {"0.87.0"}
  readme = (REPO / "README.md").read_text()
  found = {(p, v) for p, v, _ in stated(readme)}
  assert {("jax", "0.12.0.1"), ("tensorflow", "2.21"), ("tensorflow", "2.14.1"),
          ("tensorflow-federated", "0.87"), ("federated-language", "0.5.4"),
          ("iree-base-compiler", "3.13"), ("python", "3.12")} <= found
  doctored = readme.replace("jax 0.12.0.1", "jax 0.10.2").replace("TF 2.21", "TF 2.13")
  assert [s.split(" (")[0].split(": ")[1] for s in stale(doctored, versions)] == \
      ["jax 0.10.2", "tensorflow 2.13"]
  for (package, version), why in NOT_LOCKED.items():  # each exception is stated where it is pinned
    assert version in (REPO / why).read_text(), (package, version, why)


def test_targets_page_states_the_stablehlo_versions_the_pinned_jaxlib_gives():
  text = (REPO / "docs" / "targets.md").read_text()
  doc = dict(re.findall(r"`(\w+)`\s+is\s+\*\*(\d+\.\d+\.\d+)\*\*", text))
  option = next(o for o in STABLEHLO.options if o.name == "stablehlo_version")
  named = re.findall(r"\b(week_\d+|max|none)\b", option.help)
  assert sorted(doc) == sorted(named) and "week_12" in named, (doc, option.help)
  assert doc == {name: resolve_version(name) for name in named}
  said = re.search(r"With jaxlib (\d[\d.]*\d)", text)
  assert said is not None and said.group(1) == jaxlib.__version__

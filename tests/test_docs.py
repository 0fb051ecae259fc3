"""The docs run as written, and the error messages they show are the ones faxbridge raises.

- ``docs/quickstart.md`` and ``docs/concepts.md``: every ``python`` block runs, in order, in one
  namespace, in an empty working directory. A block after ``<!-- docs-test: slow ... -->`` needs
  TensorFlow or ``.venv-tff``: the quick test runs the blocks before the first such block, the slow
  test all of them.
- ``docs/troubleshooting.md``: every ``python`` block is a program (its first line ``# NAME.py``)
  followed by a ``text`` block with the message it raises. Each program runs from a file of that
  name (so the message names ``NAME.py:LINE``); the exception's class must be the one shown, and
  every piece of the shown message between ``[...]`` must appear in the real one, in order
  (whitespace collapsed, the temporary directory removed from paths). Every public error class has
  a section with at least one example.
- ``docs/README.md`` links every page; every relative link between the pages resolves, anchors too.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path

import pytest

import faxbridge as fb

DOCS = Path(__file__).resolve().parents[1] / "docs"
SLOW_MARK = "<!-- docs-test: slow"
BLOCK = re.compile(r"(?P<slow><!-- docs-test: slow[^>]*-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```",
                   re.S | re.M)


@dataclasses.dataclass
class Block:
  lang: str
  body: str
  slow: bool
  line: int


def blocks(page: str) -> list[Block]:
  text = (DOCS / page).read_text()
  return [Block(m["lang"], m["body"], bool(m["slow"]), text.count("\n", 0, m.start("body")) + 1)
          for m in BLOCK.finditer(text)]


def run_blocks(page: str, tmp_path: Path, monkeypatch, include_slow: bool) -> int:
  """Run the page's python blocks in one namespace; return how many ran."""
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": "__docs__"}
  ran = 0
  for block in blocks(page):
    if block.lang != "python":
      continue
    if block.slow and not include_slow:
      break  # later blocks may depend on this one
    code = compile("\n" * (block.line - 1) + block.body, str(DOCS / page), "exec")
    exec(code, namespace)  # a failure's traceback names the page's line
    ran += 1
  return ran


def test_quickstart_runs_up_to_the_export(tmp_path, monkeypatch):
  ran = run_blocks("quickstart.md", tmp_path, monkeypatch, include_slow=False)
  assert ran >= 4  # write, run, trace, split


@pytest.mark.slow
def test_quickstart_runs_whole_with_tff(tmp_path, monkeypatch):
  ran = run_blocks("quickstart.md", tmp_path, monkeypatch, include_slow=True)
  assert ran >= 6
  assert (tmp_path / "build" / "train_round_tff" / "computation.pb").is_file()


def test_ragged_runs(tmp_path, monkeypatch):
  assert run_blocks("ragged.md", tmp_path, monkeypatch, include_slow=False) >= 4


def test_concepts_run(tmp_path, monkeypatch):
  assert not any(b.slow for b in blocks("concepts.md"))
  assert run_blocks("concepts.md", tmp_path, monkeypatch, include_slow=False) >= 6


# -- troubleshooting ------------------------------------------------------------------------------
@dataclasses.dataclass
class ErrorExample:
  file: str  # the program's file name, from its first line
  program: str
  error: str  # the class name shown
  message: str  # the message shown (after "Class: ")
  slow: bool
  section: str


def error_examples() -> list[ErrorExample]:
  text = (DOCS / "troubleshooting.md").read_text()
  sections = [(m.start(), m[1]) for m in re.finditer(r"^## (.+)$", text, re.M)]
  found = list(BLOCK.finditer(text))
  out = []
  for program, shown in itertools.pairwise(found):
    if program["lang"] != "python":
      continue
    assert shown["lang"] == "text", f"the python block at offset {program.start()} has no message"
    first = program["body"].splitlines()[0]
    assert re.fullmatch(r"# \w+\.py", first), f"program without a file name: {first!r}"
    error, _, message = shown["body"].strip().partition(": ")
    section = [name for start, name in sections if start < program.start()][-1]
    out.append(ErrorExample(first[2:], program["body"], error, message, bool(program["slow"]),
                            section))
  return out


EXAMPLES = error_examples()


def _collapse(text: str) -> str:
  return " ".join(text.split())


def raised_message(example: ErrorExample, tmp_path: Path, monkeypatch) -> tuple[str, str]:
  """Run the program from ``tmp_path/<file>``; the class name and message of what it raises."""
  monkeypatch.chdir(tmp_path)
  path = tmp_path / example.file
  path.write_text(example.program)
  saved = dict(os.environ)
  try:
    exec(compile(example.program, str(path), "exec"), {"__name__": "__main__"})
  except Exception as e:  # the point is to look at it
    return type(e).__name__, str(e).replace(str(tmp_path) + os.sep, "")
  finally:
    os.environ.clear()
    os.environ.update(saved)
  raise AssertionError(f"{example.file} raised nothing")


def check_shown(example: ErrorExample, tmp_path: Path, monkeypatch) -> None:
  error, message = raised_message(example, tmp_path, monkeypatch)
  assert error == example.error, f"{example.file}: raised {error}: {message}"
  actual, at = _collapse(message), 0
  for piece in (_collapse(p) for p in example.message.split("[...]")):
    found = actual.find(piece, at)
    assert found >= 0, (f"{example.file}: docs/troubleshooting.md shows {piece!r}, which the real "
                        f"message lacks (from position {at}):\n{actual}")
    at = found + len(piece)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not e.slow], ids=lambda e: e.file)
def test_troubleshooting_message_is_real(example, tmp_path, monkeypatch):
  check_shown(example, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.slow], ids=lambda e: e.file)
def test_troubleshooting_message_is_real_slow(example, tmp_path, monkeypatch):
  check_shown(example, tmp_path, monkeypatch)


def test_every_public_error_class_has_a_shown_example():
  public = {name for name in fb.__all__
            if isinstance(getattr(fb, name), type) and issubclass(getattr(fb, name), Exception)}
  assert public == {"FaxbridgeError", "PlacementError", "TraceError", "ExportError",
                    "UnsupportedPrimitiveError", "VerificationError"}
  shown = {e.section for e in EXAMPLES if e.section == e.error or e.section == "FaxbridgeError"}
  assert shown >= public
  assert {e.error for e in EXAMPLES} >= public - {"FaxbridgeError"}  # the base is never raised


def test_a_changed_message_is_caught(tmp_path, monkeypatch):
  """The check is not vacuous: a message the code does not produce fails it."""
  example = next(e for e in EXAMPLES if e.error == "TraceError")
  wrong = dataclasses.replace(example, message=example.message.replace("jnp.where", "jnp.when"))
  with pytest.raises(AssertionError, match=r"jnp\.when"):
    check_shown(wrong, tmp_path, monkeypatch)


# -- links ----------------------------------------------------------------------------------------
def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_index_links_every_page():
  index = (DOCS / "README.md").read_text()
  linked = set(re.findall(r"\]\(([\w.]+)(?:#[\w-]+)?\)", index))
  pages = {p.name for p in DOCS.iterdir() if p.suffix in (".md", ".json") and p.name != "README.md"}
  assert pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"
  assert "](docs/README.md)" in (DOCS.parent / "README.md").read_text()


def test_relative_links_resolve():
  broken = []
  for page in sorted(DOCS.glob("*.md")):
    for target, anchor in re.findall(r"\]\(([\w./-]*?)(?:#([\w-]+))?\)", page.read_text()):
      path = (page.parent / target) if target else page
      if target.startswith("http") or not (target or anchor):
        continue
      if not path.exists():
        broken.append(f"{page.name}: {target}")
      elif anchor and path.suffix == ".md":
        anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
        if anchor not in anchors:
          broken.append(f"{page.name}: {target}#{anchor}")
  assert not broken, broken


# -- docstrings -----------------------------------------------------------------------------------
DOCTEST_MODULES = ["faxbridge._src.api", "faxbridge._src.computation", "faxbridge._src.iterative",
                   "faxbridge._src.export", "faxbridge._src.verify", "faxbridge._src.signing",
                   "faxbridge._src.ragged"]


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
  import doctest
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np

  monkeypatch.chdir(tmp_path)  # the export examples write into the working directory
  result = doctest.testmod(importlib.import_module(module), report=True,
                           extraglobs={"fb": fb, "np": np, "jnp": jnp, "jax": jax},
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result


def test_public_api_docstrings_have_an_example():
  documented = ["broadcast", "map", "sum", "mean", "weighted_mean", "secure_sum", "max", "min",
                "computation", "Computation", "IterativeProcess", "export", "verify", "keygen",
                "ragged", "Ragged", "fold"]
  lacking = [name for name in documented if ">>> " not in (getattr(fb, name).__doc__ or "")]
  errors = [name for name in fb.__all__ if name.endswith("Error")]
  lacking += [name for name in errors if name != "FaxbridgeError"
              and "Example::" not in getattr(fb, name).__doc__]
  assert not lacking, lacking

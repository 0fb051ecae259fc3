"""Aggregations named by what the user wrote (``faxbridge._src.user_names``), as ``inspect`` prints
them, the drawing shows them and ``plan.json`` carries them.

The expected names are read independently of faxbridge: from the example's own model (its leaf
keys) and source text, and, for generated programs, from the recipe each program is built from.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import pytest

import faxbridge as fb
from faxbridge._src.form import FederatedForm

sys.path.insert(0, str(Path(__file__).parent))
import federated_programs as fp

REPO = Path(__file__).resolve().parents[1]


def _inspect(program: str, html: Path) -> subprocess.Popen:
  env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(html.parent)}
  return subprocess.Popen([sys.executable, "-m", "faxbridge", "inspect", program, "--html", html],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.fixture(scope="module")
def inspected(tmp_path_factory) -> dict[str, tuple[str, str]]:
  """``faxbridge inspect`` of FedAvg and of the two-stage example, as a user runs it (both at
  once): per example its text and its drawing."""
  tmp = tmp_path_factory.mktemp("inspect")
  procs = {name: (_inspect(program, tmp / f"{name}.html"), tmp / f"{name}.html")
           for name, program in (("fedavg", "examples.fedavg:process"),
                                 ("two_stage", "examples.two_stage:computation"))}
  out = {}
  for name, (proc, html) in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    out[name] = (stdout, html.read_text())
  return out


def _stage_lines(text: str, stage: int) -> list[str]:
  block = text.split(f"\nstage {stage}:", 1)[1].split("\n\n", 1)[0]
  return block.splitlines()[1:]


def test_inspect_names_fedavgs_uploads_and_aggregates_as_its_source_does(inspected):
  """examples/fedavg.py: ``deltas, losses = fb.map(client_update, ...)``,
  ``mean_delta = fb.weighted_mean(deltas, data.count)``, ``fb.weighted_mean(losses, data.count)``:
  one line per model leaf and one for the loss, each by those names (not only upload0,
  aggregate0)."""
  from examples import _mlp

  text, _ = inspected["fedavg"]
  aggregates = [line.split(None, 1)[1] for line in _stage_lines(text, 0)
                if line.lstrip().startswith("aggregate")]
  keys = sorted(_mlp.init_params())
  expected = [f"weighted_mean(deltas[{k!r}], weight data.count) -> mean_delta[{k!r}]" for k in keys]
  assert [a.split(" f32")[0] for a in aggregates] == [
      *expected, "weighted_mean(losses, weight data.count) -> aggregate4 = out[1]"]
  # The internal names stay beside them: they are plan.json's and every export's.
  assert all(re.search(r"\[upload\d+(, upload\d+)? -> aggregate\d+\]$", a) for a in aggregates)


def test_two_stage_shows_the_aggregate_that_the_next_stage_broadcasts(inspected):
  """examples/two_stage.py: ``mean = fb.mean(fb.map(...))`` is aggregated in stage 0 and broadcast
  in stage 1; inspect's text and the drawing both say so."""
  text, page = inspected["two_stage"]
  stage0, stage1 = _stage_lines(text, 0), _stage_lines(text, 1)
  (agg0,) = [i for i, line in enumerate(stage0) if line.lstrip().startswith("aggregate")]
  assert stage0[agg0].split(None, 1)[1].startswith("mean(fb.map(…)) -> mean f32[3]")
  assert stage0[agg0 + 1].strip() == "-> broadcast as it is in stage 1"
  bcasts = [line.strip() for line in stage1 if line.lstrip().startswith("broadcast")]
  assert bcasts == ["broadcast  mean f32[3] (12 B) <- the aggregate mean(fb.map(…)) of stage 0"]
  assert any(line.split(None, 1)[1].startswith("mean(centred) -> aggregate1 = out[1]")
             for line in stage1 if line.lstrip().startswith("aggregate"))

  root = ET.fromstring(page.split("\n", 1)[1])
  text_of = lambda e: " ".join("".join(e.itertext()).split())
  wires = [text_of(e) for e in root.iter() if "wire-cell" in (e.get("class") or "").split()]
  broadcast1 = [w for w in wires if w.startswith("broadcast")][1]
  assert "mean ← aggregate of stage 0" in broadcast1
  rows = [[text_of(td) for td in tr] for tr in root.iter() if tr.tag.endswith("}tr")
          and (tds := list(tr)) and tds[0].tag.endswith("}td") and text_of(tds[0]) in ("0", "1")]
  by_stage = {r[0]: r for r in rows if len(r) == 8}  # the aggregations table
  assert by_stage["0"][2:6:3] == ["fb.map(…)", "mean f32[3]"]
  assert "stage 1 broadcast mean" in by_stage["0"][6]
  assert by_stage["1"][2] == "centred"


def _names_of(form: FederatedForm) -> list[list[str]]:
  return [[a.user_value for a in stage.aggregations] for stage in form.stages]


@pytest.mark.parametrize("seed", range(12))
def test_generated_programs_label_every_aggregation_once_per_stage(seed):
  """A generated program aggregates ``x`` (a pytree of the recipe's values) with ``fb.sum(x)``
  and friends: every aggregation is labelled ``x`` + its leaf's path in the recipe's tree (``x #2``
  where one stage aggregates the same path twice), no label repeats within a stage, and plan.json's
  JSON of the form carries them back unchanged."""
  recipe = fp.generate(seed)
  comp = fp.build(recipe)
  form = fb.split(comp, *fp.example_inputs(recipe))
  names = _names_of(form)
  for stage in names:
    assert len(stage) == len(set(stage)), stage
  expected = collections.Counter(
      f"x{jax.tree_util.keystr(path)}"
      for st in recipe.body if isinstance(st, fp.Agg)
      for path, _ in jax.tree_util.tree_flatten_with_path(st.value)[0])
  got = collections.Counter(re.sub(r" #\d+$", "", n) for stage in names for n in stage)
  assert got == expected
  again = FederatedForm.from_json(form.to_json())
  assert _names_of(again) == names


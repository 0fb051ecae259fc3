"""What a person sees of ``faxbridge export`` and ``faxbridge verify`` on a terminal (stderr on a
pseudo-terminal, in a subprocess): every line of the report explains itself (runtime notes by
label, no bare ``key: value``), the verdict says what it counted, the rows' margins agree with
their results, the rebuilt runs are named alike in progress and in the report, every lowering
names its computation, and the progress clock and the summary's time are one clock."""

from __future__ import annotations

import re

import pytest
from test_cli import REPO, _cli, _with_terminal_stderr

from faxbridge._src.export import read_manifest

STEP = re.compile(r"^\[ *([0-9.]+) s\] (.*)$")


def _steps(err: str) -> list[tuple[float, str]]:
  return [(float(m[1]), m[2]) for m in map(STEP.match, err.splitlines()) if m]


def _summary_seconds(line: str) -> float:
  """The seconds a summary line ends with (``... in 3.8 s``, ``...; 13.6 s in all``)."""
  return float(re.search(r"([0-9.]+) s( in all)?\s*$", line)[1])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tff", "stablehlo", "tflite"])
def test_export_progress_names_each_computation_and_shares_the_summarys_clock(tmp_path, target):
  rc, out, err = _with_terminal_stderr(["export", "examples.fedavg:process", f"--target={target}",
                                        "-o", tmp_path / "fedavg"], cwd=REPO)
  assert rc == 0, (out, err)
  steps = _steps(err)
  pieces = [s for _, s in steps if re.search(r"(lowering|converting) \w+ to ", s)]
  assert pieces and all(s.startswith(("initialize: ", "next: ")) for s in pieces), steps
  assert any(s.startswith("initialize: ") and "server_result" in s for s in pieces), steps
  summary = next(line for line in out.splitlines() if line.startswith("exported "))
  # One clock: the summary is read after the last step, from the same start.
  assert 0 <= _summary_seconds(summary) - steps[-1][0] < 1.0, (summary, steps[-1])


@pytest.mark.slow
def test_tff_verify_report_explains_every_line_and_counts_what_it_compared(tmp_path):
  export = tmp_path / "fedavg"
  rc, out, err = _cli(["export", "examples.fedavg:process", "--target=tff", "-o", export,
                       "--save-inputs"], cwd=REPO)
  assert rc == 0, err
  manifest = read_manifest(export)
  outputs = len(manifest["initialize"]["outputs"]) + 2 * len(manifest["next"]["outputs"])
  rc, out, err = _with_terminal_stderr(["verify", export, "--rounds", "2"], cwd=REPO)
  assert rc == 0, (out, err)
  lines = out.splitlines()
  runs = ["tff", "next rebuilt from MapReduceForm", "next rebuilt from DistributeAggregateForm"]
  assert lines[-1].startswith(f"OK: {outputs} outputs x 3 runs ({'; '.join(runs)}) = "
                              f"{3 * outputs} comparisons, all equal to native; largest err / "
                              "bound "), lines[-1]
  assert lines[0].endswith(f"{outputs} outputs: initialize's {len(manifest['initialize']['outputs'])}"
                           f", then next's {len(manifest['next']['outputs'])} in each of 2 rounds")
  # Rows: a margin at most 1 exactly where the row passes; one row per rebuilt run.
  rows = [re.split(r"  +", line) for line in lines if line.startswith(("initialize/", "round", "["))
          and line.endswith("pass")]
  assert len(rows) == outputs + 2, out
  assert all(float(r[3]) <= 1 for r in rows), out
  assert [r[0] for r in rows[-2:]] == [f"[{run}] all {outputs} outputs" for run in runs[1:]]
  # The runtime's notes are labelled sentences under a heading, no bare key: value of numbers.
  notes = lines[lines.index("about the run on tff:") + 1:-2]
  assert [n.split("  ")[1] for n in notes] == ["execution context", "MapReduceForm",
                                               "DistributeAggregateForm", "TFF runner time"], notes
  assert "tff_wall_s" not in out and "context: native" not in out
  assert not [line for line in lines if re.fullmatch(r"\w+: [\w.]+", line)], out
  # Progress: the rebuilt runs' rounds under the report's names, as they happen; one clock.
  steps = _steps(err)
  for run in runs[1:]:
    assert [s for _, s in steps if s.startswith(f"tff ({run}): ")] == [
        f"tff ({run}): initialize", f"tff ({run}): round 1 of 2", f"tff ({run}): round 2 of 2"]
  assert 0 <= _summary_seconds(lines[-1]) - steps[-1][0] < 1.0, (lines[-1], steps[-1])

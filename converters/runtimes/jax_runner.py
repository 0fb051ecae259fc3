"""Run an export's ``jax.export`` pieces in this (fresh) process: the child side of runtime "jax".

    python -m faxbridge.converters.runtimes.jax_runner EXPORT_DIR INPUTS.npz OUTPUTS.npz ROUNDS [PROGRESS]

It reads ``plan.json`` and the ``.jax`` artifacts only (no Python of the program is importable
here), deserializes each piece with ``jax.export.deserialize``, runs the round(s) with
``faxbridge.converters.plan.run_plan`` and writes the outputs. Arrays travel as ``np.savez`` files: entries
``a0, a1, ...`` plus ``names``, the keys in order (keys like ``round1/out`` are not safe zip names).
With ``PROGRESS``, every event of this process (``faxbridge.events``: each round) is appended to
that file as a JSON line, which the parent reads while this runs and emits as its own.

A client piece over ``fb.ragged`` examples is one shape-polymorphic artifact (axis 0 ``b*k``);
``Exported.call`` compiles it with XLA once per distinct length it is given (a client's rows padded
to whole batches by ``run_plan``), and reuses that for every client of the same length.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
  names = list(arrays)
  by_index: dict[str, Any] = {f"a{i}": np.asarray(arrays[n]) for i, n in enumerate(names)}
  np.savez(path, names=np.array(names, dtype=np.str_), **by_index)


def load(path: str | Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {str(n): f[f"a{i}"] for i, n in enumerate(f["names"])}


def main(argv: list[str]) -> int:
  import contextlib
  import json

  import faxbridge as fb

  export_dir, inputs_path, outputs_path, rounds, *progress = argv
  with contextlib.ExitStack() as stack:
    if progress:
      file = stack.enter_context(open(progress[0], "a", encoding="utf-8"))

      def forward(event: fb.events.Event) -> None:
        file.write(json.dumps({"name": event.name, "message": event.message,
                               "fields": event.fields}, default=str) + "\n")
        file.flush()

      stack.enter_context(fb.events.listen(forward))
    return _run(Path(export_dir), inputs_path, outputs_path, int(rounds))


def _run(export_dir: Path, inputs_path: str, outputs_path: str, rounds: int) -> int:
  import jax

  from faxbridge.converters.plan import load_plan, piece_file, pieces, run_plan

  plan = load_plan(export_dir)
  loaded = {}
  for piece in pieces(plan):
    rel = piece["files"]["jax"]
    loaded[rel] = jax.export.deserialize(bytearray(piece_file(export_dir, piece, "jax").read_bytes()))

  def call(piece: dict, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(x) for x in loaded[piece["files"]["jax"]].call(*args)]

  save(outputs_path, run_plan(plan, call, load(inputs_path), rounds, who="jax"))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

"""``fb.verify(..., runtime="litert")``: run each ``.tflite`` piece with LiteRT's interpreter.

Every piece is a model whose signature key is the piece's name and whose signature inputs and
outputs carry the plan's tensor names; ``faxbridge.converters.plan.run_plan`` orchestrates the round from
``plan.json`` alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faxbridge.converters.plan import load_plan, piece_file, pieces, run_plan
from faxbridge.extend import RuntimeResult, VerificationError, importable

FORMAT = "tflite"


def available() -> tuple[bool, str]:
  """The registry's availability probe: LiteRT importable here."""
  return importable("ai_edge_litert")


class _Runners:
  """One interpreter and signature runner per piece."""

  def __init__(self, export_dir: Path, plan: dict):
    from ai_edge_litert.interpreter import Interpreter

    self.runners = {}
    for piece in pieces(plan):
      if FORMAT not in piece["files"]:
        raise VerificationError(f"{export_dir}: piece {piece['name']} has no .tflite model "
                                "(export with --target=tflite to run on LiteRT)")
      rel = piece["files"][FORMAT]
      interpreter = Interpreter(model_path=str(piece_file(export_dir, piece, FORMAT)))
      keys = interpreter.get_signature_list()
      if piece["name"] not in keys:
        raise VerificationError(f"{rel}: no signature {piece['name']!r} (has {sorted(keys)})")
      self.runners[rel] = interpreter.get_signature_runner(piece["name"])

  def __call__(self, piece: dict, args: list[np.ndarray]) -> list[np.ndarray]:
    runner = self.runners[piece["files"][FORMAT]]
    out = runner(**{s["name"]: a for s, a in zip(piece["inputs"], args)})
    return [np.asarray(out[s["name"]]) for s in piece["outputs"]]


def verify_run(export_dir: Path, manifest: dict, inputs: dict[str, np.ndarray],
               rounds: int) -> RuntimeResult:
  """Run the export's round(s) on LiteRT from ``plan.json``: outputs keyed as ``fb.verify`` does."""
  plan = load_plan(export_dir)
  try:
    import ai_edge_litert  # noqa: F401
  except ImportError as e:
    raise VerificationError("runtime 'litert' needs ai-edge-litert: pip install ai-edge-litert") from e
  runners = _Runners(export_dir, plan)
  return RuntimeResult(outputs=run_plan(plan, runners, inputs, rounds, who="litert"),
                       info={"LiteRT interpreters": f"{len(runners.runners)}, one per piece of "
                                                    "plan.json"})

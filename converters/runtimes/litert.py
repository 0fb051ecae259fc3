"""``fb.verify(..., runtime="litert")``: run each ``.tflite`` piece with LiteRT's interpreter.

Every piece is a model whose signature key is the piece's name and whose signature inputs and
outputs carry the plan's tensor names; ``faxbridge.converters.plan.run_plan`` orchestrates the round from
``plan.json`` alone.

Clients with their own data sizes (``fb.ragged``): ``run_plan`` hands each client its own examples
(``x[i, :count[i]]``, no padding) and the model's ragged inputs have a dynamic leading dimension
(shape signature ``[-1, ...]``): each call resizes them to the client's own rows, so one model
serves every size. Only a dynamic dimension may differ from the model's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from faxbridge.converters.plan import load_plan, piece_file, pieces, run_plan
from faxbridge.extend import RuntimeResult, VerificationError, importable

FORMAT = "tflite"


def available() -> tuple[bool, str]:
  """The registry's availability probe: LiteRT importable here."""
  return importable("ai_edge_litert")


PieceFunction = Callable[[list[np.ndarray]], list[np.ndarray]]


def load_piece(model: bytes, piece: dict, where: str) -> PieceFunction:
  """One piece's ``.tflite`` model (its bytes, already read and checked by the caller) as a
  function of its arguments in the plan's input order, returning its outputs in the plan's order.

  The caller holds the bytes (not a path) so that what was checked is what runs: a Flower node
  checks the sha256 of a model it received before loading it.

  Raises:
    VerificationError: the model has no signature named after the piece.
  """
  from ai_edge_litert.interpreter import Interpreter

  interpreter = Interpreter(model_content=model)
  keys = interpreter.get_signature_list()
  if piece["name"] not in keys:
    raise VerificationError(f"{where}: no signature {piece['name']!r} (has {sorted(keys)})")
  runner = interpreter.get_signature_runner(piece["name"])
  # -1: a dimension the model leaves open (a ragged input's rows: a client's own examples).
  takes = {name: [int(d) for d in detail["shape_signature"]]
           for name, detail in runner.get_input_details().items()}

  def call(args: list[np.ndarray]) -> list[np.ndarray]:
    feeds = {}
    for s, a in zip(piece["inputs"], args):
      a = np.asarray(a)
      want = takes.get(s["name"], list(s["shape"]))
      if a.ndim != len(want) or any(w not in (-1, n) for w, n in zip(want, a.shape)):
        shown = [None if w == -1 else w for w in want]
        raise VerificationError(f"{where}: input {s['name']} is {a.dtype}{list(a.shape)}, the "
                                f"model takes {shown} (None: any size)")
      feeds[s["name"]] = a
    # The signature runner resizes every input to its array's shape before it runs: checked
    # above, only the dynamic dimensions (a client's own number of examples) change.
    out = runner(**feeds)
    return [np.asarray(out[s["name"]]) for s in piece["outputs"]]

  call.interpreter = interpreter  # type: ignore[attr-defined]  # keeps the model's buffer alive
  return call


class _Runners:
  """One interpreter and signature runner per piece."""

  def __init__(self, export_dir: Path, plan: dict):
    self.runners = {}
    for piece in pieces(plan):
      if FORMAT not in piece["files"]:
        raise VerificationError(f"{export_dir}: piece {piece['name']} has no .tflite model "
                                "(export with --target=tflite to run on LiteRT)")
      rel = piece["files"][FORMAT]
      self.runners[rel] = load_piece(piece_file(export_dir, piece, FORMAT).read_bytes(), piece, rel)

  def __call__(self, piece: dict, args: list[np.ndarray]) -> list[np.ndarray]:
    return self.runners[piece["files"][FORMAT]](args)


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

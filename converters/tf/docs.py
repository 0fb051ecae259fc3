"""Render the rule table as ``docs/tf_primitives.md``: ``python -m faxbridge.converters.tf.docs``."""

from __future__ import annotations

import pathlib
import sys

from . import all_rules

_HEADER = """# JAX primitives supported by the TensorFlow converter

Generated from the rule table (`converters/tf/registry.py`, keyed by JAX's `Primitive` objects) by
`python -m faxbridge.converters.tf.docs`; do not edit by hand.

Every primitive below lowers to plain TF ops (see `converters/tf/allowlist.py`) that TF 2.14 and
TF 2.21 run. The **TFLite** column says whether the TF 2.21 TFLite converter restricted to
`TFLITE_BUILTINS` converts the emitted ops: `builtin` (always), `partial` (in the cases the note
names; otherwise the op is TF-only) or `tf-only` (never: use the TF graph, not TFLite). A primitive
missing from this table raises `UnsupportedPrimitiveError` naming it and the user's file:line.

Dtypes: float32, int32, uint32 and bool everywhere. 16-bit floats (float16, bfloat16) run in TF
(2.14 and 2.21) but TFLite builtins do not take them: TF-only for TFLite. TFLite also lacks uint32
forms of SUB, MINIMUM, comparisons, FLOOR_DIV/FLOOR_MOD: such uint32 ops are TF-only there (the
threefry and uniform-float paths avoid them). 64-bit types need `jax_enable_x64`.
"""


def render() -> str:
  """The markdown table, grouped by family."""
  lines = [_HEADER]
  family = None
  rules = list(all_rules().values())
  for info in rules:
    if info.family != family:
      family = info.family
      lines += ["", f"## {family.replace('_', ' ')}", "", "| primitive | TFLite | note |",
                "|---|---|---|"]
    lines.append(f"| `{info.name}` | {info.tflite} | {info.note} |")
  lines += ["", f"{len(rules)} primitives; TF-only for TFLite: "
            + (", ".join(f"`{i.name}`" for i in rules if i.tflite == "tf-only") or "none")
            + "; partial: " + (", ".join(f"`{i.name}`" for i in rules if i.tflite == "partial")
                               or "none") + ".", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  root = pathlib.Path(__file__).resolve().parents[2]
  out = pathlib.Path(argv[0]) if argv else root / "docs" / "tf_primitives.md"
  out.write_text(render())
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

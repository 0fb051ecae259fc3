"""Render the rule table as ``docs/tf_primitives.md``: ``python -m faxbridge.converters.tf.docs``."""

from __future__ import annotations

import pathlib
import sys

from . import all_rules
from ._util import NO_TFLITE_KERNEL

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
  lines += [_SMALL_INTS, "| TF op | " + " | ".join(_SMALL_TYPES) + " |",
            "|---|" + "---|" * len(_SMALL_TYPES)]
  for op, missing in sorted(NO_TFLITE_KERNEL.items()):
    lines.append(f"| `{op}` | " + " | ".join("int32" if t in missing else "" for t in _SMALL_TYPES) + " |")
  lines.append("")
  return "\n".join(lines)


_SMALL_TYPES = ("int8", "uint8", "int16", "uint16")
_SMALL_INTS = """## 8 and 16-bit integers on TFLite

The TFLite builtin kernels of many ops do not take int8, uint8, int16 or uint16 (the converter
refuses the op, or, for `Equal` on uint8, converts it to a kernel that crashes LiteRT). Where the
table below says `int32`, the lowering computes that op on that type in int32 and casts the result
back (`tflite_int32` in `converters/tf/_util.py`): exact, since every value fits, and `+ - *`
wrap as in JAX because TFLite's narrowing `CAST` wraps modulo 2**bits. Elsewhere, TF graphs keep
the op on the small type. Measured by converting a one-op function per (op, type) with
`TFLITE_BUILTINS` only and running it on LiteRT against TF; `tests/test_tflite_export.py`
(`test_no_tflite_kernel_table_is_as_measured`, slow) measures it again. Ops not listed (`Cast`,
`BitwiseXor`, `Reshape`, `ExpandDims`, `Squeeze`, `If`, `While`...) run on all four types.
`BitwiseAnd`, `BitwiseOr`, `Cumprod` and `BatchMatMulV2` have no int32 kernel either (TF-only).
A unit-stride `StridedSlice` becomes `SLICE` in the converter, so it follows the `Slice` row. Known
gap: an explicit broadcast of uint16 (`BroadcastTo`) is not lowered to TFLite, as the converter
folds the int32 round trip back into a uint16 `BROADCAST_TO`.
"""


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  root = pathlib.Path(__file__).resolve().parents[2]
  out = pathlib.Path(argv[0]) if argv else root / "docs" / "tf_primitives.md"
  out.write_text(render())
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

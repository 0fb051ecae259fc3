"""``jax.export`` artifacts that depend only on the program, not on where it was traced from.

JAX records Python source locations (file names and lines, of faxbridge and of user code) in the
StableHLO module it serializes. An export must be byte-identical whoever makes it and from
whichever checkout, so the module is printed without debug information and serialized again.
"""

from __future__ import annotations

import dataclasses

import jax
from jax._src.export import _export
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir


def strip_locations(exported: jax.export.Exported) -> jax.export.Exported:
  """The same exported program with every MLIR location set to ``unknown``."""
  with mlir.make_ir_context():
    text = ir.Module.parse(exported.mlir_module()).operation.get_asm(enable_debug_info=False)
    module = ir.Module.parse(text)
    serialized = _export._module_to_bytecode(module)
  return dataclasses.replace(exported, mlir_module_serialized=serialized)


def export(fn, *args) -> jax.export.Exported:
  """``jax.export.export(jax.jit(fn))(*args)`` without source locations."""
  return strip_locations(jax.export.export(jax.jit(fn))(*args))

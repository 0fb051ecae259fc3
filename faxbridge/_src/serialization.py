"""``jax.export`` artifacts that depend only on the program, not on where it was traced from.

JAX records Python source locations (file names and lines, of faxbridge and of user code) in the
StableHLO module it serializes. An export must be byte-identical whoever makes it and from
whichever checkout, so the module is printed without debug information and serialized again.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.extend import backend
from jax.extend import mlir as jax_mlir
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir


def _portable_bytecode(module: ir.Module) -> bytes:
  """``module`` as a StableHLO portable artifact, serialized as ``jax.export`` serializes its own
  (``jax._src.export._export._module_to_bytecode``, private): for the StableHLO version at least 4
  weeks old, with Shardy as the backend uses it. So ``jax.export.deserialize`` reads the result
  under the same compatibility guarantees as an artifact JAX wrote, and the bytes are the same."""
  target = stablehlo.get_version_from_compatibility_requirement(
      stablehlo.StablehloCompatibilityRequirement.WEEK_4)
  return jax_mlir.serialize_portable_artifact(module, target, backend.get_backend().serialize_with_sdy)


def strip_locations(exported: jax.export.Exported) -> jax.export.Exported:
  """The same exported program with every MLIR location set to ``unknown``."""
  with mlir.make_ir_context():
    text = ir.Module.parse(exported.mlir_module()).operation.get_asm(enable_debug_info=False)
    serialized = _portable_bytecode(ir.Module.parse(str(text)))  # get_asm is typed as any object
  return dataclasses.replace(exported, mlir_module_serialized=serialized)


def export(fn, *args) -> jax.export.Exported:
  """``jax.export.export(jax.jit(fn))(*args)`` without source locations."""
  return strip_locations(jax.export.export(jax.jit(fn))(*args))

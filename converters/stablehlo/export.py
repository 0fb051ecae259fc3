"""``--target=stablehlo``: every piece of the split as StableHLO, plus the runtime-neutral plan.

Per piece (``pieces/<computation>/<piece>.*``):

* ``.jax``: the ``jax.export`` serialization (``jax.export.deserialize`` reloads it; it runs on
  the platforms it was exported for, CPU by default);
* ``.mlir``: its StableHLO text (``Exported.mlir_module()``), what IREE compiles;
* ``.stablehlo.mlirbc``: a StableHLO *portable artifact* (VHLO bytecode) at the version chosen with
  ``stablehlo_version`` (``--stablehlo-version``). The default is the version StableHLO names for
  its ``WEEK_12`` compatibility requirement, one at least 12 weeks old: any consumer built from
  StableHLO in the last 12 weeks (and, by StableHLO's backward-compatibility guarantee, for years
  after) deserializes it. JAX's own ``.jax`` artifacts target ``WEEK_4``.

``plan.json`` (see ``faxbridge.converters.plan``) says how the pieces make a round; the manifest gets the
blocks ``fb.verify`` reads and the StableHLO version written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from jax.extend import core as jcore
from jax.extend.mlir.dialects import stablehlo as shlo

from faxbridge.converters import plan as fplan
from faxbridge.extend import ExportError, emit, strip_locations

_REQUIREMENTS = {"week_12": "WEEK_12", "week_4": "WEEK_4", "max": "MAX", "none": "NONE"}


def _as_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in version.split("."))


def resolve_version(stablehlo_version: str | None = None) -> str:
  """The StableHLO version to write portable artifacts at.

  ``None`` means ``WEEK_12``; a requirement name (``week_12``, ``week_4``, ``max`` = the oldest
  version this StableHLO can write, ``none`` = the current one) or an explicit ``"1.13.7"`` within
  ``[get_minimum_version(), get_current_version()]``.

  Raises:
    ExportError: an unknown name or a version outside the range this jaxlib can write.
  """
  req = shlo.StablehloCompatibilityRequirement
  version = stablehlo_version or "week_12"
  key = version.lower().replace("-", "_")
  if key in _REQUIREMENTS:
    return shlo.get_version_from_compatibility_requirement(getattr(req, _REQUIREMENTS[key]))
  lo, hi = shlo.get_minimum_version(), shlo.get_current_version()
  try:
    wanted = _as_tuple(version)
  except ValueError:
    wanted = None
  if wanted is None or len(wanted) != 3 or not _as_tuple(lo) <= wanted <= _as_tuple(hi):
    raise ExportError(f"--stablehlo-version {stablehlo_version!r}: expected one of "
                      f"{sorted(_REQUIREMENTS)} or a version X.Y.Z between {lo} and {hi} "
                      "(the versions this jaxlib's StableHLO can write)")
  return version


def export_piece(piece) -> jax.export.Exported:
  """``jax.export`` of one piece: flat arguments in the piece's input order, all of them kept (so
  the StableHLO ``main`` takes exactly the inputs the plan lists), flat outputs in its order."""
  specs = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in piece.inputs]
  fn = jax.jit(jcore.jaxpr_as_fun(piece.jaxpr), keep_unused=True)
  # Without source locations: JAX would record file names (of the caller, of the checkout), and
  # an export must be the same bytes whoever makes it, from wherever.
  return strip_locations(jax.export.export(fn)(*specs))


def portable_artifact(mlir_text: str, version: str, where: str) -> bytes:
  """The StableHLO portable artifact of ``mlir_text`` at ``version``.

  Raises:
    ExportError: the module uses an op or attribute that did not exist at ``version``.
  """
  try:
    return shlo.serialize_portable_artifact_str(mlir_text, version)
  except Exception as e:  # the binding raises a bare error with MLIR's diagnostics
    raise ExportError(f"{where}: cannot write a StableHLO portable artifact at version {version} "
                      f"(the module needs a newer StableHLO; choose a later --stablehlo-version): "
                      f"{e}") from e


def export_stablehlo(split, out: Path, stablehlo_version: str | None = None,
                     **options: Any) -> dict:
  """Write every piece's ``.jax``, ``.mlir`` and ``.stablehlo.mlirbc`` and ``plan.json`` into
  ``out``; return the manifest part (plan file, StableHLO version, verify blocks).

  Raises:
    ExportError: unknown options, an unusable version, or a program that cannot be split.
  """
  if options:
    raise ExportError(f"the stablehlo target takes only stablehlo_version, not {sorted(options)}")
  version = resolve_version(stablehlo_version)

  def write(comp_name: str, piece) -> dict[str, str]:
    emit("stablehlo.lower", f"{comp_name}: lowering {piece.name} to StableHLO",
         computation=comp_name, piece=piece.name)
    stem = f"pieces/{comp_name}/{piece.name}"
    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    exported = export_piece(piece)
    text = exported.mlir_module()
    (out / f"{stem}.jax").write_bytes(exported.serialize())
    (out / f"{stem}.mlir").write_text(text)
    (out / f"{stem}.stablehlo.mlirbc").write_bytes(
        portable_artifact(text, version, f"{comp_name}/{piece.name}"))
    return {"jax": f"{stem}.jax", "stablehlo_text": f"{stem}.mlir",
            "stablehlo_portable": f"{stem}.stablehlo.mlirbc"}

  plan = fplan.build_plan(split, write)
  fplan.write_plan(plan, out)
  return {"plan": fplan.PLAN_FILE,
          "stablehlo": {"portable_version": version,
                        "current_version": shlo.get_current_version(),
                        "jax_calling_convention": jax.export.maximum_supported_calling_convention_version,
                        "platforms": ["cpu"]}}

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

Clients with their own data sizes (``fb.ragged``, docs/ragged.md): a client piece that takes a
ragged leaf is exported once for every size, its axis 0 symbolic (``jax.export``): ``b*k`` rows
with batch size ``b`` (``k`` rows without), one symbol ``k >= 1`` per count, so that leaves counted
together have one length. A runtime gives each client its own rows zero-padded to
``faxbridge.extend.own_length(count, b)`` (``plan.json``'s ``ragged`` block of the input says so).
All three files hold that one module, with ``jax.export``'s shape assertions (a length that is
not ``b*k`` with ``k >= 1`` fails the ``.jax`` call with JAX's message); IREE compiles them and
drops them (its StableHLO input conversion erases ``shape_assertion`` custom calls), so its
runtime relies on that padding. See :func:`piece_function` for how a fold over batches is lowered
so that IREE compiles it.

``plan.json`` (see ``faxbridge.converters.plan``) says how the pieces make a round; the manifest gets the
blocks ``fb.verify`` reads and the StableHLO version written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.extend.mlir.dialects import stablehlo as shlo
from jax.interpreters import partial_eval as pe

from faxbridge.converters import plan as fplan
from faxbridge.extend import (
  ExportError,
  RaggedSpec,
  batches_p,
  describe,
  emit,
  fold_p,
  strip_locations,
)

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


def export_piece(piece, ragged: Mapping[str, RaggedSpec] | None = None) -> jax.export.Exported:
  """``jax.export`` of one piece: flat arguments in the piece's input order, all of them kept (so
  the StableHLO ``main`` takes exactly the inputs the plan lists), flat outputs in its order.
  ``ragged``: the form's ragged input leaves by name (:func:`input_specs` says how they are
  exported); the piece's inputs among them get a symbolic axis 0."""
  ragged = {name: spec for name, spec in (ragged or {}).items()
            if name in {s.name for s in piece.inputs}}
  fn = jax.jit(piece_function(piece.jaxpr) if ragged else jcore.jaxpr_as_fun(piece.jaxpr),
               keep_unused=True)
  # Without source locations: JAX would record file names (of the caller, of the checkout), and
  # an export must be the same bytes whoever makes it, from wherever.
  return strip_locations(jax.export.export(fn)(*input_specs(piece, ragged)))


def input_specs(piece, ragged: Mapping[str, RaggedSpec]) -> list[jax.ShapeDtypeStruct]:
  """The piece's argument specs: its traced shapes, except axis 0 of a ragged leaf: ``b*k`` (batch
  size ``b``; ``k`` without one), ``k`` a symbol of its count (``data_count`` -> ``data_count_k``),
  shared by the leaves that count shares and at least 1 (jax.export's rule for a symbol).

  The multiple of ``b`` makes the batching exact (``[b*k, ...]`` -> ``[k, b, ...]``); the client's
  own length is ``count``, at most ``b*k``, which the runtime pads to (``own_length``)."""
  scope = jax.export.SymbolicScope()
  symbols: dict[str, Any] = {}
  specs = []
  for s in piece.inputs:
    spec = ragged.get(s.name)
    shape: tuple = s.shape
    if spec is not None:
      if spec.count not in symbols:
        symbols[spec.count], = jax.export.symbolic_shape(f"{spec.count}_k", scope=scope)
      shape = ((spec.batch_size or 1) * symbols[spec.count], *s.shape[1:])
    specs.append(jax.ShapeDtypeStruct(shape, s.dtype))
  return specs


# --------------------------------------------------------------------------------------------------
# A client piece over its own rows: the fold over batches as one loop that slices them.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Batches:
  """An output of ``batches_p`` on rows of symbolic length (``[b*k, ...]``), never made as an
  array: batch ``j`` of ``rows`` (or of the mask) is made by the fold step that reads it. Its
  values are ``batches_p``'s: rows past ``count`` are zeros, the mask marks the real ones."""

  rows: Any
  count: Any
  batch_size: int
  mask: bool = False

  @property
  def length(self) -> Any:
    """The number of batches, ``k`` (symbolic)."""
    return jnp.shape(self.rows)[0] // self.batch_size

  def batch(self, j) -> Any:
    b = self.batch_size
    real = j * b + lax.iota(jnp.int32, b) < self.count
    if self.mask:
      return real
    rows = lax.dynamic_slice_in_dim(self.rows, j * b, b)
    return jnp.where(real.reshape((b,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))


def _batches_rule(*args, batch_size: int) -> list:
  """``batches_p`` on rows of symbolic length: the batches and the mask left to the fold that
  reads them, and ``ceil(count / b)`` of the count clipped to the rows (as ``batches_p``)."""
  *leaves, count = args
  n = jnp.clip(count, 0, jnp.shape(leaves[0])[0]).astype(jnp.int32)
  return [*(_Batches(x, count, batch_size) for x in leaves),
          _Batches(leaves[0], count, batch_size, mask=True), (n + batch_size - 1) // batch_size]


def _fold_rule(*args, jaxpr: jcore.ClosedJaxpr, num_consts: int, num_carry: int) -> list:
  """``fold_p`` over a client's rows of symbolic length: ``fold_p``'s loop (``count`` steps of a
  while loop, the count clipped to the number of items) whose step ``j`` reads item ``j``: batch
  ``j`` sliced from the rows (batches left unmade, a :class:`_Batches`), or row ``j``.

  A carry that the step overwrites without reading it (DiLoCo's last batch loss) is kept as
  ``where(j < n, new, old)``, which is ``new`` on every step the loop runs: IREE 3.13 crashes
  (a segmentation fault in ConvertToStream's ``scf.while`` conversion) on a while loop whose body
  never reads a value it carries, as its canonicalization leaves the loop's two regions carrying
  different values. The select reads it at the cost of one select per such carry and step."""
  consts = list(args[:num_consts])
  init = list(args[num_consts: num_consts + num_carry])
  count = args[num_consts + num_carry]
  items = list(args[num_consts + num_carry + 1:])
  batched = [x for x in items if isinstance(x, _Batches)]
  n = jnp.clip(count, 0, batched[0].length if batched else jnp.shape(items[0])[0])
  step = jcore.jaxpr_as_fun(jaxpr)
  _, live = pe.dce_jaxpr(jaxpr.jaxpr, [True] * len(jaxpr.jaxpr.outvars))
  unread = [not used for used in live[num_consts: num_consts + num_carry]]

  def item(x, j):
    return x.batch(j) if isinstance(x, _Batches) else lax.dynamic_index_in_dim(x, j, 0, False)

  def body(state):
    j, carry = state
    new = step(*consts, *carry, *(item(x, j) for x in items))
    return j + 1, [jnp.where(j < n, x, old) if skip else x
                   for x, old, skip in zip(new, carry, unread, strict=True)]

  _, out = lax.while_loop(lambda s: s[0] < n, body, (jnp.zeros((), n.dtype), init))
  return out


def piece_function(closed: jcore.ClosedJaxpr) -> Callable[..., list]:
  """``closed`` (a client piece) as a function for ``jax.export`` with ragged leaves of symbolic
  length: ``jaxpr_as_fun``, except that a ``batches_p`` of such rows and the ``fb.fold`` over its
  batches become one loop whose step slices its batch from the rows.

  Why: ``batches_p`` reshapes ``[b*k, ...]`` into ``[k, b, ...]``, a ``stablehlo.dynamic_reshape``
  with a symbolic ``k``, which IREE (3.13) cannot compile ("failed to legalize operation
  'stablehlo.dynamic_reshape'"; nor a ``dynamic_update_slice`` into a ``[k, b, ...]`` buffer). A
  ``dynamic_slice`` of ``b`` rows it compiles, and the batches are never copied. The values are
  ``batches_p``'s and ``fb.fold``'s (``tests/test_ragged_stablehlo.py`` checks them against numpy,
  with NaN in the padding). A fold without batches is the same loop indexing the rows (as
  ``fold_p``'s own), so that every fold of the piece keeps the carries IREE needs read
  (:func:`_fold_rule`).

  Raises:
    ExportError: a fold over batches of another size than the ragged input's (its rows are
      exported as a multiple of that one), or batches of a client's rows read other than by
      ``fb.fold`` (the export's padding check refuses such a program first).
  """
  def run(*args) -> list:
    env: dict = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for eqn in closed.jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      lazy = any(isinstance(x, _Batches) for x in invals)
      if eqn.primitive is batches_p and not isinstance(jnp.shape(invals[0])[0], int):
        length, b = jnp.shape(invals[0])[0], eqn.params["batch_size"]
        if not isinstance(length % b, int):  # 8*k % 4 is 0; k % 4 is mod(k, 4)
          raise ExportError(
              f"fb.fold{describe(eqn.source_info)} runs over batches of {b} examples of an "
              f"fb.ragged input exported with {length} rows per client (its own batch size): "
              f"give fb.ragged(..., batch_size={b}), the batch size of the fold")
        outs = _batches_rule(*invals, **eqn.params)
      elif eqn.primitive is fold_p:
        outs = _fold_rule(*invals, **eqn.params)
      elif lazy:
        raise ExportError(f"the batches of a client's examples reach {eqn.primitive.name}, not "
                          "fb.fold: an export runs each client on its own examples")
      else:
        with eqn.ctx.manager:
          outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        outs = outs if eqn.primitive.multiple_results else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in closed.jaxpr.outvars]

  return run


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

  ragged = {name: {b.name: b.ragged for b in form.inputs if b.ragged is not None}
            for name, form in split.forms.items()}

  def write(comp_name: str, piece) -> dict[str, str]:
    emit("stablehlo.lower", f"{comp_name}: lowering {piece.name} to StableHLO",
         computation=comp_name, piece=piece.name)
    stem = f"pieces/{comp_name}/{piece.name}"
    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    exported = export_piece(piece, ragged[comp_name])
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

"""What the command line prints: leaf names as the user wrote them, tables of files and of verified
outputs, and the stages of a federated form as text. The round drawn as a page is
:mod:`faxbridge._src.drawing`, which names leaves with the functions here.

Only the CLI, the drawing and (through ``faxbridge.extend.user_name``) targets' error messages import
this module; nothing here changes what is exported or how it is compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from faxbridge._src.form import Binding, FederatedForm, Stage, TensorSpec


# --- names and sizes ----------------------------------------------------------------------------
def user_steps(binding: Binding, arg_names: Sequence[str], output: bool = False) -> list[str]:
  """A leaf as the user indexes it, step by step: ``['params', "['w1']"]``, ``['out', '[1]']``.

  Inputs start with the argument's name (the form's ``arg_names``, by the path's first step);
  outputs with ``out``. Dict keys and attributes are quoted, sequence items are indices. The
  drawing groups leaves by these steps (a model's 200 leaves under ``params``).
  """
  path = list(binding.path)
  if output:
    head = "out"
  elif path and isinstance(path[0], int) and path[0] < len(arg_names):
    head = arg_names[path.pop(0)]
  else:  # a form read back from JSON has no arg_names: the manifest name is what there is
    return [binding.name]
  return [head, *(f"[{k}]" if isinstance(k, int) else f"[{k!r}]" for k in path)]


def user_name(binding: Binding, arg_names: Sequence[str], output: bool = False) -> str:
  """A leaf as the user indexes it: ``params['w1']``, ``data['x']``, ``out[1]`` (see
  :func:`user_steps`)."""
  return "".join(user_steps(binding, arg_names, output))


def leaf_labels(form: FederatedForm) -> dict[str, str]:
  """Internal leaf name -> the user's name, for the leaves that are inputs or outputs."""
  labels = {b.name: user_name(b, form.arg_names) for b in form.inputs}
  labels.update({b.name: user_name(b, form.arg_names, output=True) for b in form.outputs})
  return labels


def shape_text(spec: TensorSpec) -> str:
  short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "uint32": "u32",
           "bool": "bool", "complex64": "c64"}
  return f"{short.get(spec.dtype, spec.dtype)}[{','.join(map(str, spec.shape))}]"


def size_text(n: int) -> str:
  """Bytes for people: ``848 B``, ``12.3 KiB``, ``4.0 MiB``."""
  if n < 1024:
    return f"{n} B"
  scaled = float(n)
  for unit in ("KiB", "MiB", "GiB"):
    scaled /= 1024
    if scaled < 1024 or unit == "GiB":
      return f"{scaled:.1f} {unit}"
  raise AssertionError("unreachable")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
  """Plain columns, two spaces apart; the columns in ``right`` are right-aligned (numbers)."""
  rows = [list(map(str, r)) for r in rows]
  right = set(right)
  widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

  def line(cells):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# --- export ---------------------------------------------------------------------------------------
def files_summary(out_dir: Path) -> str:
  """Every file of an export with its size, and the total."""
  files = sorted(p for p in out_dir.rglob("*") if p.is_file())
  sizes = [p.stat().st_size for p in files]
  rows = [(str(p.relative_to(out_dir)), size_text(s)) for p, s in zip(files, sizes)]
  rows.append((f"total: {len(files)} files", size_text(sum(sizes))))
  return table(["file", "size"], rows, right=[1])


# --- verify ---------------------------------------------------------------------------------------
def output_labels(manifest: dict) -> dict[str, str]:
  """Manifest output name -> the user's (``out_0_w1`` -> ``out[0]['w1']``), per computation."""
  labels = {}
  for name in ("computation", "initialize", "next"):
    block = manifest.get(name)
    for o in block.get("outputs", []) if isinstance(block, dict) else []:
      labels[o["name"]] = user_name(Binding.from_json(o), (), output=True)
  return labels


def _label(key: str, labels: dict[str, str]) -> str:
  """A report key (``NAME``, ``initialize/NAME``, ``round3/NAME``) with NAME as the user's."""
  prefix, _, name = key.rpartition("/")
  return f"{prefix}/{labels.get(name, name)}" if prefix else labels.get(name, name)


def verify_table(report, labels: dict[str, str] | None = None) -> str:
  """Per output (and per extra result set, e.g. TFF's MapReduceForm rebuild): max abs and max rel
  error and pass/FAIL with the reason; then the runtime's notes. ``labels`` (see
  :func:`output_labels`) shows outputs by the user's names."""
  from faxbridge._src.verify import ATOL, RTOL

  labels = labels or {}

  def row(name, c):
    name = _label(name, labels) if not name.startswith("[") else name
    return (name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
            "pass" if c.ok else f"FAIL ({c.problem or 'exceeds tolerance'})")

  rows = [row(c.name, c) for c in report.checks]
  for label, checks in report.extra_checks.items():
    if all(c.ok for c in checks):
      # A rebuilt form (TFF's MapReduceForm) repeats every output: one line when all agree.
      rows.append((f"[{label}] all {len(checks)} outputs",
                   f"{max((c.max_abs for c in checks), default=0.0):.3g}",
                   f"{max((c.max_rel for c in checks), default=0.0):.3g}", "pass"))
    else:
      rows += [row(f"[{label}] {_label(c.name, labels)}", c) for c in checks]
  lines = [table(["output", "max abs err", "max rel err", "result"], rows, right=[1, 2]),
           f"tolerance: |runtime - native| <= {ATOL:g} + {RTOL:g} * |native|; integers and "
           "booleans equal"]
  lines += [f"{key}: {value}" for key, value in sorted(report.info.items())]
  return "\n".join(lines)


def verdict(report, seconds: float, labels: dict[str, str] | None = None) -> str:
  checks = [*report.checks, *(c for cs in report.extra_checks.values() for c in cs)]
  bad = [_label(c.name, labels or {}) for c in checks if not c.ok]
  if not bad:
    return (f"OK: {len(checks)} output(s) on {report.runtime} equal native (max abs err "
            f"{report.max_abs:.3g}, max rel err {report.max_rel:.3g}) in {seconds:.1f} s")
  shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
  return f"MISMATCH: {len(bad)} of {len(checks)} output(s) on {report.runtime} differ: {shown}"


# --- inspect --------------------------------------------------------------------------------------
def _bindings(form: FederatedForm, bindings: Sequence[Binding], output: bool) -> list[tuple]:
  return [(user_name(b, form.arg_names, output), b.placement.value, shape_text(b.spec),
           size_text(b.spec.nbytes), b.name) for b in bindings]


def _aggregation_text(agg, labels: dict[str, str]) -> str:
  weight = f", weight {labels.get(agg.weight, agg.weight)}" if agg.weight else ""
  return (f"{agg.label}({labels.get(agg.value, agg.value)}{weight}) -> {agg.result.name} "
          f"{shape_text(agg.result)}")


def _broadcast_specs(stage: Stage) -> list[TensorSpec]:
  prep = {s.name: s for s in stage.server_prepare.outputs}
  return [prep[n] for n in stage.broadcasts]


def _upload_specs(stage: Stage) -> dict[str, TensorSpec]:
  return {s.name: s for s in stage.client_work.outputs if s.name in stage.uploads}


def _leaves_table(form: FederatedForm, bindings: Sequence[Binding], output: bool) -> str:
  if not bindings:
    return "  (none)"
  head = ["name", "placement", "shape", "bytes", "leaf"]
  return table(head, _bindings(form, bindings, output), right=[3])


def form_text(form: FederatedForm, title: str) -> str:
  """Inputs and outputs by the user's names, and each stage with what a client downloads and
  uploads."""
  labels = leaf_labels(form)
  where = (f"{len(form.stages)} stage(s), traced for {form.clients} clients" if form.stages
           else "runs on the server only (no round trip to clients)")
  lines = [f"{title}: {where}", "",
           "inputs (CLIENTS shapes are per client)", _leaves_table(form, form.inputs, False), "",
           "outputs", _leaves_table(form, form.outputs, True)]
  for stage, traffic in zip(form.stages, form.bytes_per_client()):
    lines += ["", f"stage {stage.index}: each client downloads {size_text(traffic['download'])} "
              f"and uploads {size_text(traffic['upload'])}"]
    for spec in _broadcast_specs(stage):
      lines.append(f"  broadcast  {labels.get(spec.name, spec.name)} {shape_text(spec)} "
                   f"({size_text(spec.nbytes)})")
    uploads = _upload_specs(stage)
    for agg in stage.aggregations:
      size = uploads[agg.value].nbytes if agg.value in uploads else 0
      lines.append(f"  aggregate  {_aggregation_text(agg, labels)} ({size_text(size)} up)")
  return "\n".join(lines + dp_lines(form))


_DP_LABELS = {"clip_norm": "clip norm", "noise_multiplier": "noise multiplier",
              "update_noise_multiplier": "update sum's noise multiplier",
              "clipped_count_stddev": "clipped count's noise stddev",
              "target_quantile": "target quantile", "clip_learning_rate": "clip learning rate"}


def dp_lines(form: FederatedForm) -> list[str]:
  """The DP mechanisms of ``form`` (``fb.dp_mean``, ``fb.dp_adaptive_mean``): mechanism, clip norm
  (a number or server state), noise multiplier, and which pieces clip and which add the noise."""
  from faxbridge._src.dp import form_mechanisms

  lines = []
  for d in form_mechanisms(form):
    lines += ["", f"differential privacy: {d['mechanism']} mechanism (Gaussian noise on the "
              "clipped sum)"]
    for key, label in _DP_LABELS.items():
      if key in d:
        value = d[key].replace("server_state", "server state (adapted each round)")
        lines.append(f"  {label}: {value}")
    lines.append(f"  clipping (client work): {', '.join(d['clipping_in']) or '-'}")
    lines.append(f"  noise (server only): {', '.join(d['noise_in']) or '-'}")
  return lines


def jaxpr_legend(traced, form: FederatedForm) -> str:
  """Which letter of ``traced.pretty()`` is which of the user's inputs (``a = params['b1']``): the
  jaxpr's inputs are the leaves in the order the form lists them."""
  from faxbridge._src.pretty import input_names

  return "where " + ", ".join(f"{letter} = {user_name(b, form.arg_names)}"
                              for letter, b in zip(input_names(traced), form.inputs))


__all__ = ["dp_lines", "files_summary", "form_text", "jaxpr_legend", "leaf_labels", "shape_text",
           "size_text", "table", "user_name", "user_steps", "verdict", "verify_table"]

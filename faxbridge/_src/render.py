"""What the command line prints and draws: leaf names as the user wrote them, tables of files and of
verified outputs, the stages of a federated form as text, and the round as a self-contained HTML page
with an inline SVG (no scripts, no external assets: it opens from a mail attachment or a CI artifact).

Only the CLI imports this module; nothing here changes what is exported or how it is compared.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from faxbridge._src.form import Binding, FederatedForm, Stage, TensorSpec


# --- names and sizes ----------------------------------------------------------------------------
def user_name(binding: Binding, arg_names: Sequence[str], output: bool = False) -> str:
  """A leaf as the user indexes it: ``params['w1']``, ``data['x']``, ``out[1]``.

  Inputs start with the argument's name (the form's ``arg_names``, by the path's first step);
  outputs with ``out``. Dict keys and attributes are quoted, sequence items are indices.
  """
  path = list(binding.path)
  if output:
    head = "out"
  elif path and isinstance(path[0], int) and path[0] < len(arg_names):
    head = arg_names[path.pop(0)]
  else:  # a form read back from JSON has no arg_names: the manifest name is what there is
    return binding.name
  return head + "".join(f"[{k}]" if isinstance(k, int) else f"[{k!r}]" for k in path)


def shape_text(spec: TensorSpec) -> str:
  short = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "uint32": "u32",
           "bool": "bool", "complex64": "c64"}
  return f"{short.get(spec.dtype, spec.dtype)}[{','.join(map(str, spec.shape))}]"


def size_text(n: int) -> str:
  """Bytes for people: ``848 B``, ``12.3 KiB``, ``4.0 MiB``."""
  if n < 1024:
    return f"{n} B"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"
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
  return (f"{agg.kind}({labels.get(agg.value, agg.value)}{weight}) -> {agg.result.name} "
          f"{shape_text(agg.result)}")


def _leaf_labels(form: FederatedForm) -> dict[str, str]:
  """Internal leaf name -> the user's name, for the leaves that are inputs or outputs."""
  labels = {b.name: user_name(b, form.arg_names) for b in form.inputs}
  labels.update({b.name: user_name(b, form.arg_names, output=True) for b in form.outputs})
  return labels


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
  labels = _leaf_labels(form)
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


# --- the round as SVG -----------------------------------------------------------------------------
_LINE = 16  # px per text line
_STAGE_W = 580  # room for a broadcast and an upload column of ~36 characters each


def _svg_text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
  cls_attr = f' class="{cls}"' if cls else ""
  return (f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}"{cls_attr}>'
          f"{html.escape(text)}</text>")


def _svg_box(x: float, y: float, w: float, h: float, title: str, sub: str, cls: str) -> list[str]:
  return [f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="8" class="{cls}"/>',
          _svg_text(x + w / 2, y + h / 2 - 3, title, "title", "middle"),
          _svg_text(x + w / 2, y + h / 2 + 14, sub, "sub", "middle")]


def _svg_arrow(x: float, y1: float, y2: float, cls: str, x2: float | None = None) -> str:
  """From (x, y1) to (x2 or x, y2), with an arrow head."""
  x2 = x if x2 is None else x2
  return (f'<line x1="{x:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" class="{cls}" '
          'marker-end="url(#head)"/>')


def round_svg(form: FederatedForm) -> str:
  """The round as an SVG: per stage, the server (its prepare piece) broadcasting down to the
  clients (their work piece) and the uploads aggregated back up; shapes and bytes on the edges."""
  labels = _leaf_labels(form)
  stages = []
  for stage, traffic in zip(form.stages, form.bytes_per_client()):
    down = [f"{labels.get(s.name, s.name)} {shape_text(s)}" for s in _broadcast_specs(stage)]
    uploads = _upload_specs(stage)
    up = [f"{agg.kind}: {labels.get(agg.value, agg.value)} "
          f"{shape_text(uploads[agg.value]) if agg.value in uploads else ''}".rstrip()
          + (f" w={labels.get(agg.weight, agg.weight)}" if agg.weight else "")
          for agg in stage.aggregations]
    stages.append((stage, traffic, down, up))
  edge_lines = max([len(d) + 1 for _, _, d, _ in stages] + [len(u) + 1 for _, _, _, u in stages]
                   + [1])
  box_h, top = 56, 40
  gap = max(120, edge_lines * _LINE + 40)
  clients_y = top + box_h + gap
  width = 40 + _STAGE_W * len(stages) + 260
  height = clients_y + box_h + 60
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="one round of {form.name}">',
           '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
  x = 20
  for stage, traffic, down, up in stages:
    box_w = _STAGE_W - 60
    parts.append(_svg_text(x, 24, f"stage {stage.index}", "stage"))
    parts += _svg_box(x, top, box_w, box_h, "SERVER", stage.server_prepare.name, "server")
    parts += _svg_box(x, clients_y, box_w, box_h, f"CLIENTS ({form.clients})",
                      stage.client_work.name, "clients")
    bx, ux = x + 30, x + box_w / 2 + 30
    parts.append(_svg_arrow(bx, top + box_h, clients_y, "down"))
    parts.append(_svg_text(bx + 8, top + box_h + 20,
                           f"broadcast {size_text(traffic['download'])} per client", "edge"))
    parts += [_svg_text(bx + 8, top + box_h + 20 + (i + 1) * _LINE, t, "leaf")
              for i, t in enumerate(down)]
    parts.append(_svg_arrow(ux, clients_y, top + box_h, "up"))
    parts.append(_svg_text(ux + 8, top + box_h + 20,
                           f"upload {size_text(traffic['upload'])} per client", "edge"))
    parts += [_svg_text(ux + 8, top + box_h + 20 + (i + 1) * _LINE, t, "leaf")
              for i, t in enumerate(up)]
    # The server's values carry on to the next stage (or to server_result): left to right.
    parts.append(_svg_arrow(x + box_w, top + box_h / 2, top + box_h / 2, "next", x + _STAGE_W))
    x += _STAGE_W
  outs = [labels.get(b.name, b.name) for b in form.outputs]
  parts += _svg_box(x, top, 220, box_h, "SERVER", form.server_result.name, "server")
  parts.append(_svg_text(x, top + box_h + 20, "outputs", "edge"))
  parts += [_svg_text(x, top + box_h + 20 + (i + 1) * _LINE, t, "leaf")
            for i, t in enumerate(outs[:edge_lines + 4])]
  parts.append("</svg>")
  return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
svg { border: 1px solid #ddd; background: #fcfcfc; }
svg text { font-family: ui-monospace, monospace; font-size: 12px; }
svg text.title { font-weight: bold; font-size: 14px; }
svg text.stage, svg text.edge { font-weight: bold; }
rect.server { fill: #e3eefc; stroke: #3a6fb0; }
rect.clients { fill: #e7f6e7; stroke: #3c8d3c; }
line.down { stroke: #3a6fb0; stroke-width: 2; }
line.up { stroke: #3c8d3c; stroke-width: 2; }
line.next { stroke: #888; stroke-width: 1.5; stroke-dasharray: 4 3; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; font-family: ui-monospace, monospace; }
td.n { text-align: right; }
"""


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()
                ) -> str:
  numeric = set(numeric)
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(
      f'<td class="n">{html.escape(str(c))}</td>' if i in numeric else f"<td>{html.escape(str(c))}</td>"
      for i, c in enumerate(r)) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def round_html(forms: dict[str, FederatedForm], title: str) -> str:
  """A page per program: for each computation (``next`` of a process, or the computation), the
  round drawn, then its inputs, outputs and stages as tables. Well-formed XML (XHTML), so it
  parses with any XML parser as well as in a browser."""
  sections = []
  head = ["name", "placement", "shape", "bytes", "leaf"]
  for name, form in forms.items():
    labels = _leaf_labels(form)
    stage_rows = []
    for stage, traffic in zip(form.stages, form.bytes_per_client()):
      stage_rows.append((str(stage.index),
                         ", ".join(labels.get(n, n) for n in stage.broadcasts) or "-",
                         "; ".join(_aggregation_text(a, labels) for a in stage.aggregations) or "-",
                         size_text(traffic["download"]), size_text(traffic["upload"])))
    sections.append(
        f"<h2>{html.escape(name)}: {len(form.stages)} stage(s), {form.clients} clients</h2>"
        + (round_svg(form) if form.stages else "<p>server only: no round trip to clients</p>")
        + "<h3>inputs</h3>" + _html_table(head, _bindings(form, form.inputs, False), [3])
        + "<h3>outputs</h3>" + _html_table(head, _bindings(form, form.outputs, True), [3])
        + "<h3>stages</h3>" + _html_table(
            ["stage", "broadcast", "aggregations", "download per client", "upload per client"],
            stage_rows, [3, 4])
        + "".join(f"<p>{html.escape(line)}</p>" for line in dp_lines(form) if line))
  return ("<!DOCTYPE html>\n"
          '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>'
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>\n")


__all__ = ["dp_lines", "files_summary", "form_text", "jaxpr_legend", "round_html", "round_svg",
           "size_text", "table", "user_name", "verdict", "verify_table"]

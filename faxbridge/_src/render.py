"""What the command line prints: leaf names as the user wrote them, tables of files and of verified
outputs, and the stages of a federated form as text. The round drawn as a page is
:mod:`faxbridge._src.drawing`, which names leaves with the functions here.

The CLI, the drawing, a verification report's ``str`` (so ``print(report)`` and ``faxbridge verify``
print the same text) and (through ``faxbridge.extend.user_name``) targets' error messages import
this module; nothing here changes what is exported or how it is compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from faxbridge._src.form import Aggregation, Binding, FederatedForm, Piece, Stage, TensorSpec


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


def count_text(n: int, what: str) -> str:
  """``"1 stage"``, ``"3 stages"``: a count with its noun (no ``"stage(s)"``)."""
  return f"{n} {what}{'' if n == 1 else 's'}"


def _number(x: float, digits: int = 3) -> str:
  return "inf" if x == float("inf") else f"{x:.{digits}g}"


def _outputs_text(report) -> str:
  """What one run's outputs are: ``14 outputs: initialize's 4, then next's 5 in each of 2
  rounds``, or ``2 outputs``."""
  total = count_text(len(report.checks), "output")
  if not report.rounds:
    return total
  first = sum(c.name.startswith("initialize/") for c in report.checks)
  per_round = (len(report.checks) - first) // report.rounds
  rounds = "in 1 round" if report.rounds == 1 else f"in each of {report.rounds} rounds"
  return f"{total}: initialize's {first}, then next's {per_round} {rounds}"


def _runs(report) -> list[str]:
  """The runs compared with native: the runtime's own, then each further one it made."""
  return [report.runtime, *report.extra_checks]


def verification_text(report, seconds: float | None = None) -> str:
  """A :class:`~faxbridge._src.verify.VerificationReport` for a person: what ran and what it was
  compared with; a row per output (per further run, e.g. TFF's round rebuilt from its
  MapReduceForm, one row when all of its outputs pass) with its largest absolute and relative
  error and ``err / bound``, its margin against the tolerance, so ``pass`` and ``FAIL`` can be
  read off the row; what the tolerance is; the runtime's notes by label; and a verdict saying what
  was counted. ``seconds`` (the command line's clock) ends the verdict. ``print(report)`` and
  ``faxbridge verify`` both print this."""
  labels = report.labels

  def row(name: str, c) -> tuple[str, ...]:
    return (name, _number(c.max_abs), _number(c.max_rel), _number(c.max_ratio, 2),
            "pass" if c.ok else f"FAIL ({c.problem or 'exceeds tolerance'})")

  rows = [row(_label(c.name, labels), c) for c in report.checks]
  for run, checks in report.extra_checks.items():
    if checks and all(c.ok for c in checks):
      # A further run repeats every output: one line when all pass.
      worst = max(checks, key=lambda c: c.max_ratio)
      rows.append(row(f"[{run}] all {count_text(len(checks), 'output')}", _worst_of(checks, worst)))
    else:
      rows += [row(f"[{run}] {_label(c.name, labels)}", c) for c in checks]
  bound = f"{report.atol:g} + {report.rtol:g} * |native|"
  lines = [f"{report.export_dir} on {report.runtime} against the export's native program (native/), "
           f"{_outputs_text(report)}", "",
           table(["output", "max abs err", "max rel err", "err / bound", "result"], rows,
                 right=[1, 2, 3]), "",
           f"pass: every element within {bound} (floats) or equal (integers, booleans), with "
           "native's dtype and shape",
           f"err / bound: an output's largest |runtime - native| / ({bound}); at most 1 passes"]
  if report.extra_checks:
    lines.append(f"[run]: a further run {report.runtime} made, each output compared with native "
                 "as above (one row when all pass)")
  if report.info:
    lines += ["", f"about the run on {report.runtime}:"]
    width = max(len(str(k)) for k in report.info)
    lines += [f"  {k!s:{width}s}  {v}" for k, v in report.info.items()]
  return "\n".join([*lines, "", verdict(report, seconds)])


def _worst_of(checks, worst):
  """One row standing for ``checks``: each column's largest value."""
  return dataclasses.replace(worst, max_abs=max(c.max_abs for c in checks),
                             max_rel=max(c.max_rel for c in checks))


def verdict(report, seconds: float | None = None) -> str:
  """One line: OK or MISMATCH, counting the comparisons (outputs x runs), the worst margin and
  where, and the time when ``seconds`` is given."""
  labels = report.labels
  runs = _runs(report)
  per_run = count_text(len(report.checks), "output")
  checks = report.all_checks()
  if len(runs) == 1:
    counted = f"{per_run} on {report.runtime}"
  else:
    counted = (f"{len(report.checks)} outputs x {len(runs)} runs ({'; '.join(runs)}) = "
               f"{len(checks)} comparisons")
  took = f"; {seconds:.1f} s in all" if seconds is not None else ""

  def where(c) -> str:
    for run, extra in report.extra_checks.items():
      if any(e is c for e in extra):
        return f"{_label(c.name, labels)} of [{run}]"
    return _label(c.name, labels)

  bad = [c for c in checks if not c.ok]
  if not bad:
    worst = max(checks, key=lambda c: c.max_ratio, default=None)
    margin = f"; largest err / bound {_number(worst.max_ratio, 2)}, at {where(worst)}" if worst else ""
    if len(runs) > 1:
      return f"OK: {counted}, all equal to native{margin}{took}"
    every, equal = ("", "equals") if len(checks) == 1 else ("all ", "equal")
    return f"OK: {every}{counted} {equal} native{margin}{took}"
  shown = ", ".join(where(c) for c in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
  differ = "differs" if len(bad) == 1 else "differ"
  return f"MISMATCH: {len(bad)} of {counted} {differ} from native: {shown}{took}"


# --- inspect --------------------------------------------------------------------------------------
def piece_sources(piece: Piece) -> dict[str, tuple[frozenset[str], bool]]:
  """Per output of ``piece``: the inputs it is computed from, and whether it *is* one of them
  (passed on unchanged). Empty for a piece read back from JSON (no jaxpr)."""
  if piece.jaxpr is None:
    return {}
  from jax.extend import core as jcore

  jaxpr = piece.jaxpr.jaxpr
  deps: dict = {v: frozenset([s.name]) for v, s in zip(jaxpr.invars, piece.inputs)}
  for eqn in jaxpr.eqns:  # an equation's outputs depend on all its inputs (conservative)
    used = frozenset().union(*(deps.get(a, frozenset()) for a in eqn.invars
                               if not isinstance(a, jcore.Literal)))
    deps.update((v, used) for v in eqn.outvars)
  invars = set(jaxpr.invars)
  return {s.name: (frozenset(), False) if isinstance(v, jcore.Literal)
          else (deps.get(v, frozenset()), v in invars)
          for v, s in zip(jaxpr.outvars, piece.outputs)}


def aggregate_uses(form: FederatedForm) -> dict[str, list[str]]:
  """Per aggregate (internal name): the outputs and later stages' broadcasts computed from it,
  broadcasts first (internal names). This is the link from one stage's aggregate to the next
  stage's broadcast; empty lists for a form read back from JSON (its pieces have no jaxpr)."""
  reach: dict[str, set[str]] = {}
  for piece in [s.server_prepare for s in form.stages[1:]] + [form.server_result]:
    for out, (ins, _) in piece_sources(piece).items():
      for i in ins:
        reach.setdefault(i, set()).add(out)
  out_names = {b.name for b in form.outputs}
  broadcasts = {n for s in form.stages for n in s.broadcasts}

  def closure(name: str) -> set[str]:
    seen, todo = {name}, [name]  # an aggregate broadcast as it is reaches itself
    while todo:
      for nxt in reach.get(todo.pop(), ()):
        if nxt not in seen:
          seen.add(nxt)
          todo.append(nxt)
    return seen

  uses = {}
  for stage in form.stages:
    later = {n for s in form.stages[stage.index + 1:] for n in s.broadcasts}
    for agg in stage.aggregations:
      found = [n for n in closure(agg.result.name) if n in out_names or n in later]
      uses[agg.result.name] = sorted(found, key=lambda n: (n not in broadcasts, n))
  return uses


def server_labels(form: FederatedForm) -> dict[str, str]:
  """:func:`leaf_labels` and each aggregate as the user named it (``mean_delta['w1']``): every
  server value people may meet in ``inspect`` or the drawing, by internal name."""
  labels = leaf_labels(form)
  for stage in form.stages:
    for agg in stage.aggregations:
      labels.setdefault(agg.result.name, agg.user_result)
  return labels


def _bindings(form: FederatedForm, bindings: Sequence[Binding], output: bool) -> list[tuple]:
  return [(user_name(b, form.arg_names, output), b.placement.value, shape_text(b.spec),
           size_text(b.spec.nbytes), b.name) for b in bindings]


def _aggregation_text(agg: Aggregation, labels: dict[str, str], becomes: Sequence[str],
                      size: int) -> str:
  """``weighted_mean(deltas['w1'], weight weights) -> mean_delta['w1'] f32[64,32] (8.0 KiB up)``,
  then the internal names (plan.json's) in brackets; a result the user did not name is shown with
  the one output it becomes (``-> aggregate4 = out[1]``)."""
  # An upload that is a client input as is shows as that input (data['n']).
  weight = f", weight {labels.get(agg.weight, agg.user_weight)}" if agg.weight else ""
  result = agg.user_result
  if "result" not in agg.names and len(becomes) == 1:
    result = f"{result} = {becomes[0]}"
  leaves = ", ".join([agg.value, *([agg.weight] if agg.weight else [])])
  return (f"{agg.label}({labels.get(agg.value, agg.user_value)}{weight}) -> {result} "
          f"{shape_text(agg.result)} ({size_text(size)} up) [{leaves} -> {agg.result.name}]")


def _broadcast_specs(stage: Stage) -> list[TensorSpec]:
  prep = {s.name: s for s in stage.server_prepare.outputs}
  return [prep[n] for n in stage.broadcasts]


def _upload_specs(stage: Stage) -> dict[str, TensorSpec]:
  return {s.name: s for s in stage.client_work.outputs if s.name in stage.uploads}


def ragged_note(binding: Binding, form: FederatedForm) -> str:
  """What a ragged input leaf's (``fb.ragged``) shape means: its traced length is a bound, and a
  client holds, sends to a runtime and reads only its own first ``count`` rows."""
  spec = binding.ragged
  assert spec is not None, binding.name
  count = next(b for b in form.inputs if b.name == spec.count)
  return f"own rows: the first {user_name(count, form.arg_names)} of at most {spec.max_length}"


def ragged_tag(binding: Binding) -> str:
  """:func:`ragged_note` short enough for a tag beside the leaf (the count is its sibling leaf)."""
  assert binding.ragged is not None, binding.name
  return f"own rows, at most {binding.ragged.max_length}"


def _leaves_table(form: FederatedForm, bindings: Sequence[Binding], output: bool) -> str:
  if not bindings:
    return "  (none)"
  head = ["name", "placement", "shape", "bytes", "leaf"]
  return table(head, _bindings(form, bindings, output), right=[3])


def form_text(form: FederatedForm, title: str) -> str:
  """Inputs and outputs by the user's names, and each stage with what a client downloads and
  uploads."""
  labels = leaf_labels(form)
  uses = aggregate_uses(form)
  shown = server_labels(form)
  made_by = {a.result.name: (stage.index, a) for stage in form.stages for a in stage.aggregations}
  fed_by: dict[str, list[str]] = {}  # broadcast -> the earlier aggregates it is computed from
  for name, used in uses.items():
    for n in used:
      fed_by.setdefault(n, []).append(name)
  where = (f"{count_text(len(form.stages), 'stage')}, traced for {form.clients} clients" if form.stages
           else "runs on the server only (no round trip to clients)")
  lines = [f"{title}: {where}", "",
           "inputs (CLIENTS shapes are per client)", _leaves_table(form, form.inputs, False)]
  # A ragged leaf's row shows its traced (padded) length: say what a client really holds.
  lines += [f"  {user_name(b, form.arg_names)}: {ragged_note(b, form)}"
            for b in form.inputs if b.ragged is not None]
  lines += ["", "outputs", _leaves_table(form, form.outputs, True)]
  for stage, traffic in zip(form.stages, form.bytes_per_client()):
    lines += ["", f"stage {stage.index}: each client downloads {size_text(traffic['download'])} "
              f"and uploads {size_text(traffic['upload'])}"]
    for spec in _broadcast_specs(stage):
      link = ""
      if spec.name in made_by:  # an aggregate of an earlier stage, broadcast as it is
        k, agg = made_by[spec.name]
        link = f" <- the aggregate {agg.label}({agg.user_value}) of stage {k}"
      elif spec.name in fed_by:
        froms = ", ".join(f"{shown[n]} (stage {made_by[n][0]})" for n in fed_by[spec.name])
        link = f" <- computed from the aggregate(s) {froms}"
      lines.append(f"  broadcast  {shown.get(spec.name, spec.name)} {shape_text(spec)} "
                   f"({size_text(spec.nbytes)}){link}")
    uploads = _upload_specs(stage)
    broadcast_in = {n: s.index for s in form.stages for n in s.broadcasts}
    for agg in stage.aggregations:
      size = uploads[agg.value].nbytes if agg.value in uploads else 0
      used = uses[agg.result.name]
      outputs = [shown.get(n, n) for n in used if n not in broadcast_in]
      lines.append(f"  aggregate  {_aggregation_text(agg, labels, outputs, size)}")
      for n in (n for n in used if n in broadcast_in):  # the link to a later stage
        what = "as it is" if n == agg.result.name else f"in {shown.get(n, n)}"
        lines.append(f"             -> broadcast {what} in stage {broadcast_in[n]}")
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


__all__ = ["aggregate_uses", "count_text", "dp_lines", "files_summary", "form_text", "jaxpr_legend",
           "leaf_labels", "piece_sources", "server_labels", "shape_text", "size_text", "table",
           "user_name", "user_steps", "verdict", "verification_text"]

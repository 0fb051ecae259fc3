"""The round drawn: ``faxbridge inspect PROGRAM --html FILE`` as one page for a paper or a review.

A federated form (:mod:`faxbridge._src.form`) becomes a swimlane figure: the server on top, the
clients below, one framed column pair per stage (``server_prepare`` -> broadcast -> ``client_work``
-> upload -> aggregations), then ``server_result`` and the outputs. Under the figure: every
aggregation as a row, the DP mechanism, and the inputs and outputs. A computation without stages
(``initialize`` of an iterative process) is drawn as what it is: one server piece.

The browser does the layout (CSS grid and flex boxes; arrows are CSS borders whose size does not
depend on any text), so a long leaf name wraps inside its card instead of running into the next
one, and the page fits any window from about 1000 px. Long leaf lists are grouped by the user's
pytree (``params`` with 200 leaves is one line with its count and bytes, expandable with
``<details>``). The page is self-contained (inline CSS; no scripts, fonts or other files: it opens
from a mail attachment or a CI artifact) and well-formed XHTML, so XML parsers read it too.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from faxbridge._src.form import Aggregation, FederatedForm, Piece, Stage, TensorSpec
from faxbridge._src.placements import CLIENTS
from faxbridge._src.render import (
  aggregate_uses,
  count_text,
  piece_sources,
  ragged_tag,
  server_labels,
  shape_text,
  size_text,
  user_steps,
)

_FIGURE_ROWS = 8  # rows a leaf list in the figure shows before it collapses its groups
_TABLE_ROWS = 24  # the same for the lists under the figure


def _e(text: object) -> str:
  return html.escape(str(text), quote=True)


def _name(text: object) -> str:
  """A name as escaped text that may wrap after ``_`` and before ``[`` (``stage0_server_<wbr/>
  prepare``) rather than anywhere, when its column is narrow."""
  return re.sub(r"_|(?=\[)", lambda m: m.group(0) + "<wbr/>", _e(text))


# --- what the pieces compute from what ---------------------------------------------------------
def _operations(piece: Piece) -> int | None:
  """The JAX operations a piece runs, nested ones included (None without a jaxpr)."""
  if piece.jaxpr is None:
    return None
  from jax.extend import core as jcore

  def count(jaxpr) -> int:
    return sum(1 + sum(count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
                       for sub in jcore.jaxprs_in_params(e.params)) for e in jaxpr.eqns)

  return count(piece.jaxpr.jaxpr)


@dataclasses.dataclass
class _Flow:
  """Where values go: for each aggregate, the outputs and later broadcasts computed from it
  (``used_by``, internal names); for each upload that is a client input passed on unchanged, that
  input as the user names it (``alias``)."""

  used_by: dict[str, list[str]]
  alias: dict[str, str]
  labels: Mapping[str, str]
  broadcast_stage: Mapping[str, int]

  def describe(self, name: str) -> str:
    """A server value for people: an output as the user names it, a broadcast with its stage."""
    if name in self.broadcast_stage:
      return f"stage {self.broadcast_stage[name]} broadcast {self.labels.get(name, name)}"
    return self.labels.get(name, name)


def _flow(form: FederatedForm) -> _Flow:
  """Where each aggregate goes (:func:`faxbridge._src.render.aggregate_uses`), the user's names of
  server values (:func:`faxbridge._src.render.server_labels`), and uploads that are client inputs
  passed on unchanged."""
  labels = server_labels(form)
  broadcasts = {n: s.index for s in form.stages for n in s.broadcasts}
  used_by = {name: sorted(used, key=lambda n: (n not in broadcasts, labels.get(n, n)))
             for name, used in aggregate_uses(form).items()}
  alias = {}
  for stage in form.stages:
    for out, (ins, unchanged) in piece_sources(stage.client_work).items():
      if unchanged and out in stage.uploads and next(iter(ins)) in labels:
        alias[out] = labels[next(iter(ins))]
  return _Flow(used_by, alias, labels, broadcasts)


# --- leaf lists, grouped by the user's pytree -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Leaf:
  """A value in a list: its name step by step (``('params', "['w1']")``; the steps are the groups),
  its spec, and a note on what it is or becomes."""

  steps: tuple[str, ...]
  spec: TensorSpec
  note: str = ""


@dataclasses.dataclass
class _Entry:
  label: str
  leaves: list[_Leaf]
  children: list[_Entry] | None = None  # None: one leaf

  @property
  def nbytes(self) -> int:
    return sum(leaf.spec.nbytes for leaf in self.leaves)


def _entries(leaves: Sequence[_Leaf], depth: int = 0) -> list[_Entry]:
  """The tree of ``leaves`` below ``depth`` steps: leaves that share a step form a group, and a
  group with one child is merged with it (``out[0]`` rather than ``out`` > ``[0]``)."""
  groups: dict[object, list[_Leaf]] = {}
  for i, leaf in enumerate(leaves):
    key = leaf.steps[depth] if len(leaf.steps) > depth + 1 else ("leaf", i)
    groups.setdefault(key, []).append(leaf)
  out = []
  for members in groups.values():
    if len(members) == 1:
      out.append(_Entry("".join(members[0].steps[depth:]), members))
      continue
    end = depth + 1
    while (all(len(m.steps) > end + 1 for m in members)
           and len({m.steps[end] for m in members}) == 1):
      end += 1
    label = "".join(members[0].steps[depth:end]).removesuffix(": ")  # a role: "weight: "
    out.append(_Entry(label, list(members),
                      _entries(members, end)))
  return out


def _opened(roots: list[_Entry], budget: int) -> set[int]:
  """Groups shown open: breadth first, each while the rows shown stay within ``budget``."""
  rows, opened = len(roots), set()
  queue = [e for e in roots if e.children]
  while queue:
    e = queue.pop(0)
    assert e.children is not None
    if rows + len(e.children) <= budget:
      opened.add(id(e))
      rows += len(e.children)
      queue += [c for c in e.children if c.children]
  return opened


def _leaf_list(leaves: Sequence[_Leaf], budget: int, full: bool = False) -> str:
  """``leaves`` as rows (name, shape; with ``full`` also the note, bytes and internal leaf name),
  groups as ``<details>`` with their count and bytes, open while they fit ``budget`` rows."""
  if not leaves:
    return '<p class="none">none</p>'
  roots = _entries(leaves)
  plain = [e for e in roots if e.children is None and len(e.leaves[0].steps) == 1]
  if len(roots) > budget and len(plain) > 1:
    # Values with no pytree of the user's (state0, state1, ...) fold into one group too.
    folded = _Entry(f"{plain[0].label} … {plain[-1].label}", [e.leaves[0] for e in plain], plain)
    roots = [folded if e is plain[0] else e for e in roots if e is plain[0] or e not in plain]
  opened = _opened(roots, budget)

  def row(e: _Entry) -> str:
    if e.children is None:
      leaf = e.leaves[0]
      tag = f' <span class="tag">{_e(leaf.note)}</span>' if full and leaf.note else ""
      cells = [f'<span class="n"><code>{_name(e.label)}</code>{tag}</span>']
      cells.append(f'<code class="shape">{_e(shape_text(leaf.spec))}</code>')
      if full:
        cells += [f'<span class="bytes">{_e(size_text(leaf.spec.nbytes))}</span>',
                  f'<code class="leaf">{_e(leaf.spec.name)}</code>']
      return f'<div class="row">{"".join(cells)}</div>'
    assert e.children is not None
    is_open = ' open="open"' if id(e) in opened else ""
    count = f"{len(e.leaves)} leaves · {size_text(e.nbytes)}"
    return (f'<details{is_open}><summary><span class="row group"><code class="n">{_name(e.label)}</code>'
            f'<span class="count">{_e(count)}</span></span></summary>'
            f'<div class="kids">{"".join(row(c) for c in e.children)}</div></details>')

  cls = "leaves full" if full else "leaves"
  return f'<div class="{cls}">{"".join(row(e) for e in roots)}</div>'


def _named_leaves(specs: Iterable[TensorSpec], form: FederatedForm) -> list[_Leaf]:
  """Values crossing a piece boundary: inputs and outputs by the user's steps, others by name."""
  inputs = {b.name: b for b in form.inputs}
  outputs = {b.name: b for b in form.outputs}
  labels = server_labels(form)  # an aggregate as the user named it (mean_delta['w1'])
  out = []
  for s in specs:
    if s.name in inputs:
      steps = tuple(user_steps(inputs[s.name], form.arg_names))
    elif s.name in outputs:
      steps = tuple(user_steps(outputs[s.name], form.arg_names, output=True))
    else:
      steps = (labels.get(s.name, s.name),)
    out.append(_Leaf(steps, s))
  return out


def _broadcast_leaves(stage: Stage, form: FederatedForm, flow: _Flow) -> list[_Leaf]:
  """A stage's broadcasts: inputs by the user's steps; an earlier stage's aggregate (or a value
  computed from aggregates) by the user's name with the link to where it was aggregated
  (``mean ← aggregate of stage 0``)."""
  prep = {s.name: s for s in stage.server_prepare.outputs}
  specs = [prep[n] for n in stage.broadcasts]
  stage_of = {a.result.name: s.index for s in form.stages for a in s.aggregations}
  fed_by: dict[str, list[str]] = {}
  for name, used in flow.used_by.items():
    for n in used:
      fed_by.setdefault(n, []).append(name)
  out = []
  for leaf in _named_leaves(specs, form):
    name = leaf.spec.name
    if name in stage_of:
      steps: tuple[str, ...] = (f"{flow.labels.get(name, name)} ← aggregate of stage {stage_of[name]}",)
    elif name in fed_by:
      froms = ", ".join(flow.labels.get(n, n) for n in fed_by[name])
      stages = sorted({stage_of[n] for n in fed_by[name]})
      steps = (f"{flow.labels.get(name, name)} ← from {froms} (stage "
               f"{', '.join(map(str, stages))})",)
    else:
      steps = leaf.steps
    out.append(dataclasses.replace(leaf, steps=steps))
  return out


def _upload_leaves(stage: Stage, flow: _Flow) -> list[_Leaf]:
  """A stage's uploads grouped by what aggregates them (``weighted_mean``, its ``weight``), each
  named as the user wrote it where the aggregation says (``deltas['w1']``, ``weights``: see
  :attr:`faxbridge._src.form.Aggregation.names`), else as the client input it is (``data['n']``),
  else by its internal name."""
  # An upload is computed by the client work, or is one of its inputs (a client's data) as is.
  specs = {s.name: s for s in stage.client_work.inputs + stage.client_work.outputs}
  role: dict[str, tuple[str, str]] = {}
  for agg in stage.aggregations:
    role.setdefault(agg.value, (agg.label, agg.names.get("value", "")))
    if agg.weight:
      role.setdefault(agg.weight, ("weight", agg.names.get("weight", "")))
  out = []
  for name in stage.uploads:
    kind, user = role.get(name, ("upload", ""))
    # A client input uploaded as is is that input (data[1]); a map output that passes one on
    # unchanged is the user's name and that input (weights = data['num_examples']).
    alias = flow.alias.get(name)
    shown = flow.labels.get(name) or (f"{user} = {alias}" if user and alias and user != alias
                                      else user or alias or name)
    out.append(_Leaf((f"{kind}: ", shown), specs[name]))
  return out


def _result_leaf(form: FederatedForm, agg: Aggregation, flow: _Flow) -> _Leaf:
  """An aggregate named by what it becomes: the one output or later broadcast computed from it
  (``out[0]['w1']``, ``stage 1 broadcast mean``), else as the user named it (``mean_delta['w1']``),
  else its own name (it feeds several)."""
  used = flow.used_by.get(agg.result.name, [])
  outputs = {b.name: b for b in form.outputs}
  if len(used) == 1 and used[0] in outputs:
    return _Leaf(tuple(user_steps(outputs[used[0]], form.arg_names, True)), agg.result)
  if len(used) == 1:
    return _Leaf((flow.describe(used[0]),), agg.result)
  return _Leaf((agg.user_result,), agg.result)


# --- DP ---------------------------------------------------------------------------------------------
_GAUSSIAN = "Gaussian noise on the clipped sum"


def _mechanism_params(d: Mapping[str, Any]) -> dict[str, str]:
  """A mechanism's parameters (:func:`faxbridge._src.dp.form_mechanisms`), without where it runs."""
  return {k: v for k, v in d.items() if k not in ("mechanism", "noise_in", "clipping_in")}


def _dp_badges(piece: Piece, mechanisms: list[dict]) -> str:
  """Where ``piece`` clips (client work) or adds noise (server), with the mechanism's parameters."""
  out = []
  for d in mechanisms:
    params = _mechanism_params(d)
    if piece.name in d["clipping_in"]:
      clip = {"C (clip norm)": _value_text(params["clip_norm"])} if "clip_norm" in params else {}
      out.append(_badge("DP clip", "each client scales its update to L2 norm ≤ C", clip))
    if piece.name in d["noise_in"]:
      text = f"{d['mechanism']}: {_GAUSSIAN}"
      if piece.name == d["noise_in"][0]:  # the parameters once, where the noise starts
        rest = {k.replace("_", " "): _value_text(v) for k, v in params.items() if k != "clip_norm"}
      else:
        text, rest = f"{text} (continued from {d['noise_in'][0]})", {}
      out.append(_badge("DP noise", text, rest))
  return "".join(out)


def _value_text(value: str) -> str:
  return "server state (adapted each round)" if value == "server_state" else value


def _badge(tag: str, text: str, params: Mapping[str, str]) -> str:
  items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in params.items())
  return (f'<div class="dp"><div class="dp-h"><span class="tag">{_e(tag)}</span> {_e(text)}</div>'
          + (f"<dl>{items}</dl>" if items else "") + "</div>")


def _dp_table(mechanisms: list[dict]) -> str:
  if not mechanisms:
    return ""
  rows = []
  for d in mechanisms:
    rows.append(("mechanism", f"{d['mechanism']} ({_GAUSSIAN})"))
    rows += [(k.replace("_", " "), _value_text(v)) for k, v in _mechanism_params(d).items()]
    rows.append(("clipping (client work)", ", ".join(d["clipping_in"]) or "-"))
    rows.append(("noise (server only)", ", ".join(d["noise_in"]) or "-"))
  body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
  return (f'<section class="panel dp-panel"><h3>Differential privacy</h3>'
          f'<table class="kv-table">{body}</table></section>')


# --- the figure ---------------------------------------------------------------------------------
def _cell(row: int | str, col: int | str, body: str, cls: str) -> str:
  return f'<div class="{cls}" style="grid-row: {row}; grid-column: {col}">{body}</div>'


def _piece_head(kicker: str, piece: Piece) -> str:
  ops = _operations(piece)
  if ops is None:  # read back from JSON: no jaxpr to count
    what = ""
  elif ops == 0:
    what = "passes its inputs on (no computation)" if piece.inputs else "returns constants"
  else:
    what = count_text(ops, "JAX operation")
  return (f'<div class="kicker">{_e(kicker)}</div><div class="title"><code>{_name(piece.name)}</code>'
          f'</div>' + (f'<div class="what">{_e(what)}</div>' if what else ""))


def _io(label: str, body: str) -> str:
  return f'<div class="io"><div class="io-h">{_e(label)}</div>{body}</div>'


def _figure(form: FederatedForm, flow: _Flow, mechanisms: list[dict]) -> str:
  """The swimlane grid: a lane column, two columns per stage (prepare over the broadcast, the
  aggregations over the upload; client work spans both), the result; rows: stage heads, server,
  wires, clients."""
  stages = form.stages
  cols = 2 * len(stages) + 2  # lane labels, two per stage, the result
  parts = [
      _cell(2, 1, '<span>Server</span>', "lane server"),
      _cell(4, 1, "<span>Clients</span>"
            + (f"<small>{_e(form.clients)} in this trace</small>" if form.clients else ""),
            "lane clients"),
      _cell(2, f"2 / {cols + 1}", "", "band server"),
      _cell(4, f"2 / {cols + 1}", "", "band clients"),
  ]
  traffic = form.bytes_per_client()
  for stage in stages:
    c = 2 + 2 * stage.index
    parts.append(_cell("1 / 5", f"{c} / span 2", "", "frame"))
    parts.append(_cell(1, f"{c} / span 2", f"stage {stage.index}", "stage-head"))
    prep = stage.server_prepare
    kept = [s for s in prep.outputs if s.name not in stage.broadcasts]
    reads = _named_leaves(prep.inputs, form)
    # What it reads is listed by group only: the leaves show on the broadcast below.
    body = _piece_head("server · prepare", prep) + _io("reads", _leaf_list(reads, 1))
    if kept:
      body += _io("keeps on the server", _leaf_list(_named_leaves(kept, form), _FIGURE_ROWS))
    body += _dp_badges(prep, mechanisms)
    parts.append(_cell(2, c, body, "card server flows"))

    bcast = {s.name: s for s in prep.outputs}
    down = _broadcast_leaves(stage, form, flow)
    empty = " empty" if not stage.broadcasts else ""
    parts.append(_cell(3, c, f'<span class="wire down{empty}"></span><div class="wire-label">'
                       f'<div class="wire-h">broadcast</div><div class="wire-bytes">'
                       f'{_e(size_text(traffic[stage.index]["download"]))} per client</div>'
                       f"{_leaf_list(down, _FIGURE_ROWS)}</div>", "wire-cell"))

    work = stage.client_work
    outs = [s for s in work.outputs if s.name in {b.name for b in form.outputs}]
    carries = [s for s in work.outputs if s.name not in stage.uploads and s not in outs]
    data = [s for s in work.inputs if s.name not in bcast]  # its data, earlier stages' values
    body = _piece_head("clients · work, on each client", work)
    body += _io("reads the broadcast and its data", _leaf_list(
        _named_leaves(data, form), _FIGURE_ROWS))
    if carries:
      body += _io("keeps for the next stage", _leaf_list(_named_leaves(carries, form),
                                                         _FIGURE_ROWS))
    if outs:
      body += _io("outputs (stay on the clients)", _leaf_list(_named_leaves(outs, form),
                                                              _FIGURE_ROWS))
    body += _dp_badges(work, mechanisms)
    parts.append(_cell(4, f"{c} / span 2", body, "card clients"))

    parts.append(_cell(3, c + 1, '<span class="wire up"></span><div class="wire-label">'
                       f'<div class="wire-h">upload</div><div class="wire-bytes">'
                       f'{_e(size_text(traffic[stage.index]["upload"]))} per client</div>'
                       f"{_leaf_list(_upload_leaves(stage, flow), _FIGURE_ROWS)}</div>",
                       "wire-cell"))

    kinds: dict[str, int] = {}
    for agg in stage.aggregations:
      kinds[agg.label] = kinds.get(agg.label, 0) + 1
    results = [_result_leaf(form, a, flow) for a in stage.aggregations]
    body = ('<div class="kicker">server · aggregate</div><div class="title">'
            + _e(count_text(len(stage.aggregations), "aggregation")) + "</div>"
            + '<div class="kinds">' + "".join(
                f'<span class="kind"><code>{_e(k)}</code> &#215; {n}</span>' for k, n in kinds.items())
            + "</div>" + _io("gives the server values for", _leaf_list(results, 3)))
    parts.append(_cell(2, c + 1, body, "card server agg flows"))

  res = form.server_result
  server_outs = [b for b in form.outputs if b.placement is not CLIENTS]
  body = (_piece_head("server · result", res)
          + _io("outputs", _leaf_list(_named_leaves([b.spec for b in server_outs], form),
                                      _FIGURE_ROWS))
          + _dp_badges(res, mechanisms))
  parts.append(_cell(1, cols, "result", "stage-head"))
  parts.append(_cell(2, cols, body, "card server result"))
  template = f"var(--lane) repeat({2 * len(stages) + 1}, minmax(0, 1fr))"
  return (f'<figure class="round"><div class="grid" style="grid-template-columns: {template}">'
          + "".join(parts) + "</div>" + _legend(form, bool(mechanisms)) + "</figure>")


def _legend(form: FederatedForm, dp: bool) -> str:
  items = [f"<span>One call of <code>{_e(form.name)}</code>, left to right:</span>",
           '<span class="key server">server piece</span>',
           '<span class="key clients">client piece, run by every client</span>',
           '<span class="key wires">broadcast down and upload up, bytes per client</span>',
           '<span class="key arrow">server values carried on</span>']
  if dp:
    items.append('<span class="key key-dp">where differential privacy clips and adds noise</span>')
  return f'<figcaption>{"".join(items)}</figcaption>'


def _server_only(name: str, form: FederatedForm, forms: Mapping[str, FederatedForm]) -> str:
  """A computation with no round trip: one server piece from its inputs to its outputs."""
  res = form.server_result
  body = _piece_head("server only · no clients, no stages", res)
  if form.inputs:
    body += _io("inputs", _leaf_list(_named_leaves([b.spec for b in form.inputs], form),
                                     _FIGURE_ROWS))
  body += _io("outputs", _leaf_list(_named_leaves([b.spec for b in form.outputs], form),
                                    _FIGURE_ROWS))
  note = ""
  if name == "initialize" and "next" in forms:
    first = forms["next"].arg_names[:1]
    state = f" (<code>{_e(first[0])}</code>)" if first else ""
    note = (f'<p class="aside">Runs once, on the server: its outputs are the state{state} '
            "that the first round of <code>next</code> starts from.</p>")
  return f'<div class="server-only"><div class="card server result">{body}</div>{note}</div>'


# --- the tables under the figure --------------------------------------------------------------------
def _aggregations_table(form: FederatedForm, flow: _Flow) -> str:
  """Every aggregation as a row: the value and weight as the user wrote them (the upload that is a
  client input as that input), the result as the user named it, what it is used by, and the
  internal names (those of plan.json and the exports) last."""
  rows = []
  many = len(form.stages) > 1
  for stage in form.stages:
    for agg in stage.aggregations:
      def shown(user: str, leaf: str) -> str:  # an upload that is a client input, as that input
        if leaf in flow.labels:
          return flow.labels[leaf]
        alias = flow.alias.get(leaf)
        return f"{user} = {alias}" if alias and alias != user else user

      value = shown(agg.user_value, agg.value)
      weight = shown(agg.user_weight or agg.weight, agg.weight) if agg.weight else "-"
      params = ", ".join(f"{k}={v}" for k, v in agg.params.items()) or "-"
      result = f"{agg.user_result} {shape_text(agg.result)}"
      used = [flow.describe(n) for n in flow.used_by.get(agg.result.name, [])]
      used_text = ", ".join(used[:3]) + (f" and {len(used) - 3} more" if len(used) > 3 else "")
      leaves = ", ".join([agg.value, *([agg.weight] if agg.weight else [])])
      cells = ([str(stage.index)] if many else []) + [
          agg.kind, value, weight, params, result, used_text or "-",
          f"{leaves} → {agg.result.name}"]
      # Shapes stay whole; the names, what the result feeds and the internal names wrap.
      first = int(many) + 1
      wraps = {first, first + 1, first + 3, first + 4, first + 5}
      rows.append("<tr>" + "".join(
          (f'<td class="wraps"><code>{_name(c)}</code></td>' if i in wraps
           else f"<td><code>{_e(c)}</code></td>") if i >= first
          else f"<td>{_e(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
  head = (["stage"] if many else []) + ["kind", "value", "weight", "params", "result", "used by",
                                        "leaves in exports"]
  table = (f'<table class="aggs"><thead><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr>'
           f'</thead><tbody>{"".join(rows)}</tbody></table>')
  n = len(rows)
  is_open = ' open="open"' if n <= _TABLE_ROWS else ""
  return (f'<section class="panel wide"><details{is_open}><summary><h3>Aggregations '
          f'<span class="count">{_e(n)} (one per uploaded leaf)</span></h3></summary>'
          f"{table}</details></section>")


def _leaves_panel(form: FederatedForm) -> str:
  server = [b.spec for b in form.inputs if b.placement is not CLIENTS]
  clients = [b.spec for b in form.inputs if b.placement is CLIENTS]
  blocks = []
  if server:
    blocks.append(("inputs on the server", _named_leaves(server, form)))
  if clients:
    ragged = {b.name: b for b in form.inputs if b.ragged is not None}
    blocks.append(("inputs on each client (shapes per client)", [
        dataclasses.replace(leaf, note=ragged_tag(ragged[leaf.spec.name]))
        if leaf.spec.name in ragged else leaf for leaf in _named_leaves(clients, form)]))
  on_clients = any(b.placement is CLIENTS for b in form.outputs)
  blocks.append(("outputs" + (" (on the server unless marked)" if on_clients else ""), [
      dataclasses.replace(leaf, note="on the clients" if b.placement is CLIENTS else "")
      for leaf, b in zip(_named_leaves([b.spec for b in form.outputs], form), form.outputs)]))
  head = ('<div class="row head"><span class="n">name</span><span class="shape">shape</span>'
          '<span class="bytes">bytes</span><span class="leaf">leaf in exports</span></div>')
  return "".join(f'<section class="panel"><h3>{_e(title)}</h3>{head}'
                 f"{_leaf_list(leaves, _TABLE_ROWS, full=True)}</section>"
                 for title, leaves in blocks)


# --- the page -------------------------------------------------------------------------------------
def _facts(form: FederatedForm) -> str:
  def total(bindings):
    return size_text(sum(b.spec.nbytes for b in bindings))

  facts = []
  if form.stages:
    trips = "one round trip" if len(form.stages) == 1 else f"{len(form.stages)} round trips"
    facts.append(f"{count_text(len(form.stages), 'stage')}: {trips} to the clients")
    if form.clients:
      facts.append(f"traced for {form.clients} clients")
    down = sum(t["download"] for t in form.bytes_per_client())
    up = sum(t["upload"] for t in form.bytes_per_client())
    facts.append(f"each client downloads {size_text(down)} and uploads {size_text(up)}")
  else:
    facts.append("runs on the server only")
  server_in = [b for b in form.inputs if b.placement is not CLIENTS]
  client_in = [b for b in form.inputs if b.placement is CLIENTS]
  if server_in:
    facts.append(f"server inputs {count_text(len(server_in), 'leaf').replace('leafs', 'leaves')} "
                 f"({total(server_in)})")
  if client_in:
    # A ragged leaf is drawn at its traced (padded) length: its bytes are an upper bound.
    bound = "at most " if any(b.ragged is not None for b in client_in) else ""
    facts.append(f"client inputs {count_text(len(client_in), 'leaf').replace('leafs', 'leaves')} "
                 f"({bound}{total(client_in)} per client)")
  facts.append(f"outputs {count_text(len(form.outputs), 'leaf').replace('leafs', 'leaves')} "
               f"({total(form.outputs)})")
  return '<ul class="facts">' + "".join(f"<li>{_e(f)}</li>" for f in facts) + "</ul>"


def _section(name: str, form: FederatedForm, forms: Mapping[str, FederatedForm]) -> str:
  from faxbridge._src.dp import form_mechanisms

  flow = _flow(form)
  mechanisms = form_mechanisms(form)
  if form.stages:
    body = (_figure(form, flow, mechanisms)
            + '<div class="panels">' + _aggregations_table(form, flow)
            + _dp_table(mechanisms) + _leaves_panel(form) + "</div>")
  else:
    body = _server_only(name, form, forms)
  return (f'<section class="computation" id="{_e(name)}"><h2><code>{_e(name)}</code></h2>'
          f"{_facts(form)}{body}</section>")


def round_html(forms: dict[str, FederatedForm], title: str) -> str:
  """The page for a program's federated forms (``computation``, or ``initialize`` and ``next`` of
  an iterative process), titled ``title``: per form the round drawn, then its aggregations, DP
  mechanism, inputs and outputs."""
  body = "".join(_section(name, form, forms) for name, form in forms.items())
  if set(forms) == {"initialize", "next"}:
    lede = ("An iterative process: <code>initialize</code> runs once on the server, then "
            "<code>next</code> runs once per round.")
  else:
    lede = "Each call runs the stages below, left to right."
  return ("<!DOCTYPE html>\n"
          '<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>'
          '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
          f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
          f'<header><div class="eyebrow">faxbridge · the federated round</div>'
          f'<h1>{_e(title)}</h1><p class="lede">{lede}</p></header>{body}</main></body></html>\n')


_CSS = """
:root {
  --ink: #1c232d; --muted: #5a6472; --faint: #8b95a3; --rule: #d8dde4; --paper: #fff;
  --page: #f5f6f8;
  --server: #2a5b9c; --server-bg: #edf3fb; --server-line: #9fbbe2;
  --clients: #2d7549; --clients-bg: #edf7f0; --clients-line: #9fcfb0;
  --dp: #9a4514; --dp-bg: #fdf0e6; --dp-line: #e7b48e;
  --mono: ui-monospace, "SFMono-Regular", "Cascadia Mono", "DejaVu Sans Mono", Menlo, Consolas,
    monospace;
  --sans: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans",
    "Helvetica Neue", Arial, sans-serif;
  --lane: 6.5rem; --gap: 2.4rem;
}
* { box-sizing: border-box; }
html { background: var(--page); }
body { margin: 0; color: var(--ink); font: 14px/1.45 var(--sans); }
main { max-width: 1760px; margin: 0 auto; padding: 28px 32px 56px; }
code { font-family: var(--mono); font-size: 0.92em; }
header { margin-bottom: 1.2rem; }
.lede { margin: 0.3rem 0 0; color: var(--muted); font-size: 15px; }
.eyebrow { color: var(--muted); font-size: 12px; letter-spacing: 0.06em; text-transform: uppercase; }
h1 { font-size: 26px; font-weight: 650; margin: 0.15rem 0 0; overflow-wrap: anywhere; }
h2 { font-size: 20px; margin: 0 0 0.35rem; }
h2 code { font-size: 1em; background: none; }
h3 { font-size: 15px; margin: 0; display: inline; }
.computation { background: var(--paper); border: 1px solid var(--rule); border-radius: 12px;
  padding: 20px 24px 24px; margin: 0 0 24px; box-shadow: 0 1px 2px rgba(20, 30, 40, 0.04); }
.facts { list-style: none; padding: 0; margin: 0 0 18px; display: flex; flex-wrap: wrap;
  gap: 6px 8px; color: var(--muted); }
.facts li { background: var(--page); border: 1px solid var(--rule); border-radius: 999px;
  padding: 1px 10px; font-size: 13px; }

/* the figure: lanes (server, wires, clients) by columns (two per stage, then the result) */
figure.round { margin: 0; }
.grid { display: grid; column-gap: var(--gap); row-gap: 0; align-items: end; }
.lane { align-self: stretch; display: flex; flex-direction: column; justify-content: center;
  font-weight: 650; font-size: 13px; letter-spacing: 0.05em; text-transform: uppercase;
  padding-left: 2px; position: relative; z-index: 1; }
.lane small { text-transform: none; letter-spacing: 0; font-weight: 400; color: var(--muted);
  font-size: 12px; }
.lane.server { color: var(--server); }
.lane.clients { color: var(--clients); }
.band { align-self: stretch; margin: 0 calc(-0.5 * var(--gap)); border-radius: 10px; }
.band.server { background: linear-gradient(var(--server-bg), rgba(237, 243, 251, 0.35)); }
.band.clients { background: linear-gradient(rgba(237, 247, 240, 0.35), var(--clients-bg)); }
.frame { align-self: stretch; margin: 0 calc(-0.35 * var(--gap)); border: 1.5px dashed #c3cad4;
  border-radius: 12px; pointer-events: none; position: relative; z-index: 1; }
.stage-head { align-self: start; padding: 8px 0 10px; font-weight: 650; font-size: 13px;
  color: var(--muted); letter-spacing: 0.05em; text-transform: uppercase; position: relative;
  z-index: 2; }
.card { position: relative; z-index: 2; background: var(--paper); border: 1.5px solid;
  border-radius: 10px; padding: 10px 12px 12px; min-width: 0; }
.card.server { border-color: var(--server-line); box-shadow: inset 0 3px 0 var(--server); }
.card.clients { border-color: var(--clients-line); box-shadow: inset 0 -3px 0 var(--clients);
  align-self: start; margin-bottom: 14px; }
.grid > .card.server { margin-top: 4px; align-self: stretch; }
.kicker { font-size: 11.5px; font-weight: 650; letter-spacing: 0.05em; text-transform: uppercase; }
.server .kicker { color: var(--server); }
.clients .kicker { color: var(--clients); }
.title { font-weight: 650; font-size: 14.5px; overflow-wrap: anywhere; }
.title code { font-size: 13.5px; }
.what { color: var(--muted); font-size: 12.5px; }
.io { margin-top: 8px; }
.io-h { font-size: 12px; color: var(--muted); margin-bottom: 2px; }
.kinds { display: flex; flex-wrap: wrap; gap: 4px 6px; margin-top: 4px; }
.kind { background: var(--server-bg); border-radius: 6px; padding: 0 6px; font-size: 12.5px; }
/* server values carried to the next server piece: an arrow across the column gap */
.card.flows::after { content: ""; position: absolute; top: 50%; right: calc(-1 * var(--gap) + 2px);
  width: calc(var(--gap) - 12px); border-top: 2px solid var(--server); }
.card.flows::before { content: ""; position: absolute; top: calc(50% - 5px);
  right: calc(-1 * var(--gap) + 1px); border: 6px solid transparent; border-left: 9px solid
  var(--server); border-right: 0; }
/* the wires: broadcast down, upload up; their length is the row's, never the text's */
.wire-cell { display: flex; align-self: stretch; gap: 10px; padding: 6px 0 8px 18px; min-width: 0;
  position: relative; z-index: 2; }
.wire { flex: 0 0 14px; position: relative; margin: -6px 0 -8px; }
.wire::before { content: ""; position: absolute; left: 6px; width: 2.5px; top: 0; bottom: 0; }
.wire::after { content: ""; position: absolute; left: 0; border: 7px solid transparent;
  border-left-width: 7.5px; border-right-width: 7.5px; }
.wire.down::before { background: var(--server); bottom: 9px; }
.wire.down::after { bottom: -5px; border-top: 11px solid var(--server); border-bottom: 0; }
.wire.up::before { background: var(--clients); top: 9px; }
.wire.up::after { top: -5px; border-bottom: 11px solid var(--clients); border-top: 0; }
.wire.down.empty::before { background: repeating-linear-gradient(var(--faint) 0 4px,
  transparent 4px 8px); }
.wire.down.empty::after { border-top-color: var(--faint); }
.wire-label { min-width: 0; flex: 1 1 auto; padding: 4px 0; }
.wire-h { font-weight: 650; font-size: 13px; }
.wire.down + .wire-label .wire-h { color: var(--server); }
.wire.up + .wire-label .wire-h { color: var(--clients); }
.wire-bytes { color: var(--muted); font-size: 12.5px; margin-bottom: 2px; }
figcaption { display: flex; flex-wrap: wrap; gap: 6px 18px; margin-top: 12px; color: var(--muted);
  font-size: 12.5px; }
.key::before { content: ""; display: inline-block; width: 14px; height: 10px; margin-right: 6px;
  border-radius: 3px; border: 1.5px solid; vertical-align: -1px; }
.key.server::before { border-color: var(--server-line); box-shadow: inset 0 2px 0 var(--server); }
.key.clients::before { border-color: var(--clients-line); box-shadow: inset 0 -2px 0 var(--clients); }
.key.arrow::before { content: "→"; border: 0; width: auto; height: auto; color: var(--server);
  font-weight: 700; vertical-align: 0; }
.key.wires::before { content: "↓↑"; border: 0; width: auto; height: auto; font-weight: 700;
  color: var(--server); vertical-align: 0; }
.key.key-dp::before { background: var(--dp-bg); border-color: var(--dp-line); }

/* leaf lists: rows of name and shape; groups fold with their count and bytes */
.leaves { font-size: 12.5px; min-width: 0; }
.row { display: flex; flex-wrap: wrap; gap: 0 10px; align-items: baseline; min-width: 0;
  line-height: 1.4; }
.row .n { flex: 1 1 auto; min-width: 0; overflow-wrap: anywhere; }
.row .shape { flex: 0 0 auto; margin-left: auto; color: var(--muted); white-space: nowrap;
  text-align: right; }
.row .count { flex: 0 0 auto; margin-left: auto; color: var(--muted); font-size: 12px; }
details > summary { cursor: pointer; list-style-position: outside; margin-left: 14px; }
details > summary .row { display: inline-flex; width: calc(100% - 2px); vertical-align: top; }
.kids { margin-left: 14px; padding-left: 8px; border-left: 1px solid var(--rule); }
.none { margin: 0; color: var(--faint); font-size: 12.5px; }
.leaves.full { font-size: 13px; }
.leaves.full .row { flex-wrap: nowrap; }
.leaves.full .row, .row.head { padding: 2px 0; border-bottom: 1px solid #eef0f3; }
.leaves.full .row .shape, .row.head .shape { flex: 0 0 9.5rem; text-align: left; }
.leaves.full .row .bytes, .row.head .bytes { flex: 0 0 5rem; text-align: right; color: var(--muted);
  white-space: nowrap; }
.leaves.full .row .leaf, .row.head .leaf { flex: 0 0 11rem; color: var(--faint); overflow-wrap: anywhere; }
.leaves.full .tag { font-family: var(--sans); font-size: 11.5px; color: var(--clients);
  background: var(--clients-bg); border-radius: 4px; padding: 0 5px; white-space: nowrap; }
.row.head { font-size: 12px; color: var(--muted); border-bottom-color: var(--rule); margin-left: 14px; }
.row.head .n { flex: 1 1 auto; }
.row.head .leaf { color: var(--muted); }
.leaves.full > .row, .leaves.full .kids > .row { margin-left: 14px; }

/* DP: where clipping and noise happen */
.dp { margin-top: 10px; background: var(--dp-bg); border: 1px solid var(--dp-line); border-radius: 8px;
  padding: 6px 8px; font-size: 12.5px; color: #5e2c0d; overflow-wrap: anywhere; }
.dp .tag { display: inline-block; background: var(--dp); color: #fff; border-radius: 4px;
  padding: 0 6px; font-weight: 650; font-size: 11.5px; letter-spacing: 0.03em; margin-right: 4px; }
.dp dl { display: grid; grid-template-columns: auto minmax(0, 1fr); gap: 0 10px; margin: 4px 0 0; }
.dp dt { color: #7a3a12; }
.dp dd { margin: 0; font-family: var(--mono); font-size: 12px; overflow-wrap: anywhere; }

/* under the figure */
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 46rem), 1fr));
  gap: 18px 28px; margin-top: 22px; }
.panel { min-width: 0; }
.panel.wide { grid-column: 1 / -1; }
table.aggs td, table.aggs th { white-space: nowrap; }
table.aggs td.wraps { white-space: normal; }
.panel h3 { display: inline-block; margin-bottom: 6px; }
.panel > details > summary { margin-left: 0; }
.panel .count { color: var(--muted); font-weight: 400; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 10px 3px 0; border-bottom: 1px solid #eef0f3;
  vertical-align: top; overflow-wrap: anywhere; }
thead th { font-weight: 600; font-size: 12px; color: var(--muted); border-bottom-color: var(--rule); }
.kv-table th { font-weight: 500; color: var(--muted); width: 40%; }
.dp-panel h3 { color: var(--dp); }

/* a computation with no round trip (initialize) */
.server-only { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: center; }
.server-only .card { flex: 0 1 36rem; }
.aside { flex: 1 1 18rem; color: var(--muted); margin: 0; }
@media (max-width: 1200px) {
  :root { --lane: 4.6rem; --gap: 1.6rem; }
  main { padding: 20px 16px 40px; }
  .computation { padding: 16px 14px 18px; }
  .card { padding: 8px 9px 10px; }
  .lane { font-size: 12px; }
  .wire-cell { padding-left: 8px; gap: 6px; }
}
@media print {
  html, .computation { background: #fff; }
  .computation { box-shadow: none; break-inside: avoid; }
}
"""


__all__ = ["round_html"]

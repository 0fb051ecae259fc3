"""The federated form: a computation as stages of local pieces, and the one interpreter of it.

A round trip between server and clients is a *stage*. For stage ``k``:

* ``server_prepare``: server values -> (values to broadcast, server values kept for later);
* broadcast: every client receives those values;
* ``client_work``: one client's data, the broadcast values and what the client kept from earlier
  stages -> (values to upload, values kept for later stages);
* aggregations: each uploaded leaf is combined over clients by its rule
  (:func:`faxbridge._src.aggregations.aggregation_rule`) and joins the server values.

After the last stage ``server_result`` maps the server values to the outputs. Every value that
crosses a piece boundary has one name, unique in the form by construction (:class:`Names`); the
split, the TF lowering, the TFF types, ``plan.json`` and the manifest all use these names.

This module owns the data model (its JSON is ``plan.json``'s computation block), the naming of
leaves, and :func:`interpret`: the one walk over the stages. ``FederatedForm.run`` (jax), the plan
runtimes (IREE, LiteRT, jax.export, one client at a time) and the TFF composition (federated_language
values) run a form through it, each with its own :class:`Backend`; :func:`run_program` is the one
round loop of an iterative process (plan runtimes and verify's native side).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from faxbridge._src.aggregations import AggregationRule, aggregation_rule
from faxbridge._src.events import emit
from faxbridge._src.placements import CLIENTS, SERVER, Placement

LeafPath = list  # a leaf's struct steps: dict keys and attributes by name, sequence items by index


# --------------------------------------------------------------------------------------------------
# Names.
# --------------------------------------------------------------------------------------------------
def sanitize(text: str) -> str:
  """A name made of ``[A-Za-z0-9_]`` (what TF node names, TFF struct names and files accept)."""
  text = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
  return text or "x"


class Names:
  """Unique names, handed out in a fixed order: a name already taken gets a stable suffix
  (``dense_w``, ``dense_w_1``), so two leaves never share one, whatever the user's keys."""

  def __init__(self):
    self._taken: set[str] = set()

  def fresh(self, hint: str) -> str:
    base = sanitize(hint)
    candidate, i = base, 0
    while candidate in self._taken:
      i += 1
      candidate = f"{base}_{i}"
    self._taken.add(candidate)
    return candidate


def path_keys(path) -> LeafPath:
  """A jax key path as struct steps: dict keys and attributes by name, sequence items by index."""
  import jax

  out: LeafPath = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key if isinstance(k.key, int) else str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    else:  # FlattenedIndexKey of a custom node
      out.append(int(getattr(k, "key", 0)))
  return out


def leaf_paths(tree) -> list[LeafPath]:
  """The struct path of every leaf of a PyTreeDef, in leaf order."""
  import jax

  dummy = jax.tree.unflatten(tree, [0] * tree.num_leaves)
  return [path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(dummy)]


def leaf_hint(prefix: str, path: LeafPath) -> str:
  return "_".join([prefix, *(str(k) for k in path)])


# --------------------------------------------------------------------------------------------------
# The data model.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A named value crossing a piece boundary (for CLIENTS values: the shape of one client's)."""

  name: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def to_json(self) -> dict:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

  @classmethod
  def from_json(cls, d: Mapping) -> TensorSpec:
    return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclasses.dataclass(frozen=True)
class Piece:
  """A local (non-federated) computation over named inputs and outputs.

  ``jaxpr`` is set for a piece made by the split (None for one read back from ``plan.json``);
  ``files`` are what a target wrote for it, by format.
  """

  name: str
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  jaxpr: Any = dataclasses.field(default=None, compare=False, repr=False)
  files: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

  def __call__(self, *args) -> list:
    return _jitted(self.jaxpr)(*args)

  def to_json(self, placement: Placement) -> dict:
    return {"name": self.name, "placement": placement.value,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "files": dict(sorted(self.files.items()))}

  @classmethod
  def from_json(cls, d: Mapping) -> Piece:
    return cls(d["name"], tuple(map(TensorSpec.from_json, d["inputs"])),
               tuple(map(TensorSpec.from_json, d["outputs"])), files=dict(d.get("files", {})))


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How one uploaded leaf becomes a server value: ``result = rule(value [, weight]; params)``.

  ``params`` are the aggregation primitive's parameters its rule declares (``bitwidth`` of a
  ``secure_sum``), JSON scalars sorted by name; ``source_info`` is the equation's (the user's
  ``file:line`` for errors), kept out of comparisons and JSON.

  ``names`` are the user's names of the value, the weight and the result (``value``, ``weight``,
  ``result``: ``deltas['w1']``, ``weights``, ``mean_delta['w1']``), as far as the source says
  (:mod:`faxbridge._src.user_names`; the split makes the value's unique within its stage).
  Everything that shows an aggregation to people (``inspect``, the drawing) reads them here,
  through :attr:`user_value`, :attr:`user_weight` and :attr:`user_result`, which fall back on the
  internal names; ``plan.json`` carries them as ``names``. Nothing runs differently with them.
  """

  kind: str
  value: str
  result: TensorSpec
  weight: str | None = None
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # a dict: unhashable
  source_info: Any = dataclasses.field(default=None, compare=False, repr=False)
  names: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    object.__setattr__(self, "params", dict(sorted(self.params.items())))
    object.__setattr__(self, "names", {k: self.names[k] for k in _NAME_KEYS if self.names.get(k)})

  @property
  def label(self) -> str:
    """The kind with its params, as the jaxpr shows them: ``secure_sum[bitwidth=16]``."""
    params = " ".join(f"{k}={v}" for k, v in self.params.items())
    return f"{self.kind}[{params}]" if params else self.kind

  @property
  def user_value(self) -> str:
    """The aggregated value as the user wrote it (``deltas['w1']``), else its upload's name."""
    return self.names.get("value", self.value)

  @property
  def user_weight(self) -> str | None:
    """The weight as the user wrote it (``weights``), else its upload's name; None: unweighted."""
    return None if self.weight is None else self.names.get("weight", self.weight)

  @property
  def user_result(self) -> str:
    """The result as the user named it (``mean_delta['w1']``), else the aggregate's name."""
    return self.names.get("result", self.result.name)

  @property
  def rule(self) -> AggregationRule:
    """The rule of this kind (an installed package's, loaded on first use: see aggregation_rule)."""
    return aggregation_rule(self.kind)

  def to_json(self) -> dict:
    out = {"kind": self.kind, "value": self.value, "result": self.result.to_json()}
    if self.weight is not None:
      out["weight"] = self.weight
    if self.params:
      out["params"] = dict(self.params)
    if self.names:
      out["names"] = dict(self.names)
    return out

  @classmethod
  def from_json(cls, d: Mapping) -> Aggregation:
    return cls(d["kind"], d["value"], TensorSpec.from_json(d["result"]), d.get("weight"),
               d.get("params", {}), names=d.get("names", {}))


_NAME_KEYS = ("value", "weight", "result")  # Aggregation.names, in this order


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  server_prepare: Piece
  broadcasts: tuple[str, ...]  # outputs of server_prepare sent to every client
  client_work: Piece
  uploads: tuple[str, ...]  # client values that are aggregated
  aggregations: tuple[Aggregation, ...]

  def bytes_per_client(self) -> dict[str, int]:
    prep = {s.name: s for s in self.server_prepare.outputs}
    sizes = {s.name: s for s in self.client_work.inputs + self.client_work.outputs}
    return {"download": sum(prep[n].nbytes for n in self.broadcasts),
            "upload": sum(sizes[n].nbytes for n in self.uploads)}

  def to_json(self) -> dict:
    return {"index": self.index,
            "server_prepare": self.server_prepare.to_json(SERVER),
            "broadcasts": list(self.broadcasts),
            "client_work": self.client_work.to_json(CLIENTS),
            "uploads": list(self.uploads),
            "aggregations": [a.to_json() for a in self.aggregations],
            "bytes_per_client": self.bytes_per_client()}

  @classmethod
  def from_json(cls, d: Mapping) -> Stage:
    return cls(d["index"], Piece.from_json(d["server_prepare"]), tuple(d["broadcasts"]),
               Piece.from_json(d["client_work"]), tuple(d["uploads"]),
               tuple(map(Aggregation.from_json, d["aggregations"])))


@dataclasses.dataclass(frozen=True)
class RaggedSpec:
  """An input leaf whose clients hold their own numbers of examples (``fb.ragged``).

  One client's leaf (its ``Binding``'s shape) is padded to ``max_length`` examples on axis 0; the
  first ``count`` are real, ``count`` being the client's value of the input leaf named ``count``
  (int32, one per client). ``batch_size``: the client's loop (``fb.fold``) runs over batches of that
  many examples, a mask marking the real ones of the last; None: over single examples. An exporter
  that takes each client's data at its own length makes axis 0 of the leaf dynamic (symbolic) and
  feeds ``count`` = that length.
  """

  count: str
  max_length: int
  batch_size: int | None = None

  def to_json(self) -> dict:
    out: dict[str, Any] = {"count": self.count, "max_length": self.max_length}
    if self.batch_size is not None:
      out["batch_size"] = self.batch_size
    return out

  @classmethod
  def from_json(cls, d: Mapping) -> RaggedSpec:
    return cls(d["count"], int(d["max_length"]), d.get("batch_size"))


@dataclasses.dataclass(frozen=True)
class Binding:
  """A computation input or output leaf: its named tensor, placement and path in the pytree
  (inputs: the argument's position first), and for a leaf of an ``fb.ragged`` input its
  :class:`RaggedSpec`."""

  spec: TensorSpec
  placement: Placement
  path: tuple = ()
  ragged: RaggedSpec | None = None

  @property
  def name(self) -> str:
    return self.spec.name

  def to_json(self) -> dict:
    out = {**self.spec.to_json(), "placement": self.placement.value, "path": list(self.path)}
    if self.ragged is not None:
      out["ragged"] = self.ragged.to_json()
    return out

  @classmethod
  def from_json(cls, d: Mapping) -> Binding:
    ragged = RaggedSpec.from_json(d["ragged"]) if d.get("ragged") else None
    return cls(TensorSpec.from_json(d), Placement(d["placement"]), tuple(d.get("path", ())),
               ragged)


@dataclasses.dataclass(frozen=True)
class FederatedForm:
  """A computation as stages of server and client pieces (see the module docstring).

  ``clients`` is the number of clients it was traced for: what a runtime runs when no CLIENTS
  input fixes the number.
  """

  name: str
  clients: int | None
  inputs: tuple[Binding, ...]
  outputs: tuple[Binding, ...]
  stages: tuple[Stage, ...]
  server_result: Piece
  in_tree: Any = dataclasses.field(default=None, compare=False, repr=False)
  out_tree: Any = dataclasses.field(default=None, compare=False, repr=False)
  arg_names: tuple[str, ...] = ()

  def pieces(self) -> list[Piece]:
    out = []
    for stage in self.stages:
      out += [stage.server_prepare, stage.client_work]
    return [*out, self.server_result]

  def bytes_per_client(self) -> list[dict[str, int]]:
    """Per stage, the bytes each client downloads (broadcasts) and uploads (aggregated leaves)."""
    return [stage.bytes_per_client() for stage in self.stages]

  @property
  def ragged_inputs(self) -> tuple[Binding, ...]:
    """The input leaves whose clients hold their own numbers of examples (``fb.ragged``)."""
    return tuple(b for b in self.inputs if b.ragged is not None)

  def folds(self) -> list:
    """The ``source_info`` of each ``fb.fold`` in the pieces (split-made forms; [] when read
    from JSON): loops over a client's own examples, also over data padded by the user."""
    from faxbridge._src.ragged import fold_sites

    return [site for p in self.pieces() if p.jaxpr is not None for site in fold_sites(p.jaxpr.jaxpr)]

  def with_files(self, files: Callable[[Piece], Mapping[str, str]]) -> FederatedForm:
    """The same form with each piece's ``files`` set (pieces without outputs get none)."""

    def piece(p: Piece) -> Piece:
      return dataclasses.replace(p, files=dict(files(p)) if p.outputs else {})

    stages = tuple(dataclasses.replace(s, server_prepare=piece(s.server_prepare),
                                       client_work=piece(s.client_work)) for s in self.stages)
    return dataclasses.replace(self, stages=stages, server_result=piece(self.server_result))

  def to_json(self) -> dict:
    """The form as ``plan.json``'s computation block (no jaxprs: pieces are named files)."""
    return {"clients": self.clients,
            "inputs": [b.to_json() for b in self.inputs],
            "outputs": [b.to_json() for b in self.outputs],
            "stages": [s.to_json() for s in self.stages],
            "server_result": self.server_result.to_json(SERVER)}

  @classmethod
  def from_json(cls, d: Mapping, name: str = "computation") -> FederatedForm:
    return cls(name=name, clients=d.get("clients"),
               inputs=tuple(map(Binding.from_json, d["inputs"])),
               outputs=tuple(map(Binding.from_json, d["outputs"])),
               stages=tuple(map(Stage.from_json, d["stages"])),
               server_result=Piece.from_json(d["server_result"]))

  def run(self, *args) -> Any:
    """Run the pieces natively (jax, all clients at once): the same result as the computation."""
    import jax

    leaves = jax.tree.leaves(args)
    named = {b.name: v for b, v in zip(self.inputs, leaves)}
    out = interpret(self, JaxBackend(number_of_clients(self, named)), named)
    return jax.tree.unflatten(self.out_tree, [out[b.name] for b in self.outputs])


_jit_cache: dict[int, Callable] = {}


def _jitted(closed) -> Callable:
  import jax
  from jax.extend import core as jcore

  fn = _jit_cache.get(id(closed))
  if fn is None:
    fn = _jit_cache[id(closed)] = jax.jit(jcore.jaxpr_as_fun(closed))
  return fn


# --------------------------------------------------------------------------------------------------
# The interpreter.
# --------------------------------------------------------------------------------------------------
class Backend:
  """How a family of runtimes executes the steps of a form. Values are whatever the backend
  computes with: stacked jax arrays, per-client numpy lists, federated_language values.

  ``aggregate`` defaults to each aggregation's reference rule with ``self.xp`` over the stacked
  uploads; a backend that only has per-client values overrides ``stack``.
  """

  xp: Any = np

  def server(self, piece: Piece, args: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError

  def broadcast(self, values: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError

  def clients(self, piece: Piece, args: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError

  def stack(self, value: Any) -> Any:
    return value

  def aggregate(self, aggregations: Sequence[Aggregation], uploads: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for agg in aggregations:
      x = self.stack(uploads[agg.value])
      w = self.stack(uploads[agg.weight]) if agg.weight else None
      result = agg.rule.reduce(self.xp, x, w, agg.params)
      out[agg.result.name] = self.xp.asarray(result).astype(agg.result.dtype)
    return out

  def output(self, binding: Binding, value: Any) -> Any:
    return self.stack(value) if binding.placement is CLIENTS else value


def interpret(form: FederatedForm, backend: Backend, inputs: Mapping[str, Any]) -> dict[str, Any]:
  """Run ``form`` on ``backend``: inputs and outputs by leaf name (CLIENTS values as the backend
  holds them). Pieces without outputs compute nothing anybody reads and are skipped."""
  server = {b.name: inputs[b.name] for b in form.inputs if b.placement is SERVER}
  client = {b.name: inputs[b.name] for b in form.inputs if b.placement is CLIENTS}

  def take(env, piece):
    return {s.name: env[s.name] for s in piece.inputs}

  for stage in form.stages:
    if stage.server_prepare.outputs:
      server.update(backend.server(stage.server_prepare, take(server, stage.server_prepare)))
    if stage.broadcasts:
      client.update(backend.broadcast({n: server[n] for n in stage.broadcasts}))
    if stage.client_work.outputs:
      client.update(backend.clients(stage.client_work, take(client, stage.client_work)))
    if stage.aggregations:
      server.update(backend.aggregate(stage.aggregations, client))
  if form.server_result.outputs:
    server.update(backend.server(form.server_result, take(server, form.server_result)))
  return {b.name: backend.output(b, (server if b.placement is SERVER else client)[b.name])
          for b in form.outputs}


def number_of_clients(form: FederatedForm, inputs: Mapping[str, Any]) -> int:
  """The clients to run: the leading axis of the CLIENTS inputs, else the count the form was
  traced for.

  Raises:
    ValueError: CLIENTS inputs disagree, or there are none and the form records no count.
  """
  counts = {int(np.shape(inputs[b.name])[0]) for b in form.inputs if b.placement is CLIENTS}
  if len(counts) > 1:
    raise ValueError(f"CLIENTS inputs disagree on the number of clients: {sorted(counts)}")
  if counts:
    return counts.pop()
  if not form.stages:  # nothing runs at the clients
    return int(form.clients or 0)
  if not form.clients:
    raise ValueError(f"{form.name} has no CLIENTS input and records no number of clients")
  return int(form.clients)


class JaxBackend(Backend):
  """All clients at once: CLIENTS values are stacked arrays, client work is ``vmap``-ed."""

  def __init__(self, clients: int):
    import jax.numpy as jnp

    self.n, self.xp = clients, jnp

  def server(self, piece, args):
    return dict(zip((s.name for s in piece.outputs), piece(*(args[s.name] for s in piece.inputs))))

  def broadcast(self, values):
    return {k: self.xp.broadcast_to(v, (self.n, *np.shape(v))) for k, v in values.items()}

  def clients(self, piece, args):
    import jax

    flat = [args[s.name] for s in piece.inputs]
    outs = jax.vmap(piece, axis_size=self.n)(*flat)
    return dict(zip((s.name for s in piece.outputs), outs))


class PerClientBackend(Backend):
  """One client at a time, as a device runtime runs a plan: CLIENTS values are lists of numpy
  arrays, and ``call(piece, args)`` runs one piece on one set of numpy arguments."""

  def __init__(self, clients: int, call: Callable[[Piece, list], Sequence]):
    self.n, self.call = clients, call

  def _run(self, piece: Piece, args: list) -> dict:
    outs = list(self.call(piece, [np.asarray(a) for a in args]))
    if len(outs) != len(piece.outputs):
      raise ValueError(f"{piece.name} returned {len(outs)} values, the plan lists "
                       f"{len(piece.outputs)}")
    result = {}
    for spec, value in zip(piece.outputs, outs):
      value = np.asarray(value)
      if value.shape != spec.shape or value.dtype != np.dtype(spec.dtype):
        raise ValueError(f"{piece.name} output {spec.name}: got {value.dtype}{list(value.shape)}, "
                         f"the plan says {spec.dtype}{list(spec.shape)}")
      result[spec.name] = value
    return result

  def server(self, piece, args):
    return self._run(piece, [args[s.name] for s in piece.inputs])

  def broadcast(self, values):
    return {k: [np.asarray(v)] * self.n for k, v in values.items()}

  def clients(self, piece, args):
    per_client = [self._run(piece, [args[s.name][i] for s in piece.inputs]) for i in range(self.n)]
    return {s.name: [r[s.name] for r in per_client] for s in piece.outputs}

  def stack(self, value):
    return np.stack(value) if isinstance(value, list) else value

  def inputs(self, form: FederatedForm, named: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """CLIENTS inputs as per-client lists; a ragged leaf (``fb.ragged``) as each client's own
    examples, ``x[i, :count[i]]``: a device holds its data, never the padding."""
    return {b.name: client_values(b, named, self.n) if b.placement is CLIENTS
            else np.asarray(named[b.name]) for b in form.inputs}


def client_values(binding: Binding, named: Mapping[str, Any], clients: int) -> list[np.ndarray]:
  """A CLIENTS input leaf as one array per client; for a ragged leaf each client's own examples
  (its first ``count`` rows, the count read from the leaf ``binding.ragged.count`` names).

  Raises:
    ValueError: a count outside ``[0, padded length]``.
  """
  x = np.asarray(named[binding.name])
  if binding.ragged is None:
    return [x[i] for i in range(clients)]
  counts = np.asarray(named[binding.ragged.count]).reshape(-1)
  bad = [int(c) for c in counts if not 0 <= int(c) <= x.shape[1]]
  if bad:
    raise ValueError(f"{binding.name}: counts {bad} outside [0, {x.shape[1]}] (the padded length)")
  return [x[i, : int(counts[i])] for i in range(clients)]


# --------------------------------------------------------------------------------------------------
# Programs: a computation, or an iterative process's initialize and next.
# --------------------------------------------------------------------------------------------------
def state_links(init: FederatedForm, nxt: FederatedForm) -> dict[str, list[dict[str, str]]]:
  """Which outputs feed which ``next`` inputs: initialize's result, and next's returned state
  (element 0 of a tuple result, else the whole result), onto next's argument 0.

  Raises:
    ValueError: the shapes or dtypes do not line up.
  """
  state_in = [b for b in nxt.inputs if b.path and b.path[0] == 0]
  returns_tuple = bool(nxt.outputs) and _is_tuple(nxt.out_tree)
  state_out = [b for b in nxt.outputs if not returns_tuple or b.path[0] == 0]

  def links(sources: Sequence[Binding], what: str) -> list[dict[str, str]]:
    sig = lambda b: (tuple(b.spec.shape), b.spec.dtype)
    if len(sources) != len(state_in) or any(sig(s) != sig(t) for s, t in zip(sources, state_in)):
      show = lambda bs: [(b.name, list(b.spec.shape), b.spec.dtype) for b in bs]
      raise ValueError(f"{what} must match next's state argument: got {show(sources)}, next "
                       f"takes {show(state_in)}")
    return [{"from": s.name, "to": t.name} for s, t in zip(sources, state_in)]

  return {"initialize_to_next": links(init.outputs, "initialize's result"),
          "next_to_next": links(state_out, "next's returned state")}


def _is_tuple(tree) -> bool:
  import jax

  return tree is not None and isinstance(jax.tree.unflatten(tree, [0] * tree.num_leaves), tuple)


def run_program(kind: str, run: Callable[[str, dict], dict], inputs: Mapping[str, Any], rounds: int,
                links: Mapping[str, list] | None = None, who: str = "",
                resume: tuple[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """A computation once, or an iterative process's ``initialize`` and ``rounds`` rounds of
  ``next`` with the state fed back through ``links`` (see :func:`state_links`).

  ``run(name, inputs)`` runs one computation (``"computation"``, ``"initialize"``, ``"next"``) on
  inputs by name and returns its outputs by name. The result is keyed as ``fb.verify`` keys
  outputs: ``NAME``, or ``initialize/NAME`` and ``round{r}/NAME``; ``inputs`` of an iterative
  process are next's inputs after the state. Each call of ``run`` is a ``round`` event (see
  ``faxbridge._src.events``) saying ``who`` runs it (a runtime's name, or ``native``).

  ``resume=(r, outputs)``: an iterative process resumed after its round ``r`` (0: after
  ``initialize``), whose outputs (by name) hold the state: only rounds ``r + 1`` to ``rounds`` run,
  and only theirs are returned.
  """
  label = f"{who}: " if who else ""
  if kind == "computation":
    emit("round", f"{label}computation", who=who, computation="computation", round=0, rounds=0)
    return dict(run("computation", dict(inputs)))
  if links is None:
    raise ValueError("run_program: an iterative process needs its state links")
  out: dict[str, Any] = {}
  if resume is None:
    emit("round", f"{label}initialize", who=who, computation="initialize", round=0, rounds=rounds)
    init = run("initialize", {})
    out.update({f"initialize/{k}": v for k, v in init.items()})
    done, state = 0, {link["to"]: init[link["from"]] for link in links["initialize_to_next"]}
  else:
    done, last = resume
    link_kind = "initialize_to_next" if done == 0 else "next_to_next"
    state = {link["to"]: last[link["from"]] for link in links[link_kind]}
  for r in range(done + 1, rounds + 1):
    emit("round", f"{label}round {r} of {rounds}", who=who, computation="next", round=r,
         rounds=rounds)
    result = run("next", {**inputs, **state})
    out.update({f"round{r}/{k}": v for k, v in result.items()})
    state = {link["to"]: result[link["from"]] for link in links["next_to_next"]}
  return out


__all__ = ["Aggregation", "Backend", "Binding", "FederatedForm", "JaxBackend", "Names",
           "PerClientBackend", "Piece", "RaggedSpec", "Stage", "TensorSpec", "client_values",
           "interpret", "leaf_paths", "number_of_clients", "run_program", "sanitize", "state_links"]

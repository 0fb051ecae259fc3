"""Values across the boundary: TFF arguments built from npz leaves and manifest paths, and a TFF
result read back into npz leaves (``docs/tff_runner_protocol.md``, "Signature blocks", "Values").

Clients with their own data sizes: an input entry with a ``"ragged"`` block
(``{"count": NAME, "max_length": L, ...}``, as faxbridge's manifests write it) is a CLIENTS leaf whose
npz array is padded (``[num_clients, L, ...]``) and whose client ``c`` holds only its first
``NAME[c]`` rows, ``NAME`` being another input (int, one per client). Each client is given exactly
those rows: the exported type has an unknown leading dimension there (``float32[?,3]``), so the
client's computation runs on its own examples, never on the padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated import structure

from .protocol import ProtocolError


def _placement_name(federated_type: Any) -> str:
  return str(federated_type.placement.uri).upper()


def _struct_index(struct_type: Any, element: int | str, where: str) -> int:
  names = structure.name_list_with_nones(struct_type)
  if isinstance(element, int) and not isinstance(element, bool):
    if not 0 <= element < len(names):
      raise ProtocolError(f"{where}: index {element} out of range for {struct_type}")
    return element
  if element in names:
    return names.index(element)
  raise ProtocolError(f"{where}: no element named {element!r} in {struct_type}")


def _struct_step(type_: Any, rest: list, path: list, where: str) -> int:
  """Consumes the next element of ``rest`` as an index into the struct ``type_``."""
  if not isinstance(type_, tff.StructType):
    raise ProtocolError(f"{where}: path {path} goes into {type_}, which is not a struct")
  return _struct_index(type_, rest.pop(0), where)


def _require_tensor(type_: Any, path: list, where: str) -> None:
  if not isinstance(type_, tff.TensorType):
    raise ProtocolError(f"{where}: path {path} ends at {type_}, not at a tensor")


def _normalize_path(type_: Any, path: list, where: str) -> tuple[tuple[int, ...], str | None]:
  """Turns a manifest path into struct indexes; returns them and the leaf's placement."""
  indexes: list[int] = []
  placement = None
  rest = list(path)
  while True:
    if isinstance(type_, tff.FederatedType):
      placement = _placement_name(type_)
      type_ = type_.member
      continue
    if not rest:
      break
    index = _struct_step(type_, rest, path, where)
    indexes.append(index)
    type_ = type_[index]
  _require_tensor(type_, path, where)
  return tuple(indexes), placement


def _check_leaf(entry: dict, array: np.ndarray, tensor_type: Any, clients: bool,
                where: str) -> None:
  """Checks an array against its manifest entry and TFF tensor type (no silent casts)."""
  dtype = np.dtype(tensor_type.dtype)
  if array.dtype != dtype:
    raise ProtocolError(f"{where}: {entry['name']!r} has dtype {array.dtype}, the type says "
                        f"{dtype}")
  if "dtype" in entry and np.dtype(entry["dtype"]) != dtype:
    raise ProtocolError(f"{where}: manifest dtype {entry['dtype']} of {entry['name']!r} but the "
                        f"type says {dtype}")
  shape = array.shape[1:] if clients else array.shape
  expected = tuple(tensor_type.shape) if tensor_type.shape is not None else None
  if expected is not None and (
      len(shape) != len(expected)
      or any(e is not None and e != s for s, e in zip(shape, expected))):
    axis = " per client" if clients else ""
    raise ProtocolError(f"{where}: {entry['name']!r} has shape {shape}{axis}, the type says "
                        f"{list(expected)}")
  if "shape" in entry and entry["shape"] is not None and expected is not None and (
      len(entry["shape"]) != len(expected)
      or any(m is not None and e is not None and m != e for m, e in zip(entry["shape"], expected))):
    raise ProtocolError(f"{where}: manifest shape {entry['shape']} of {entry['name']!r} but the "
                        f"type says {list(expected)}")


def build_argument(param_type: Any, entries: list[dict], arrays: dict[str, np.ndarray],
                   fixed: dict[tuple[int, ...], Any] | None = None,
                   where: str = "inputs") -> tuple[Any, int | None]:
  """Builds the Python value TFF expects for ``param_type`` from npz leaves.

  ``fixed`` maps index paths to ready-made values (an iterative process's state). Returns the value
  and the number of clients its CLIENTS-placed (not all-equal) inputs carry on their leading axis,
  or None when no such input fixes it (then TFF cannot infer it from the argument either).
  """
  fixed = dict(fixed or {})
  rows = _ragged_rows(entries, arrays, where)
  leaves: dict[tuple[int, ...], tuple[dict, np.ndarray]] = {}
  for entry in entries:
    name = entry["name"]
    if name not in arrays:
      raise ProtocolError(f"{where}: no array named {name!r} in the inputs "
                          f"(have {sorted(arrays)})")
    indexes, placement = _normalize_path(param_type, entry.get("path", []), f"{where} {name!r}")
    declared = entry.get("placement")
    if declared is not None and str(declared).upper() != placement:
      raise ProtocolError(f"{where}: {name!r} declared {declared} but the type places it at "
                          f"{placement}")
    if indexes in leaves or indexes in fixed:
      raise ProtocolError(f"{where}: two inputs claim path {list(indexes)}")
    leaves[indexes] = (entry, np.asarray(arrays[name]))

  used: set[tuple[int, ...]] = set()
  client_counts: dict[tuple[int, ...], int] = {}  # per CLIENTS-placed part of the parameter

  def under(prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [p for p in leaves if p[:len(prefix)] == prefix]

  def build(type_: Any, path: tuple[int, ...], client: int | None) -> Any:
    if path in fixed:
      used.add(path)
      return fixed[path]
    if isinstance(type_, tff.FederatedType):
      if _placement_name(type_) == "CLIENTS" and not type_.all_equal:
        if client is not None:
          raise ProtocolError(f"{where}: nested CLIENTS placement at {list(path)}")
        if any(not leaves[p][1].ndim for p in under(path)):
          raise ProtocolError(f"{where}: a CLIENTS input at {list(path)} has no client axis")
        counts = {int(leaves[p][1].shape[0]) for p in under(path)}
        if not counts:
          raise ProtocolError(f"{where}: the CLIENTS value at {list(path)} holds no tensor to "
                              "carry the number of clients")
        if len(counts) != 1:
          raise ProtocolError(f"{where}: CLIENTS inputs under {list(path)} disagree on the "
                              f"number of clients: {sorted(counts)}")
        (n,) = counts
        client_counts[path] = n
        return [build(type_.member, path, c) for c in range(n)]
      return build(type_.member, path, client)
    if isinstance(type_, tff.StructType):
      elements = structure.to_elements(type_)
      return structure.Struct([(name, build(t, (*path, i), client))
                               for i, (name, t) in enumerate(elements)])
    if isinstance(type_, tff.TensorType):
      if path not in leaves:
        raise ProtocolError(f"{where}: the parameter's tensor at path {list(path)} ({type_}) has "
                            "no input in the manifest")
      entry, array = leaves[path]
      if client is None or client == 0:
        _check_leaf(entry, array, type_, client is not None, where)
      used.add(path)
      value = array[client] if client is not None else array
      if client is not None and entry["name"] in rows:  # a client's own examples only
        value = value[: rows[entry["name"]][client]]
      # 0-d arrays travel as numpy scalars, which every TFF value path accepts.
      return value[()] if np.ndim(value) == 0 else value
    raise ProtocolError(f"{where}: parameters of type {type_} are not supported by this runner")

  value = build(param_type, (), None)
  unused = [leaves[p][0]["name"] for p in leaves if p not in used]
  if unused:
    raise ProtocolError(f"{where}: inputs {unused} do not reach a tensor of the parameter")
  if len(set(client_counts.values())) > 1:
    # TFF would refuse too ("Conflicting cardinalities"), but without naming the inputs.
    raise ProtocolError(f"{where}: the CLIENTS inputs disagree on the number of clients: "
                        + ", ".join(f"{list(p)}: {n}" for p, n in client_counts.items()))
  return value, next(iter(client_counts.values()), None)


def _ragged_rows(entries: list[dict], arrays: dict[str, np.ndarray],
                 where: str) -> dict[str, list[int]]:
  """For each input entry with a ``"ragged"`` block, the rows each client holds: its count input's
  value per client, checked to be integers within ``[0, padded length]``."""
  out: dict[str, list[int]] = {}
  for entry in entries:
    spec = entry.get("ragged")
    if not spec:
      continue
    name = entry["name"]
    count = spec.get("count") if isinstance(spec, dict) else None
    if not isinstance(count, str):
      raise ProtocolError(f"{where}: {name!r} has a ragged block without a count input: {spec!r}")
    if count not in arrays or name not in arrays:
      missing = count if count not in arrays else name
      raise ProtocolError(f"{where}: ragged input {name!r} needs {missing!r} in the inputs "
                          f"(have {sorted(arrays)})")
    counts, array = np.asarray(arrays[count]), np.asarray(arrays[name])
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or array.ndim < 2 or \
        len(counts) != len(array):
      raise ProtocolError(f"{where}: ragged input {name!r} ({array.dtype}{list(array.shape)}) "
                          f"needs its count {count!r} as one integer per client, got "
                          f"{counts.dtype}{list(counts.shape)}")
    bad = [int(c) for c in counts if not 0 <= int(c) <= array.shape[1]]
    if bad:
      raise ProtocolError(f"{where}: {count!r} holds counts {bad} outside [0, {array.shape[1]}] "
                          f"(the padded rows of {name!r})")
    out[name] = [int(c) for c in counts]
  return out


def element(value: Any, index: int) -> Any:
  """Element ``index`` of a struct-like TFF value (a Struct, or a Python container)."""
  if not isinstance(value, structure.Struct):
    value = structure.from_container(value)
  return value[index]


def select_output(value: Any, type_: Any, path: list,
                  where: str) -> tuple[np.ndarray, str | None, bool]:
  """Reads the leaf at ``path`` from a TFF result: (array, placement, stacked on a client axis)."""
  rest = list(path)
  placement = None
  while True:
    if isinstance(type_, tff.FederatedType):
      placement = _placement_name(type_)
      if placement == "CLIENTS" and not type_.all_equal:
        parts = [select_output(v, type_.member, rest, where)[0] for v in value]
        if not parts:
          raise ProtocolError(f"{where}: the CLIENTS result at {path} holds no clients")
        return np.stack(parts), placement, True
      type_ = type_.member
      if isinstance(type_, tff.TensorType) and not rest:
        return np.asarray(value), placement, False
      continue
    if not rest:
      break
    index = _struct_step(type_, rest, path, where)
    value, type_ = element(value, index), type_[index]
  _require_tensor(type_, path, where)
  return np.asarray(value), placement, False


def extract_outputs(result: Any, result_type: Any, entries: list[dict], prefix: str,
                    where: str) -> dict[str, np.ndarray]:
  """The manifest's output leaves of ``result``, keyed ``prefix + name``, checked against it."""
  out = {}
  for entry in entries:
    array, placement, stacked = select_output(result, result_type, entry.get("path", []),
                                              f"{where} {entry['name']!r}")
    declared = entry.get("placement")
    if declared is not None and str(declared).upper() != (placement or ""):
      raise ProtocolError(f"{where}: {entry['name']!r} declared {declared} but the type places it "
                          f"at {placement}")
    if "dtype" in entry and array.dtype != np.dtype(entry["dtype"]):
      raise ProtocolError(f"{where}: {entry['name']!r} came back as {array.dtype}, the manifest "
                          f"says {entry['dtype']}")
    shape = array.shape[1:] if stacked else array.shape
    if entry.get("shape") is not None and (
        len(shape) != len(entry["shape"])
        or any(m is not None and m != s for m, s in zip(entry["shape"], shape))):
      raise ProtocolError(f"{where}: {entry['name']!r} came back with shape {list(shape)}"
                          f"{' per client' if stacked else ''}, the manifest says {entry['shape']}")
    out[prefix + entry["name"]] = array
  return out

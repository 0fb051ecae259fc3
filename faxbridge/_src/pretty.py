"""Readable text for a traced computation: every variable with its placement."""

from __future__ import annotations

import itertools
import string

from jax.extend import core as jcore

from faxbridge._src.aggregations import AGGREGATIONS
from faxbridge._src.placements import CLIENTS
from faxbridge._src.primitives import broadcast_p, map_p


def _names():
  for size in itertools.count(1):
    for letters in itertools.product(string.ascii_lowercase, repeat=size):
      yield "".join(letters)


def input_names(traced) -> list[str]:
  """The names :func:`pretty_traced` gives the inputs of ``traced``'s jaxpr, in order: it names the
  constants first, then the inputs."""
  names = _names()
  for _ in traced.jaxpr.jaxpr.constvars:
    next(names)
  return [next(names) for _ in traced.jaxpr.jaxpr.invars]


def _type(aval, place) -> str:
  if place is CLIENTS:
    per_client = aval.update(shape=aval.shape[1:]).str_short(short_dtypes=True)
    return f"{{{per_client}}}@CLIENTS"
  return f"{aval.str_short(short_dtypes=True)}@SERVER"


def _params(eqn) -> str:
  shown = {k: v for k, v in eqn.params.items() if k not in ("jaxpr", "call_jaxpr")}
  if not shown:
    return ""
  return "[" + " ".join(f"{k}={v}" for k, v in shown.items()) + "]"


def _indent(text: str, prefix: str) -> str:
  return "\n".join(prefix + line for line in text.splitlines())


def pretty_traced(traced) -> str:
  names, env = _names(), traced.var_placements
  given: dict = {}

  def name(atom) -> str:
    if isinstance(atom, jcore.Literal):
      return str(atom.val)
    if atom not in given:
      given[atom] = next(names)
    return given[atom]

  def decl(v) -> str:
    return f"{name(v)}:{_type(v.aval, env.get(v))}"

  jaxpr = traced.jaxpr.jaxpr
  lines = [
      f"federated computation {traced.name} (clients={traced.clients})",
      "{ lambda " + " ".join(decl(v) for v in jaxpr.constvars) + "; "
      + " ".join(decl(v) for v in jaxpr.invars) + ". let",
  ]
  for eqn in jaxpr.eqns:
    outs = " ".join(decl(v) for v in eqn.outvars)
    ins = " ".join(name(a) for a in eqn.invars)
    prim = eqn.primitive.name
    if eqn.primitive is map_p:
      lines.append(f"    {outs} = fb.map {ins}")
      lines.append("      per-client:")
      lines.append(_indent(str(eqn.params["jaxpr"]), "        "))
      continue
    if eqn.primitive is broadcast_p:  # its one param, the number of clients, is in the types
      label, shown = "fb.broadcast", ""
    elif eqn.primitive in AGGREGATIONS:  # by kind, with the params that travel with it
      label, shown = f"fb.{AGGREGATIONS[eqn.primitive].kind}", _params(eqn)
    else:
      label, shown = prim, _params(eqn)
    lines.append(f"    {outs} = {label}{shown} {ins}")
  lines.append("  in (" + " ".join(name(v) for v in jaxpr.outvars) + ") }")
  return "\n".join(lines)

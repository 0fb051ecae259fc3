"""Placements (SERVER, CLIENTS) and placement inference over a jaxpr.

A federated computation's jaxpr is ordinary JAX plus the federated primitives of
``faxbridge._src.primitives``. Placement inference walks it once, from the placements of the inputs:

* ``broadcast``: SERVER -> CLIENTS; ``map``: CLIENTS... -> CLIENTS;
* aggregations (``sum``, ``mean``, ``weighted_mean``, ``secure_sum``, ``max``, ``min``): CLIENTS -> SERVER;
* call-like primitives (``jit``, ``custom_jvp_call``...) are entered, so placements flow through them;
* every other JAX primitive is server work: it may only see SERVER values.

Anything else is a :class:`~faxbridge._src.errors.PlacementError` naming the user's ``file:line``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import core as jcore
from jax.extend.core import primitives as jprims

from faxbridge._src.errors import PlacementError
from faxbridge._src.locations import describe, enclosing


class Placement(enum.Enum):
  """Where a value lives: on the one server, or one copy per client (leading axis = clients)."""

  SERVER = "SERVER"
  CLIENTS = "CLIENTS"

  def __repr__(self) -> str:
    return f"fb.{self.value}"

  __str__ = __repr__


SERVER = Placement.SERVER
CLIENTS = Placement.CLIENTS

# Primitives that merely wrap a sub-jaxpr, and the param holding it: placements flow into and out of
# them unchanged. Keyed by the Primitive object, as JAX keys its own rule tables.
_CALL_LIKE: dict[jcore.Primitive, str] = {
    jprims.jit_p: "jaxpr",
    jprims.closed_call_p: "call_jaxpr",
    jprims.call_p: "call_jaxpr",
    jprims.custom_jvp_call_p: "call_jaxpr",
    jprims.custom_vjp_call_p: "call_jaxpr",
    jprims.remat_p: "jaxpr",
}
# Primitives that only annotate a value (its layout on devices), at any placement.
PLACEMENT_PRESERVING = frozenset({jprims.sharding_constraint_p, jprims.copy_p, jprims.device_put_p})

# primitive -> rule(eqn, in_placements) -> out_placements. Filled by faxbridge._src.primitives.
RULES: dict[jcore.Primitive, Callable[[Any, Sequence[Placement]], list[Placement]]] = {}


def has_federated(jaxpr: jcore.Jaxpr) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in it holds a federated primitive."""
  return any(
      eqn.primitive in RULES or any(has_federated(s) for s in jcore.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
  )


def _server_work(eqn, in_places: Sequence[Placement], where=None) -> list[Placement]:
  if any(has_federated(s) for s in jcore.jaxprs_in_params(eqn.params)):
    raise PlacementError(
        f"federated operations inside '{eqn.primitive.name}'{describe(eqn.source_info, where)}: lax control "
        "flow cannot contain fb.broadcast, fb.map or aggregations, because the number of server/client "
        "round trips must be static. Unroll the loop in Python (for _ in range(k): ...), or keep "
        "the fb operations outside the loop."
    )
  if CLIENTS in in_places:
    raise PlacementError(
        f"JAX operation '{eqn.primitive.name}' was applied to a CLIENTS-placed value outside "
        f"fb.map{describe(eqn.source_info, where)}. Outside fb.map only SERVER values may be computed on. "
        "Write per-client work inside fb.map(fn, ...), and combine clients with an aggregation: "
        "fb.sum(x) instead of x.sum(axis=0), fb.mean(x) instead of x.mean(axis=0)."
    )
  return [SERVER] * len(eqn.outvars)


def call_body(eqn) -> tuple[jcore.Jaxpr, tuple] | None:
  """The jaxpr and consts a call-like equation (jit, custom_jvp_call...) runs, else None."""
  param = _CALL_LIKE.get(eqn.primitive)
  if param is None:
    return None
  if param in eqn.params:
    sub = eqn.params[param]
  else:  # the parameter was renamed (JAX's business): a call runs the one jaxpr among its params
    subs = [v for v in eqn.params.values() if isinstance(v, jcore.ClosedJaxpr | jcore.Jaxpr)]
    if len(subs) != 1:
      raise NotImplementedError(f"call-like primitive '{eqn.primitive.name}' without a single jaxpr "
                                f"parameter: {sorted(eqn.params)}")
    sub = subs[0]
  return (sub.jaxpr, tuple(sub.consts)) if isinstance(sub, jcore.ClosedJaxpr) else (sub, ())


def infer(jaxpr: jcore.Jaxpr, in_places: Sequence[Placement],
          where=None) -> tuple[list[Placement], dict]:
  """Placements of ``jaxpr``'s outputs, and of every variable (``{Var: Placement}``).

  ``where`` is the source_info of the equation that encloses ``jaxpr`` (a jit or custom_jvp call):
  an error about an equation inside library code (``jax.nn.relu``'s body) names the user's line
  that called it.

  Raises:
    PlacementError: at the first equation that uses a value at the wrong placement.
  """
  env: dict = {}
  for v in jaxpr.constvars:
    env[v] = SERVER
  if len(in_places) != len(jaxpr.invars):
    raise ValueError(f"{len(in_places)} placements for {len(jaxpr.invars)} jaxpr inputs")
  env.update(zip(jaxpr.invars, in_places))

  def read(atom) -> Placement:
    return SERVER if isinstance(atom, jcore.Literal) else env[atom]

  for eqn in jaxpr.eqns:
    places = [read(a) for a in eqn.invars]
    rule = RULES.get(eqn.primitive)
    if rule is not None:
      out = rule(eqn, places)
    elif eqn.primitive in PLACEMENT_PRESERVING:
      out = places[: len(eqn.outvars)]
    elif (body := call_body(eqn)) is not None and (CLIENTS in places or has_federated(body[0])):
      out, sub_env = infer(body[0], places, enclosing(eqn.source_info, where))
      env.update(sub_env)
    else:
      out = _server_work(eqn, places, where)
    env.update(zip(eqn.outvars, out))
  return [read(v) for v in jaxpr.outvars], env

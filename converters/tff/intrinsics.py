"""The federated_language intrinsic of each aggregation: the tff target's own table.

Keyed by the aggregation's Primitive (as every rule table is), so the core's aggregation rules know
no target. ``INTRINSICS[prim](value, weight, params)`` aggregates ``value`` (a ``{T}@CLIENTS``
struct of uploads of one kind, weight and params) into ``T@SERVER``; ``weight`` is the per-client
weight of a weighted kind (else None), ``params`` the aggregation's params by name. An aggregation
without an entry (one defined outside faxbridge) is refused by :func:`intrinsic`; a package that
knows how TFF computes it may add its entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import federated_language as fl

from faxbridge.extend import (
  Aggregation,
  ExportError,
  describe,
  max_p,
  mean_p,
  min_p,
  secure_sum_p,
  sum_p,
  weighted_mean_p,
)

Intrinsic = Callable[[Any, Any, dict[str, Any]], Any]

INTRINSICS: dict[Any, Intrinsic] = {
    sum_p: lambda value, weight, params: fl.federated_sum(value),
    mean_p: lambda value, weight, params: fl.federated_mean(value),
    weighted_mean_p: lambda value, weight, params: fl.federated_mean(value, weight),
    secure_sum_p: lambda value, weight, params: fl.federated_secure_sum_bitwidth(
        value, params["bitwidth"]),
    max_p: lambda value, weight, params: fl.federated_max(value),
    min_p: lambda value, weight, params: fl.federated_min(value),
}


def intrinsic(agg: Aggregation) -> Intrinsic:
  """The intrinsic that computes ``agg`` in a federated_language computation.

  Raises:
    ExportError: the aggregation's kind has none (naming it and the user's ``file:line``).
  """
  found = INTRINSICS.get(agg.rule.primitive)
  if found is None:
    raise ExportError(
        f"aggregation '{agg.kind}'{describe(agg.source_info)} has no federated_language intrinsic, "
        "so target 'tff' cannot export it. Export with --target=stablehlo or --target=tflite, "
        "whose plan runtimes run any aggregation by its rule, or give TFF its intrinsic in "
        "faxbridge.converters.tff.intrinsics.INTRINSICS.")
  return found


__all__ = ["INTRINSICS", "intrinsic"]

"""``fb.secure_sum`` on Flower: the stage's secure sums run through Flower's SecAgg+, exactly.

Flower 1.42 has secure aggregation only in its legacy API: the ServerApp drives
``flwr.server.workflow.SecAggPlusWorkflow`` (four message exchanges: setup, share keys, collect
masked vectors, unmask) and each node runs ``flwr.client.mod.secaggplus_mod`` around its default
``train`` handler, which returns a ``FitRes`` whose parameters the mod quantizes, masks and uploads.
The server only ever sees masked vectors and their sum. SecAgg+ computes a weighted *mean* of
float vectors, quantized stochastically; configured as below it is an exact sum of integers.

**The arithmetic.** For one SecAgg+ pass over ``n`` nodes whose integer values lie in
``[-2**b, 2**b]`` (``b`` the largest bitwidth in the pass): clipping range ``c = 2**b``,
quantization range ``2**(b+1)``, unit weights (``max_weight=1``, ``num_examples=1``) and modulus
``2**32``. A node's value ``x`` is quantized to ``(x + c) * 2**(b+1) / (2 c) = x + 2**b``, an
integer in ``[0, 2**(b+1)]`` that stochastic rounding leaves as it is (it rounds up with
probability ``ceil(v) - v = 0``); the node adds masks that cancel in the sum modulo ``2**32``. The
server's sum of ``n`` quantized values, and of ``n`` weight factors ``2**(b+1)``, is at most
``n * 2**(b+1)``, recovered exactly when that stays below ``2**32``, i.e. ``n < 2**(31 - b)``
(``n = 2**(31-b)`` would wrap the weight sum to 0). Flower then returns the mean
``(sum_i q_i - n c) / n`` as float64; ``rint(mean * n)`` is the integer sum (the float error is
below ``2**32 * 2**-50``, far under 1/2), cast to the aggregation's dtype with wrap-around, as the
native rule's sum in that dtype wraps. :func:`encode`, :func:`decode` and :func:`check_exact` are that
arithmetic as pure functions.

**Values outside the range.** The native rule (``faxbridge.extend.aggregation_rule``) sums any
integers in the clients' dtype; ``[0, 2**b)`` is only the contract. SecAgg+ would clip a value
outside ``[-2**b, 2**b]`` silently, so each node checks its own values against each value's own
bitwidth before anything is masked, and refuses one outside, naming it (``encode``). Inside
``[-2**b, 2**b]`` the result equals native bit for bit.

**What stays in the clear.** A stage's other aggregations (sum, mean, max, ...) are uploaded and
aggregated in the clear as before. A value that the program only secure-sums (no other
aggregation, not a CLIENTS output: :func:`hidden`) is never uploaded in the clear: the server does
not ask for it and a node refuses to send it. All secure sums of one stage go through one SecAgg+
pass (their values flattened into one vector).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from faxbridge import CLIENTS
from faxbridge.extend import (
  Aggregation,
  FederatedForm,
  TensorSpec,
  VerificationError,
  secure_sum_p,
)

MODULUS = 2**32  # SecAgg+'s modulus_range (its masks are drawn in [0, 2**32 - 1))
MIN_NODES = 2  # Flower's workflow halts with fewer sampled nodes
# The fit config's keys: what the ServerApp asks a node to contribute to a pass.
INVOCATION, COMPUTATION, STAGE, VALUES = "invocation", "computation", "stage", "values"


# -- which aggregations, which values ---------------------------------------------------------------
def is_secure(agg: Aggregation) -> bool:
  """Whether ``agg`` is an ``fb.secure_sum`` (keyed by its primitive, not its kind's name)."""
  return agg.rule.primitive is secure_sum_p


def secure_values(aggregations: Sequence[Aggregation]) -> dict[str, int]:
  """The values the secure sums among ``aggregations`` sum, in order, each with the smallest
  bitwidth any of them declares for it (the range a node checks it against)."""
  out: dict[str, int] = {}
  for agg in aggregations:
    if is_secure(agg):
      b = int(agg.params["bitwidth"])
      out[agg.value] = min(b, out.get(agg.value, b))
  return out


def hidden(form: FederatedForm) -> set[str]:
  """The CLIENTS values of ``form`` that are only secure-summed: no other aggregation reads them
  and they are no CLIENTS output. They never leave a node in the clear."""
  secure: set[str] = set()
  clear: set[str] = set()
  for stage in form.stages:
    for agg in stage.aggregations:
      (secure if is_secure(agg) else clear).update(n for n in (agg.value, agg.weight) if n)
  clear |= {b.name for b in form.outputs if b.placement is CLIENTS}
  return secure - clear


def client_value_specs(form: FederatedForm) -> dict[str, TensorSpec]:
  """One client's spec of every CLIENTS value of ``form`` a stage can aggregate: its inputs and
  the outputs of its client pieces."""
  specs = {b.name: b.spec for b in form.inputs}
  for stage in form.stages:
    specs.update({s.name: s for s in stage.client_work.outputs})
  return specs


# -- the arithmetic -----------------------------------------------------------------------------------
def bound(bitwidth: int) -> int:
  """The exclusive upper bound on the nodes of an exact pass with values of ``bitwidth`` bits."""
  return 2 ** (31 - bitwidth) if bitwidth <= 31 else 0


def check_exact(what: str, bitwidth: int, nodes: int) -> None:
  """Refuse a pass that SecAgg+ cannot compute exactly (see the module docstring).

  Raises:
    VerificationError: ``nodes`` is not in ``[2, 2**(31 - bitwidth))``, naming ``what`` (the
      aggregations), the bitwidth, the nodes and the bound.
  """
  limit = bound(bitwidth)
  if MIN_NODES <= nodes < limit:
    return
  if nodes < MIN_NODES:
    raise VerificationError(f"{what}: Flower's SecAgg+ needs at least {MIN_NODES} sampled nodes, "
                            f"this invocation samples {nodes}")
  raise VerificationError(
      f"{what}: bitwidth {bitwidth} over {nodes} nodes is beyond what Flower's SecAgg+ sums "
      f"exactly: each node's value is quantized into [0, 2**{bitwidth + 1}] and the sum must stay "
      f"below its 2**32 modulus, so n < 2**(31 - b) = {limit} nodes (b <= 29 with at least 2 "
      "nodes); sample fewer nodes (clients-per-round) or declare a smaller bitwidth")


def workflow_parameters(bitwidth: int, nodes: int) -> dict[str, Any]:
  """``SecAggPlusWorkflow``'s arguments for an exact pass: every node shares its secrets with
  every other (``num_shares = n``, at least 3 as Flower requires), a majority reconstructs."""
  shares = max(nodes, 3)
  return {"num_shares": shares, "reconstruction_threshold": max(2, shares // 2 + 1),
          "max_weight": 1.0, "clipping_range": float(2**bitwidth),
          "quantization_range": 2 ** (bitwidth + 1), "modulus_range": MODULUS}


def encode(values: Mapping[str, np.ndarray], bitwidths: Mapping[str, int], who: str) -> np.ndarray:
  """A node's values as the one int64 vector it hands to SecAgg+ (in the order of ``bitwidths``).

  Raises:
    VerificationError: a value is not an integer array, or lies outside ``[-2**b, 2**b]`` for its
      own bitwidth ``b`` (SecAgg+ would clip it silently; native would sum it): names ``who``, the
      value, its index and the range.
  """
  parts = []
  for name, b in bitwidths.items():
    x = np.asarray(values[name])
    if not np.issubdtype(x.dtype, np.integer):
      raise VerificationError(f"{who}: secure_sum value {name!r} is {x.dtype}, not an integer")
    # Compare in the value's own dtype family (uint64 does not fit int64) before any cast.
    lo, hi = -(2**b), 2**b
    wide = x.astype(np.uint64) if np.issubdtype(x.dtype, np.unsignedinteger) else x.astype(np.int64)
    bad = np.flatnonzero((wide > hi) | ((wide < lo) if wide.dtype == np.int64 else False))
    if bad.size:
      i = tuple(int(j) for j in np.unravel_index(bad[0], x.shape))
      raise VerificationError(
          f"{who}: secure_sum[bitwidth={b}] value {name!r}{list(i) if x.ndim else ''} is "
          f"{int(x[i])}, outside [-2**{b}, 2**{b}] ({bad.size} such entries): Flower's SecAgg+ "
          "would clip it silently where faxbridge's native sum would not, so it is refused")
    parts.append(wide.astype(np.int64).reshape(-1))
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def decode(mean: np.ndarray, nodes: int, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
  """The sums SecAgg+'s mean over ``nodes`` stands for, split into ``specs`` (name, shape, dtype
  of each value, in the order :func:`encode` concatenated them), each in its dtype with wrap-around
  as the native sum in that dtype."""
  total = np.rint(np.asarray(mean, np.float64).reshape(-1) * nodes).astype(np.int64)
  out, at = {}, 0
  for spec in specs:
    size = int(np.prod(spec.shape, dtype=np.int64))
    out[spec.name] = total[at:at + size].reshape(spec.shape).astype(spec.dtype)
    at += size
  if at != total.size:
    raise VerificationError(f"SecAgg+ returned {total.size} sums, the pass expects {at}")
  return out


# -- the ServerApp's side -------------------------------------------------------------------------------
def describe_pass(aggregations: Sequence[Aggregation]) -> str:
  """``secure_sum[bitwidth=16] of counts (-> histogram)``, for each secure sum in a pass."""
  return ", ".join(f"{a.label} of {a.user_value} (-> {a.user_result})" for a in aggregations)


class _Relay:
  """The Grid the SecAgg+ workflow talks to: each of its exchanges is the ServerApp's own
  ``exchange`` (pulls replies every 0.1 s instead of Flower's 3 s, honours ``round-timeout``, and
  raises at once, naming the node, when a node fails or refuses: faxbridge's default is that a
  round fails with any node, where the workflow would drop it and go on)."""

  def __init__(self, exchange: Callable[[list, str], dict[int, Any]], what: str):
    self.exchange, self.what = exchange, what
    self.seconds: dict[str, float] = {}

  def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    messages = list(messages)
    stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "?"
    start = time.monotonic()
    replies = self.exchange(messages, f"{self.what}, SecAgg+ stage '{stage}'")
    self.seconds[stage] = time.monotonic() - start
    return list(replies.values())


def _strategy(node_ids: Sequence[int], relay: _Relay, config: dict[str, Any], got: list) -> Any:
  """The legacy Strategy the workflow asks which nodes to sample and what to send them (exactly
  ``node_ids``, the invocation's sample, with ``config``), and hands the unmasked mean to."""
  from flwr.common import FitIns, Parameters, parameters_to_ndarrays
  from flwr.server.compat.grid_client_proxy import GridClientProxy
  from flwr.server.strategy import Strategy

  class OnePass(Strategy):
    def initialize_parameters(self, client_manager):
      return None

    def configure_fit(self, server_round, parameters, client_manager):
      fit = FitIns(Parameters(tensors=[], tensor_type=""), dict(config))
      # The proxies only carry node ids here: the workflow sends through the relay itself.
      return [(GridClientProxy(node_id, relay, 0), fit) for node_id in node_ids]  # type: ignore[arg-type]

    def aggregate_fit(self, server_round, results, failures):
      if failures or len(results) != len(node_ids):
        raise VerificationError(f"{relay.what}: SecAgg+ aggregated {len(results)} of "
                                f"{len(node_ids)} nodes ({len(failures)} failed): {failures[:1]}")
      # The workflow set every result's parameters to the one unmasked aggregate.
      got.append(parameters_to_ndarrays(results[0][1].parameters))
      return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
      return []

    def aggregate_evaluate(self, server_round, results, failures):
      return None, {}

    def evaluate(self, server_round, parameters):
      return None

  return OnePass()


def secure_sums(exchange: Callable[[list, str], dict[int, Any]], invocation: str, form: FederatedForm,
                stage: int, node_ids: Sequence[int], record: dict[str, Any]) -> dict[str, np.ndarray]:
  """The results of stage ``stage``'s secure sums over ``node_ids``, by one SecAgg+ pass; what the
  pass did goes to ``record["secagg"]``.

  Raises:
    VerificationError: the pass is beyond the exact bound (before anything is sent), a node
      fails or refuses (its values out of range), or SecAgg+ halts.
  """
  from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
  from flwr.server import ServerConfig
  from flwr.server.compat.legacy_context import LegacyContext
  from flwr.server.workflow import SecAggPlusWorkflow
  from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

  aggregations = [a for a in form.stages[stage].aggregations if is_secure(a)]
  what = f"{invocation}: {describe_pass(aggregations)}"
  bitwidths = secure_values(aggregations)
  b = max(int(a.params["bitwidth"]) for a in aggregations)
  n = len(node_ids)
  check_exact(what, b, n)
  specs = client_value_specs(form)
  if not sum(int(np.prod(specs[v].shape, dtype=np.int64)) for v in bitwidths):
    sums = {v: np.zeros(specs[v].shape, specs[v].dtype) for v in bitwidths}  # nothing to mask
  else:
    relay = _Relay(exchange, what)
    config = {INVOCATION: invocation, COMPUTATION: form.name, STAGE: stage,
              VALUES: json.dumps(list(bitwidths))}
    got: list = []
    params = workflow_parameters(b, n)
    # A context of its own: the workflow's records stay out of the ServerApp's.
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), ServerConfig(num_rounds=1),
                            _strategy(node_ids, relay, config, got))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: stage + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    start = time.monotonic()
    SecAggPlusWorkflow(**params)(relay, context)  # type: ignore[arg-type]
    if not got:
      raise VerificationError(f"{what}: Flower's SecAgg+ halted without a result (the ServerApp's "
                              "log says why)")
    sums = decode(got[0][0], n, [specs[v] for v in bitwidths])
    record.setdefault("secagg", []).append(
        {"stage": stage, "aggregations": [a.label for a in aggregations], "values": list(bitwidths),
         "nodes": n, "bitwidth": b, "seconds": time.monotonic() - start,
         "stage_seconds": relay.seconds,
         **{k: v for k, v in params.items() if k in ("num_shares", "reconstruction_threshold")}})
  return {a.result.name: sums[a.value].astype(a.result.dtype) for a in aggregations}


# -- a node's side ------------------------------------------------------------------------------------
def node_values(form: FederatedForm, config: Mapping[str, Any], held: Mapping[str, np.ndarray],
                who: str) -> np.ndarray:
  """What a node contributes to a SecAgg+ pass (``config``: the fit config the ServerApp sent):
  the values its own plan secure-sums in that stage, taken from what it holds (``held``: its data
  and what it kept), checked and encoded.

  Raises:
    VerificationError: the ServerApp asks for other values than the node's plan secure-sums there,
      a value is missing or not of its planned shape and dtype, or out of range (``encode``).
  """
  stage = int(config[STAGE])
  if not 0 <= stage < len(form.stages):
    raise VerificationError(f"{who}: {form.name} has no stage {stage} to secure-sum")
  bitwidths = secure_values(form.stages[stage].aggregations)
  asked = json.loads(str(config[VALUES]))
  if asked != list(bitwidths):
    raise VerificationError(f"{who}: asked to secure-sum {asked} in stage {stage} of {form.name}, "
                            f"its plan.json secure-sums {list(bitwidths)} there")
  specs = client_value_specs(form)
  for name in bitwidths:
    if name not in held:
      raise VerificationError(f"{who}: secure_sum value {name!r} is neither in its data nor kept "
                              f"from an earlier stage of {config[INVOCATION]}")
    value, spec = np.asarray(held[name]), specs[name]
    if value.shape != tuple(spec.shape) or value.dtype != np.dtype(spec.dtype):
      raise VerificationError(f"{who}: secure_sum value {name!r} is {value.dtype}{list(value.shape)}, "
                              f"the plan says {spec.dtype}{list(spec.shape)}")
  return encode(held, bitwidths, who)


def fit_reply(vector: np.ndarray, metrics: Mapping[str, float]) -> Any:
  """The ``FitRes`` content ``secaggplus_mod`` reads: the vector, weight 1 (``max_weight`` is 1)."""
  from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
  from flwr.compat.common import recorddict_compat as compat

  return compat.fitres_to_recorddict(
      FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), 1, dict(metrics)), keep_input=False)


def fit_config(content: Any) -> dict[str, Any]:
  """The fit config of a SecAgg+ 'collect masked vectors' message."""
  from flwr.compat.common import recorddict_compat as compat

  return dict(compat.recorddict_to_fitins(content, keep_input=True).config)


__all__ = ["MIN_NODES", "MODULUS", "bound", "check_exact", "client_value_specs", "decode",
           "describe_pass", "encode", "fit_config", "fit_reply", "hidden", "is_secure", "node_values",
           "secure_sums", "secure_values", "workflow_parameters"]

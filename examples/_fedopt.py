"""FedOpt (Reddi et al., 2021), shared by ``fedadam`` and ``fedyogi``: clients run one epoch of local
SGD over their own examples (``_mlp.sgd_epoch``: an ``fb.fold`` over the client's batches) from the
server model and upload their model deltas; the server averages them (weighted by each client's
real number of examples n_k, as FedAvg does) and feeds the negated mean delta to a server optimizer as
its gradient (the pseudo-gradient):

    g_t = -sum_k n_k (w_k - w_t) / sum_k n_k
    (u_t, s_{t+1}) = opt.update(g_t, s_t, w_t),   w_{t+1} = w_t + u_t

The optimizer is an optax ``GradientTransformation``; its state ``s`` is part of the server state
``{"params": w, "opt": s}``, so it crosses rounds (and an export's rounds) as state does. optax
keeps its state in NamedTuples, which ``jax.export`` cannot serialize without a registration that
every loading process would need too, so the server state holds it as plain dicts (field name ->
value) and tuples, rebuilt into optax's types for each update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import faxbridge as fb

from . import _data, _mlp


def to_plain(tree: Any) -> Any:
  """optax state with NamedTuples as dicts by field name (an empty one as ``{}``), tuples kept."""
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return {f: to_plain(v) for f, v in zip(tree._fields, tree)}
  if isinstance(tree, (tuple, list)):
    return tuple(to_plain(v) for v in tree)
  return tree


def from_plain(template: Any, plain: Any) -> Any:
  """The inverse of ``to_plain``, shaped like ``template`` (an optax state of the same optimizer)."""
  if isinstance(template, tuple) and hasattr(template, "_fields"):
    return type(template)(*(from_plain(t, plain[f]) for f, t in zip(template._fields, template)))
  if isinstance(template, (tuple, list)):
    return type(template)(from_plain(t, p) for t, p in zip(template, plain))
  return plain


def fedopt_process(server_opt: optax.GradientTransformation, local_lr: float,
                   name: str) -> fb.IterativeProcess:
  """The FedOpt ``IterativeProcess`` with ``server_opt`` on the server and SGD(``local_lr``) on
  the clients; ``next(state, data)`` returns ``(state, {"update_norm": |g_t|})``, ``data`` the
  clients' own examples as ``_data.client_examples`` gives them (an ``fb.Ragged``)."""

  def client_update(params, data):
    trained, _ = _mlp.sgd_epoch(params, data, local_lr)
    return jax.tree.map(lambda new, old: new - old, trained, params)

  def next_round(state, data):
    updates = fb.map(client_update, fb.broadcast(state["params"]), data)
    pseudo_grad = jax.tree.map(jnp.negative, fb.weighted_mean(updates, data.count))
    opt_state = from_plain(server_opt.init(state["params"]), state["opt"])  # types only
    step, opt_state = server_opt.update(pseudo_grad, opt_state, state["params"])
    params = optax.apply_updates(state["params"], step)
    update_norm = optax.tree.norm(pseudo_grad)
    return {"params": params, "opt": to_plain(opt_state)}, {"update_norm": update_norm}

  def init():
    params = _mlp.init_params()
    return {"params": params, "opt": to_plain(server_opt.init(params))}

  next_round.__name__ = f"{name}_round"
  init.__name__ = f"{name}_initialize"
  return fb.IterativeProcess(fb.computation(init),
                             fb.computation(next_round, in_placements=(fb.SERVER, fb.CLIENTS)))


def example_inputs(process: fb.IterativeProcess, clients: int, *,
                   batch_size: int) -> tuple[Any, fb.Ragged]:
  """The initial server state and one round of digits client data: ``_data.example_clients``
  (8 clients holding 1 to 562 examples, padded to 576)."""
  return process.initialize(), _data.example_clients(clients, batch_size=batch_size)


def train(process: fb.IterativeProcess, *, rounds: int, clients: int, batch_size: int,
          log) -> list[dict]:
  """Train natively from ``initialize`` on digits (Dirichlet(0.5): every client one epoch over its
  own examples per round) and report the held-out loss and accuracy per round."""
  return _mlp.simulate(process, rounds=rounds, clients=clients, batch_size=batch_size,
                       params_of=lambda state: state["params"], log=log)

"""``fb.events``: listeners get the library's progress in order, nested listeners each get what
happens inside their block, and nothing is left registered; the events of an export and of a
verification arrive in the order the work is done, each lowering naming the file it wrote."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import faxbridge as fb
from faxbridge.extend import emit


def test_listeners_get_the_events_of_their_block_in_order_and_are_removed_after():
  outer, inner = [], []
  emit("before", "nobody listens")
  with fb.events.listen(outer.append):
    emit("a", "one", n=1)
    with fb.events.listen(inner.append):
      emit("b", "two")
    emit("c", "three")
  emit("after", "nobody listens")
  assert [(e.name, e.message) for e in outer] == [("a", "one"), ("b", "two"), ("c", "three")]
  assert [e.name for e in inner] == ["b"]
  assert outer[0].fields == {"n": 1}
  assert outer[0].time <= outer[1].time <= outer[2].time


def test_a_listener_is_removed_when_its_block_raises_and_the_same_one_may_nest():
  seen = []
  with pytest.raises(RuntimeError), fb.events.listen(seen.append):
    with fb.events.listen(seen.append):
      emit("twice", "")
    emit("once", "")
    raise RuntimeError
  emit("none", "")
  assert [e.name for e in seen] == ["twice", "twice", "once"]


@fb.computation()
def initialize():
  return jnp.zeros((2,), jnp.float32)


@fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
def step(w, data):
  delta = fb.mean(fb.map(lambda w, x: jnp.mean(x, axis=0) - w, fb.broadcast(w), data))
  return w + delta, fb.sum(fb.map(lambda x: jnp.sum(x * x), data))


process = fb.IterativeProcess(initialize, step)


def test_an_export_and_a_verification_report_their_steps_in_order(tmp_path):
  data = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
  seen = []
  with fb.events.listen(seen.append):
    out = fb.export(process, data, target="stablehlo", out_dir=tmp_path / "out")
    exported = len(seen)
    report = fb.verify(out, data, runtime="iree", rounds=2)
  assert report.ok
  names = [e.name for e in seen]
  plan = json.loads((out / "plan.json").read_text())
  written = [(c, piece["name"]) for c, comp in plan["computations"].items()
             for stage in comp["stages"] for piece in (stage["server_prepare"], stage["client_work"])
             if piece["files"]] + [(c, comp["server_result"]["name"])
                                   for c, comp in plan["computations"].items()]
  # One lowering per piece file the export holds (server_result last in each computation).
  lowered = [(e.fields["computation"], e.fields["piece"]) for e in seen[:exported]
             if e.name == "stablehlo.lower"]
  assert sorted(lowered) == sorted(written) and len(lowered) == len(written)
  assert names[:exported] == ["export.load", "export.split", *["stablehlo.lower"] * len(written),
                              "export.native"]
  assert seen[1].message == f"tracing and splitting {process.__name__}"
  rounds = [(e.fields["who"], e.message) for e in seen if e.name == "round"]
  assert names[exported:] == ["verify.files", "verify.load", "verify.runtime", "round", "round",
                              "round", "verify.native", "round", "round", "round"]
  assert rounds == [("iree", "iree: initialize"), ("iree", "iree: round 1 of 2"),
                    ("iree", "iree: round 2 of 2"), ("native", "native: initialize"),
                    ("native", "native: round 1 of 2"), ("native", "native: round 2 of 2")]
  assert [e.time for e in seen] == sorted(e.time for e in seen)

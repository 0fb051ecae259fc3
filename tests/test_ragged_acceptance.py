"""Issue 19's acceptance on the FedAvg example (examples/fedavg.py, clients holding their real
partitions of the digits): ONE export serves federations of other clients and other sizes.

* tff: one export of ``fedavg.process`` verifies on TFF 0.87 with clients of 8 different sizes
  (0, 1, 17, 250, 562 examples among them), and again with 8 others, against the native program;
* tflite: the same client ``.tflite`` file serves both federations on LiteRT.

Every file of each export is the same before and after (nothing is re-exported or rewritten).

The native side of ``fb.verify`` is the export's stored program, made for the example's 8 clients
padded to 576 examples (each federation here is padded the same); every runtime gets each client's
own rows only.
The numpy references of the example (tests/algorithm_references.py) and of the exporters
(tests/test_ragged_stablehlo.py, tests/test_ragged_tf.py) are the independent answers; here the
question is one artifact for all sizes.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest

import faxbridge as fb
from examples import _data, fedavg

pytestmark = pytest.mark.slow

FEDERATIONS = {"first": [0, 1, 17, 250, 562, 3, 40, 9],
               "second": [300, 2, 100, 33, 0, 64, 8, 128]}


def federation(sizes: list[int]) -> fb.Ragged:
  """Clients holding ``sizes`` digits each, disjoint slices of the train split, padded as the
  example's export inputs are (``_data.EXAMPLE_LENGTH``, batches of ``fedavg.BATCH_SIZE``)."""
  x, y, _, _ = _data.load_digits_split(0)
  cuts = np.cumsum([0, *sizes])
  parts = [np.arange(a, b) for a, b in itertools.pairwise(cuts)]
  return _data.client_examples(x, y, parts, batch_size=fedavg.BATCH_SIZE,
                               length=_data.EXAMPLE_LENGTH)


def _sha(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("target", "runtime"), [("tff", "tff"), ("tflite", "litert")])
def test_one_fedavg_export_serves_clients_of_many_sizes(target, runtime, tmp_path):
  out = fb.export(fedavg.process, *fedavg.example_inputs()[1:], target=target,
                  out_dir=tmp_path / target)
  files = sorted(p for p in out.rglob("*") if p.is_file())  # tff: the computations' protos
  if target == "tflite":
    assert any(p.suffix == ".tflite" and "client_work" in p.name for p in files)
  before = {p: _sha(p) for p in files}
  for name, sizes in FEDERATIONS.items():
    data = federation(sizes)
    assert sorted(np.asarray(data.count).tolist()) == sorted(sizes)
    report = fb.verify(out, data, runtime=runtime, rounds=2)
    assert report.ok, f"{name} federation {sizes}:\n{report}"
  assert {p: _sha(p) for p in files} == before  # the same files served both federations

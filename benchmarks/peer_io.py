"""What the peers' rounds (``pfl_round.py``, ``flower_round.py``, in .venv-bench) share: reading the
anchor round's inputs, checking a round against the reference, timing, and the peak memory of a process
tree. numpy and the standard library only: it runs in every environment.

``fedavg_round.py peers`` (in .venv) writes a folder of inputs for N clients:

* ``params.npz``: the model (``w1``, ``b1``, ``w2``, ``b2``: benchmarks/_fedavg_model.py's init_params);
* ``x.npy`` float32 [N, 2, 16, 256], ``y.npy`` int32 [N, 2, 16]: the clients' data (client_data);
* ``reference.npz``: the round's result by ``_fedavg_model.reference_round`` (plain JAX, one client at
  a time): the independent answer each peer's first round is checked against before it is timed.

A peer prints one JSON object on its last stdout line: ``check`` (max abs difference per parameter),
then either ``times_s`` (per round) or ``mismatch`` (why no time is given).
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np

PARAM_NAMES = ("w1", "b1", "w2", "b2")  # as benchmarks/_fedavg_model.py
# float32 rounds by TF or XLA against XLA's own: observed differences are below 1e-6; a parameter
# left untrained differs by the learning rate times its gradient (about 1e-3).
ATOL, RTOL = 1e-5, 1e-4


def load(folder: Path, mmap: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
  """The model (by name), the clients' features and labels (memory-mapped with ``mmap``)."""
  folder = Path(folder)
  params = dict(np.load(folder / "params.npz"))
  mode = "r" if mmap else None
  return params, np.load(folder / "x.npy", mmap_mode=mode), np.load(folder / "y.npy", mmap_mode=mode)


def check(folder: Path, got: dict) -> dict:
  """``got`` (name -> array) against ``reference.npz``: the max abs difference per parameter and
  whether all are within ATOL + RTOL * |reference|."""
  want = dict(np.load(Path(folder) / "reference.npz"))
  diffs, ok = {}, True
  for name in PARAM_NAMES:
    g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
    if g.shape != w.shape:
      return {"ok": False, "why": f"{name}: shape {g.shape}, reference {w.shape}"}
    diffs[name] = float(np.max(np.abs(g - w)))
    ok = ok and bool(np.allclose(g, w, rtol=RTOL, atol=ATOL))
  return {"ok": ok, "max_abs_diff": diffs, "atol": ATOL, "rtol": RTOL}


def mismatch_reason(checked: dict, got: dict, initial: dict) -> str:
  """In words: which parameters differ from the reference, and which of those the round left as they
  were (never trained)."""
  if "why" in checked:
    return checked["why"]
  bad = [n for n, d in checked["max_abs_diff"].items() if d > ATOL]
  still = [n for n in bad if np.array_equal(np.asarray(got[n]), np.asarray(initial[n]))]
  text = "differs from the reference round in " + ", ".join(
      f"{n} (max abs diff {checked['max_abs_diff'][n]:.1e})" for n in bad)
  if still:
    text += f"; {', '.join(still)} left as they were: not trained"
  return text


def summary(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": len(times)}


def _children() -> dict[int, list[int]]:
  kids: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    kids.setdefault(ppid, []).append(int(entry))
  return kids


def tree_rss_mb(root: int | None = None) -> float:
  """The resident memory of a process and all its descendants (Ray's GCS, raylet and workers are
  the driver's), summed, in MB."""
  kids, total, todo = _children(), 0, [root or os.getpid()]
  while todo:
    pid = todo.pop()
    todo += kids.get(pid, [])
    try:
      with open(f"/proc/{pid}/statm") as f:
        total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
      pass
  return total / 2**20


class PeakMemory:
  """The peak of ``tree_rss_mb`` over the blocks it is entered for (sampled every ``every`` seconds
  by a thread), above the baseline taken when it is first entered, and this process's own
  ``ru_maxrss``."""

  def __init__(self, every: float = 0.05):
    self.every, self.peak_mb, self.baseline_mb = every, 0.0, None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _sample(self) -> None:
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, tree_rss_mb())
      self._stop.wait(self.every)

  def __enter__(self) -> PeakMemory:
    if self.baseline_mb is None:
      self.baseline_mb = tree_rss_mb()
    self._stop.clear()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self.peak_mb = max(self.peak_mb, tree_rss_mb())

  def report(self) -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak = max(self.peak_mb, own)
    return {"baseline_mb": self.baseline_mb, "peak_mb": peak, "delta_mb": peak - (self.baseline_mb or 0.0),
            "process_peak_mb": own}


def timed(fn, repeats: int, budget_s: float) -> list[float]:
  """``fn()`` ``repeats`` times (at least 3 unless ``budget_s`` is spent), seconds each."""
  times: list[float] = []
  start_all = time.perf_counter()
  for r in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
    if r >= 2 and time.perf_counter() - start_all > budget_s:
      break
  return times

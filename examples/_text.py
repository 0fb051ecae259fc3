"""A character corpus that ships with Python: the help topics of ``pydoc_data.topics`` (the text
``help("assert")`` prints, about 490 K characters in 79 topics), split by topic into non-IID
clients (one topic each) and a held-out set of topics, cut into fixed-length windows of character
ids.

A client holds its topic's own text: all of its windows, each once, from 6 windows for the
shortest topic to about 2,000 for the longest (an ``fb.Ragged``, counted per client)."""

from __future__ import annotations

from pydoc_data import topics as _topics

import numpy as np

import faxbridge as fb

# Printable ASCII (' ' .. '~', 95 characters) and the newline; anything else reads as a space.
VOCAB = 96
_NEWLINE = VOCAB - 1


def encode(text: str) -> np.ndarray:
  """Characters to ids in ``[0, VOCAB)``: ``ord(c) - 32`` for printable ASCII, 95 for newline."""
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
  ids = np.where((codes >= 32) & (codes < 127), codes - 32, 0)
  return np.where(codes == 10, _NEWLINE, ids).astype(np.int32)


def decode(ids: np.ndarray) -> str:
  return "".join("\n" if i == _NEWLINE else chr(int(i) + 32) for i in np.asarray(ids).ravel())


def _windows(ids: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
  starts = rng.integers(0, len(ids) - length, size=count)
  return np.stack([ids[s:s + length] for s in starts])


def text_windows(ids: np.ndarray, context: int) -> np.ndarray:
  """All the windows of ``context + 1`` ids a text has, in order: window j is
  ``ids[j * context : (j + 1) * context + 1]``, so consecutive windows share one id and every
  next-character pair of the text but a short tail is predicted once. int32 [(len - 1) // context,
  context + 1]."""
  count = (len(ids) - 1) // context
  return np.stack([ids[j * context: (j + 1) * context + 1] for j in range(count)]).astype(np.int32)


def topic_shards(clients: int, batch_size: int, context: int, *, max_windows: int | None = None,
                 length: int | None = None, heldout_windows: int = 256,
                 seed: int = 0) -> tuple[fb.Ragged, np.ndarray]:
  """Client data and a held-out set of windows of ``context + 1`` character ids.

  The topics, in a seeded order, are dealt out: every fifth to the held-out set, the rest to the
  clients, one topic each (its own vocabulary, style and length: non-IID by topic), in order,
  skipping topics of more than ``max_windows`` windows when that is given. Each client holds all
  the windows of its topic (``text_windows``), in a seeded random order. Returns
  ``(fb.Ragged({"tokens": int32 [clients, L, context + 1]}, count = each client's windows,
  batch_size), held-out int32 [heldout_windows, context + 1])``; ``L`` is ``length``, or the
  largest count where that is more (or ``length`` is None), rounded up to whole batches.
  """
  rng = np.random.default_rng(seed)
  names = sorted(_topics.topics)
  names = [names[i] for i in rng.permutation(len(names))]
  heldout_names, client_names = names[::5], [n for i, n in enumerate(names) if i % 5]
  shards = [text_windows(encode(_topics.topics[n]), context) for n in client_names]
  if max_windows is not None:
    shards = [w for w in shards if len(w) <= max_windows]
  if len(shards) < clients:
    raise ValueError(f"{len(shards)} topics cannot be dealt to {clients} clients")
  own = [{"tokens": w[rng.permutation(len(w))]} for w in shards[:clients]]
  largest = max(len(c["tokens"]) for c in own)
  data = fb.ragged(own, batch_size=batch_size,
                   max_length=None if length is None else max(length, largest))
  heldout = encode("\n".join(_topics.topics[n] for n in heldout_names))
  return data, _windows(heldout, heldout_windows, context + 1, rng)

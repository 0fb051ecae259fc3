"""A character corpus that ships with Python: the help topics of ``pydoc_data.topics`` (the text
``help("assert")`` prints, about 490 K characters in 79 topics), split by topic into non-IID
client shards and a held-out set of topics, cut into fixed-length windows of character ids."""

from __future__ import annotations

from pydoc_data import topics as _topics

import numpy as np

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


def topic_shards(clients: int, batches: int, batch_size: int, context: int,
                 heldout_windows: int = 256, seed: int = 0) -> tuple[dict, np.ndarray]:
  """Client data and a held-out set of windows of ``context + 1`` character ids.

  The topics, in a seeded order, are dealt out: every fifth to the held-out set, the rest to the
  clients in contiguous blocks, so each client holds a few topics only (its own vocabulary and
  style: non-IID by topic). Each client gets ``batches * batch_size`` windows sampled from its
  text. Returns ``({"tokens": int32 [clients, batches, batch_size, context + 1],
  "num_examples": float32 [clients]}, held-out int32 [heldout_windows, context + 1])``.
  """
  rng = np.random.default_rng(seed)
  names = sorted(_topics.topics)
  names = [names[i] for i in rng.permutation(len(names))]
  heldout_names, client_names = names[::5], [n for i, n in enumerate(names) if i % 5]
  if len(client_names) < clients:
    raise ValueError(f"{len(client_names)} topics cannot be dealt to {clients} clients")
  length = context + 1
  tokens = []
  for shard in np.array_split(np.arange(len(client_names)), clients):
    ids = encode("\n".join(_topics.topics[client_names[i]] for i in shard))
    tokens.append(_windows(ids, batches * batch_size, length, rng)
                  .reshape(batches, batch_size, length))
  heldout = encode("\n".join(_topics.topics[n] for n in heldout_names))
  data = {"tokens": np.stack(tokens),
          "num_examples": np.full(clients, batches * batch_size, np.float32)}
  return data, _windows(heldout, heldout_windows, length, rng)

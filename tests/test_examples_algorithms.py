"""DiLoCo, branch-train-merge, PAPA and the char-LM FedAvg: the examples' native rounds against
the independent references of ``algorithm_references.py`` (no faxbridge), the transformer against
a numpy forward pass with explicit per-head loops, and the text corpus's split. Wrong references
(plain momentum for Nesterov, a pull on the wrong round) are told apart."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from algorithm_references import (
  PAPA,
  ref_btm_init,
  ref_btm_round,
  ref_char_lm_round,
  ref_diloco_init,
  ref_diloco_round,
  ref_papa_init,
  ref_papa_round,
)

from examples import _text, _transformer, branch_train_merge, char_lm, diloco, papa

F32 = np.float32


def assert_trees_close(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
  got_paths, got_def = jax.tree_util.tree_flatten_with_path(got)
  want_leaves, want_def = jax.tree.flatten(want)
  assert got_def == want_def, (got_def, want_def)
  for (path, g), w in zip(got_paths, want_leaves):
    assert np.asarray(g).dtype == np.asarray(w).dtype, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_initial_states_match_the_references():
  for module, init in ((diloco, ref_diloco_init), (branch_train_merge, ref_btm_init),
                       (papa, ref_papa_init)):
    assert_trees_close(module.process.initialize(), init(), rtol=0, atol=0)


@pytest.mark.slow  # inner AdamW steps: 3 s; papa keeps a native-vs-reference round quick
def test_diloco_rounds_match_the_reference():
  state, data = diloco.example_inputs()
  for _ in range(2):  # the second round starts from a non-zero momentum buffer
    got = diloco.process.next(state, data)
    assert_trees_close(got, ref_diloco_round(state, data))
    state = jax.tree.map(np.asarray, got[0])
  wrong = ref_diloco_round(state, data, nesterov=False)  # heavy-ball momentum is told apart
  with pytest.raises(AssertionError):
    assert_trees_close(diloco.process.next(state, data)[0], wrong[0])


@pytest.mark.slow  # PAPA's quick test runs the same group training
def test_branch_train_merge_round_matches_the_reference():
  state, data = branch_train_merge.example_inputs()
  groups = data["group"]
  assert groups.sum(axis=0).min() >= 1  # every branch has a client
  got = branch_train_merge.process.next(state, data)
  want = ref_btm_round(state, data)
  assert_trees_close(got, want)
  # Each branch saw only its group, so they differ; the merge lies between them.
  w1 = want[0]["branches"]["w1"]
  assert not np.allclose(w1[0], w1[1])
  counts = np.asarray(data["digits"].count)
  np.testing.assert_allclose(want[1]["examples_per_branch"],
                             [counts[groups[:, k] == 1].sum() for k in (0, 1)])


@pytest.mark.slow  # the quick suite keeps the per-head attention and corpus checks
def test_papa_rounds_match_the_reference():
  state, data = papa.example_inputs()
  spread = lambda population: np.abs(population["w1"] - population["w1"].mean(axis=0)).max()
  for r in (1, 2, 3):  # PULL_EVERY = 2: round 2 pulls, rounds 1 and 3 do not
    got = papa.process.next(state, data)
    assert_trees_close(got, ref_papa_round(state, data))
    assert float(got[1]["pulled"]) == (PAPA["pull"] if r == 2 else 0.0)
    if r == 2:  # the pull halved the members' distance to their average (vs the same round unpulled)
      unpulled = ref_papa_round({**state, "round": np.int32(0)}, data)[0]["population"]
      np.testing.assert_allclose(spread(jax.tree.map(np.asarray, got[0]["population"])),
                                 0.5 * spread(unpulled), rtol=1e-4)
    state = jax.tree.map(np.asarray, got[0])
  # Round 4 pulls; a reference that skips that pull (off by one round) is told apart.
  late = ref_papa_round({**state, "round": np.int32(2)}, data)[0]["population"]
  with pytest.raises(AssertionError):
    assert_trees_close(papa.process.next(state, data)[0]["population"], late)


@pytest.mark.slow  # compiling the transformer's training twice takes ~9 s of CPU
def test_char_lm_round_matches_the_reference():
  params, data = char_lm.example_inputs()
  got = char_lm.process.next(params, data)
  assert_trees_close(got, ref_char_lm_round(params, data))
  with pytest.raises(AssertionError):  # a learning rate 1% off is told apart
    assert_trees_close(got, ref_char_lm_round(params, data, lr=0.303))


# -- the transformer and the corpus ----------------------------------------------------------------
def numpy_logits(p: dict, tokens: np.ndarray, heads: int = 2) -> np.ndarray:
  """The transformer in float64 numpy: an embedding lookup by index, heads and causal positions
  as explicit loops, tanh-approximated GELU."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  dh = p["embed"].shape[1] // heads

  def norm(x, s, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * s + b

  x = p["embed"][tokens] + p["pos"][:tokens.shape[1]]
  q, k, v = np.split(norm(x, p["ln1_scale"], p["ln1_bias"]) @ p["qkv"], 3, axis=-1)
  att = np.zeros_like(x)
  for b in range(tokens.shape[0]):
    for head in range(heads):
      cols = slice(head * dh, (head + 1) * dh)
      for t in range(tokens.shape[1]):
        s = k[b, :t + 1, cols] @ q[b, t, cols] / np.sqrt(dh)
        w = np.exp(s - s.max())
        att[b, t, cols] = (w / w.sum()) @ v[b, :t + 1, cols]
  x = x + att @ p["proj"]
  u = norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["mlp_in"]
  x = x + 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))) @ p["mlp_out"]
  return norm(x, p["lnf_scale"], p["lnf_bias"]) @ p["unembed"] + p["unembed_bias"]


def test_transformer_matches_numpy_attention():
  _, heldout = _text.topic_shards(8, 1, _transformer.CONTEXT, heldout_windows=3)
  params = _transformer.init_params(seed=3)
  tokens = heldout[:, :-1]
  logits = np.asarray(_transformer.logits(params, tokens))
  np.testing.assert_allclose(logits, numpy_logits(params, tokens), rtol=1e-4, atol=1e-4)
  # Causality: changing the last character changes no earlier position's logits.
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % _text.VOCAB
  other = np.asarray(_transformer.logits(params, changed))
  np.testing.assert_array_equal(logits[:, :-1], other[:, :-1])
  assert not np.allclose(logits[:, -1], other[:, -1])


def test_text_corpus_is_split_by_topic():
  """One topic per client, all of its windows each once (the text's own length: counts differ),
  the padding zeros; each client's histogram differs from every other's (non-IID by topic)."""
  from pydoc_data import topics

  data, heldout = _text.topic_shards(8, 4, 16, heldout_windows=5)
  tokens, counts = data.examples["tokens"], np.asarray(data.count)
  assert data.batch_size == 4 and tokens.dtype == np.int32 and tokens.shape[2] == 17
  assert tokens.shape[1] == -(-counts.max() // 4) * 4 and heldout.shape == (5, 17)
  assert tokens.min() >= 0 and tokens.max() < _text.VOCAB
  assert len(set(counts.tolist())) > 4 and counts.max() > 10 * counts.min()  # sizes vary
  assert _text.decode(_text.encode("def f(x):\n  return x")) == "def f(x):\n  return x"
  assert _text.decode(_text.encode("é")) == " "  # outside printable ASCII: a space
  # Windows of 17 ids every 16 of each topic's text, written out here: a client's windows are
  # exactly one topic's (as a multiset: every window once), and no two clients share a topic.
  windows = {}
  for name, text in topics.topics.items():
    ids = _text.encode(text)
    windows[name] = sorted(ids[j * 16: j * 16 + 17].tobytes() for j in range((len(ids) - 1) // 16))
  owners = []
  for i, m in enumerate(counts):
    assert not tokens[i, m:].any()
    own = sorted(w.tobytes() for w in tokens[i, :m])
    owners.append([name for name, want in windows.items() if want == own])
    assert len(owners[-1]) == 1, (i, owners[-1])
  assert len({o[0] for o in owners}) == 8
  hist = np.stack([np.bincount(tokens[i, :m].ravel(), minlength=_text.VOCAB) / tokens[i, :m].size
                   for i, m in enumerate(counts)])
  gaps = np.abs(hist[:, None] - hist[None]).sum(-1)[~np.eye(8, dtype=bool)]
  assert gaps.min() > 0.05
  # max_windows leaves the longer topics out; length pads to a fixed length.
  small, _ = _text.topic_shards(8, 4, 16, max_windows=100, length=128, heldout_windows=1)
  assert small.examples["tokens"].shape[1] == 128 and int(np.max(small.count)) <= 100

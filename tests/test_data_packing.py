"""Packing: rows against a naive reference packer, exact token accounting, epochs re-shuffled."""

import collections

import numpy as np
import pytest

from sktlm.data import packing


def _docs(n, seed=0, max_len=40):
  """Documents as [bos=1] + distinct tokens + [eos=2]; token values encode (doc, offset)."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(n):
    body = 1000 * (d + 1) + np.arange(int(rng.integers(1, max_len)))
    docs.append(np.concatenate([[1], body, [2]]).astype(np.int32))
  return docs


def _reference_rows(docs, stream, rows, L, pad_id=0):
  """Naive packer: builds the whole stream as Python lists, then cuts rows and labels tokens one by one."""
  tokens, occ = [], []
  epochs = ((rows + stream.row_window) * L + L + 1) // stream.epoch_tokens + 2
  for e in range(epochs if stream.repeat else 1):
    order = stream.epoch_order(e)[0]
    for j, d in enumerate(order):
      tokens += list(docs[d])
      occ += [e * len(docs) + j] * len(docs[d])
  out = []
  for i in range(rows):
    r = stream.stream_row(i)  # rows are read in a windowed shuffled order
    t = tokens[r * L:r * L + L + 1]
    o = occ[r * L:r * L + L + 1]
    t, o = t + [pad_id] * (L + 1 - len(t)), o + [-1] * (L + 1 - len(o))
    seg, pos, w = [], [], []
    s, p = 0, 0
    for k in range(L):
      if o[k] < 0:
        seg.append(0), pos.append(0), w.append(0.0)
        continue
      if k == 0 or o[k] != o[k - 1]:
        s, p = s + 1, 0
      seg.append(s), pos.append(p), w.append(1.0 if o[k + 1] == o[k] else 0.0)
      p += 1
    out.append(dict(inputs=t[:L], targets=t[1:], segment_ids=seg, positions=pos, weights=w))
  return out


def _packed(docs, stream, rows):
  lookup = lambda d: docs[d]
  arr = [packing.row_arrays(stream.pieces(i), lookup, stream.seq_len, 0) for i in range(rows)]
  return packing.batch_fields(np.stack([a[0] for a in arr]), np.stack([a[1] for a in arr]))


@pytest.mark.parametrize('L,n_docs,max_len', [(8, 5, 30), (16, 40, 40), (64, 3, 5), (7, 1, 100)])
def test_rows_match_reference(L, n_docs, max_len):
  docs = _docs(n_docs, seed=L, max_len=max_len)
  stream = packing.PackedStream([len(d) for d in docs], L, seed=3, row_window=5)
  rows = 3 * stream.num_rows + 2  # several epochs, documents crossing row and epoch boundaries
  got = _packed(docs, stream, rows)
  ref = _reference_rows(docs, stream, rows, L)
  for key in ('inputs', 'targets', 'segment_ids', 'positions', 'weights'):
    np.testing.assert_array_equal(got[key], np.array([r[key] for r in ref]), err_msg=key)
  assert got['inputs'].dtype == np.int32 and got['weights'].dtype == np.float32


def test_every_token_once_per_epoch_and_epochs_reshuffled():
  docs = _docs(12, seed=1)
  L = 8
  stream = packing.PackedStream([len(d) for d in docs], L, seed=7, row_window=1)  # stream order
  n_epochs = 4
  rows = n_epochs * stream.epoch_tokens // L + 1
  got = _packed(docs, stream, rows)
  # Inputs of consecutive rows tile the stream with no gap or overlap; targets are inputs shifted by one.
  flat = got['inputs'].reshape(-1)
  np.testing.assert_array_equal(got['targets'][:-1, -1], got['inputs'][1:, 0])
  np.testing.assert_array_equal(got['targets'][:, :-1], got['inputs'][:, 1:])
  # Split the stream back into documents: each epoch holds every document exactly once.
  ends = np.flatnonzero(flat == 2)
  pieces = np.split(flat, ends + 1)
  by_body = {tuple(d.tolist()): i for i, d in enumerate(docs)}
  seen = [by_body[tuple(p.tolist())] for p in pieces[:n_epochs * len(docs)]]
  orders = [seen[e * len(docs):(e + 1) * len(docs)] for e in range(n_epochs)]
  for order in orders:
    assert sorted(order) == list(range(len(docs)))
  assert len({tuple(o) for o in orders}) == n_epochs  # re-shuffled every epoch
  counts = collections.Counter(flat[:n_epochs * stream.epoch_tokens].tolist())
  assert all(c == n_epochs for t, c in counts.items() if t > 2)


def test_seed_changes_order_only():
  docs = _docs(20)
  a = packing.PackedStream([len(d) for d in docs], 16, seed=0)
  b = packing.PackedStream([len(d) for d in docs], 16, seed=1)
  assert not np.array_equal(a.epoch_order(0)[0], b.epoch_order(0)[0])
  assert sorted(a.epoch_order(0)[0]) == sorted(b.epoch_order(0)[0])


def test_eval_stream_is_one_ordered_pass_then_padding():
  docs = _docs(4, max_len=10)
  L = 8
  stream = packing.PackedStream([len(d) for d in docs], L, shuffle=False, repeat=False)
  rows = stream.num_rows + 2
  got = _packed(docs, stream, rows)
  # Eval rows are read in a fixed shuffled order over the whole split: undo it to see one ordered pass.
  order = [stream.stream_row(i) for i in range(stream.num_rows)]
  assert sorted(order) == list(range(stream.num_rows))
  inv = np.argsort(order)
  real = np.concatenate([got['inputs'][i][got['segment_ids'][i] > 0] for i in inv])
  np.testing.assert_array_equal(real, np.concatenate(docs)[:len(real)])
  assert len(real) == stream.epoch_tokens  # every token is an input once
  # Each document of n tokens gives n - 1 counted targets (bos is never a target).
  assert got['weights'].sum() == stream.epoch_tokens - len(docs)
  assert (got['segment_ids'][-2:] == 0).all() and (got['weights'][-2:] == 0).all()
  assert (got['inputs'][-2:] == 0).all()


def test_empty_lengths_rejected():
  with pytest.raises(ValueError):
    packing.PackedStream(np.zeros(0, np.int64), 8)


def test_row_shuffle_is_a_bijection_within_windows():
  docs = _docs(30, seed=2)
  W = 16
  a = packing.PackedStream([len(d) for d in docs], 8, seed=5, row_window=W)
  b = packing.PackedStream([len(d) for d in docs], 8, seed=5, row_window=1)
  perm = [a.stream_row(i) for i in range(4 * W)]
  for w in range(4):  # each window is a permutation of its own rows, different per window
    assert sorted(perm[w * W:(w + 1) * W]) == list(range(w * W, (w + 1) * W))
  assert perm != list(range(4 * W)) and perm[:W] != [p - W for p in perm[W:2 * W]]
  lookup = lambda d: docs[d]
  for i in range(2 * W):  # shuffled position i reads exactly the stream row perm[i]
    np.testing.assert_array_equal(packing.row_arrays(a.pieces(i), lookup, 8, 0)[0],
                                  packing.row_arrays(b.pieces(perm[i]), lookup, 8, 0)[0])
  # The default window spans ~2M tokens: a batch mixes rows from many documents.
  big = packing.PackedStream([40_000] * 100, 256, seed=0)
  docs_in_batch = {big.pieces(i)[0][1] for i in range(16)}
  assert len(docs_in_batch) >= 8

"""Random-access sequence packing: row i of the packed token stream, computed from document lengths.

The token stream is the concatenation of documents ([bos] + tokens + [eos] each) in a seeded shuffled
order, epoch after epoch (each epoch re-shuffled from (seed, epoch)); documents run on across row and epoch
boundaries. Row i holds stream tokens [i*L, i*L + L] (L + 1 tokens: inputs are the first L, targets the
last L), so every stream token is a target exactly once and nothing is dropped or duplicated.

Rows are then read in a seeded shuffled order within windows of about ROW_SHUFFLE_TOKENS tokens (a
bijection on row indices, so still no token lost or repeated): consecutive rows of one long document would
otherwise fill a whole batch, making batches far noisier than i.i.d. sampling (and evals cover one file).

Because row i is a pure function of (document lengths, seq_len, seed, i), the stream depends only on
(dataset, tokenizer, seq_len, seed): batch size, host count and model size merely group rows. Resuming is
"start at row k", and each host computes exactly its own rows of a global batch.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

# Keeps the shuffle independent of anything else seeded with the run's seed.
_SHUFFLE_SALT = 0x5EED_DA7A
_ROW_SALT = 0x0520_5EED
ROW_SHUFFLE_TOKENS = 2**21  # rows are shuffled within windows this large (fits the document cache)


class PackedStream:
  """Maps row indices to (document, start, stop) pieces.

  lengths: tokens per document including bos/eos. shuffle=False, repeat=False gives the eval stream:
  documents in order, one pass, then padding.
  """

  def __init__(self, lengths: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True,
               repeat: bool = True, row_window: int | None = None):
    self.lengths = np.asarray(lengths, np.int64)
    if self.lengths.ndim != 1 or len(self.lengths) == 0 or self.lengths.sum() == 0:
      raise ValueError('packing needs at least one non-empty document')
    self.seq_len, self.seed, self.shuffle, self.repeat = seq_len, seed, shuffle, repeat
    self.num_docs = len(self.lengths)
    self.epoch_tokens = int(self.lengths.sum())
    # Training streams shuffle rows within fixed windows; the (finite) eval stream within the whole split,
    # with a fixed order, so any number of eval batches samples the split evenly.
    if row_window is None:
      row_window = max(1, min(ROW_SHUFFLE_TOKENS // seq_len, self.num_rows)) if repeat else self.num_rows
    self.row_window = row_window  # 1: rows in stream order
    self._epochs: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
    self._windows: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_epochs', '_windows', '_lock')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._epochs, self._windows, self._lock = collections.OrderedDict(), collections.OrderedDict(), threading.Lock()

  def stream_row(self, row: int) -> int:
    """The packed-stream row read at position `row`: a seeded permutation within each window."""
    window, offset = divmod(row, self.row_window)
    if not self.repeat and window > 0:
      return row  # past the end of the eval stream: padding rows, order irrelevant
    with self._lock:
      perm = self._windows.get(window)
      if perm is None:
        perm = np.random.default_rng([_ROW_SALT, self.seed, window]).permutation(self.row_window)
        self._windows[window] = perm
        while len(self._windows) > 4:
          self._windows.popitem(last=False)
    return window * self.row_window + int(perm[offset])

  @property
  def num_rows(self) -> int:
    """Rows holding at least one real target (one pass; the eval stream's length)."""
    return -(-(self.epoch_tokens - 1) // self.seq_len)

  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, start offset of each in the epoch + total at the end)."""
    with self._lock:
      if epoch in self._epochs:
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]
      if self.shuffle:
        order = np.random.default_rng([_SHUFFLE_SALT, self.seed, epoch]).permutation(self.num_docs)
      else:
        order = np.arange(self.num_docs)
      cum = np.zeros(self.num_docs + 1, np.int64)
      np.cumsum(self.lengths[order], out=cum[1:])
      self._epochs[epoch] = (order, cum)
      while len(self._epochs) > 3:
        self._epochs.popitem(last=False)
      return order, cum

  def pieces(self, row: int) -> list[tuple[int, int, int, int]]:
    """[(occurrence id, document index, start, stop)] covering stream tokens [row*L, row*L + L + 1).

    The occurrence id (epoch * num_docs + position in the epoch) tells repeated documents apart.
    Past the end of a non-repeating stream the pieces stop short (the caller pads).
    """
    need = self.seq_len + 1
    pos = self.stream_row(row) * self.seq_len
    out = []
    while need > 0:
      epoch, offset = divmod(pos, self.epoch_tokens)
      if epoch > 0 and not self.repeat:
        break
      order, cum = self.epoch_order(epoch)
      j = int(np.searchsorted(cum, offset, side='right')) - 1
      while need > 0 and j < self.num_docs:
        doc = int(order[j])
        start = offset - int(cum[j])
        stop = min(int(self.lengths[doc]), start + need)
        if stop > start:
          out.append((epoch * self.num_docs + j, doc, start, stop))
          need -= stop - start
          pos += stop - start
        offset = int(cum[j + 1])
        j += 1
    return out


def row_arrays(pieces, doc_tokens, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [L+1] int32, occurrence id per token [L+1] int64, -1 = padding) for one row."""
  tokens = np.full(seq_len + 1, pad_id, np.int32)
  occ = np.full(seq_len + 1, -1, np.int64)
  at = 0
  for occurrence, doc, start, stop in pieces:
    n = stop - start
    tokens[at:at + n] = doc_tokens(doc)[start:stop]
    occ[at:at + n] = occurrence
    at += n
  return tokens, occ


def batch_fields(tokens_BxT1: np.ndarray, occ_BxT1: np.ndarray) -> dict[str, np.ndarray]:
  """The model's batch from packed rows of L+1 tokens and their document occurrence ids (-1 = pad).

  segment_ids: 1, 2, ... per document within the row (0 = padding); positions restart at 0 at every
  document start and at the row start (a document continued from the previous row restarts at 0: with
  RoPE only relative positions matter); weights: 1 where the target counts, 0 on padding and on the
  target that would cross from one document into the next (eos -> next bos).
  """
  b, t1 = tokens_BxT1.shape
  L = t1 - 1
  occ_in, occ_tg = occ_BxT1[:, :-1], occ_BxT1[:, 1:]
  real = occ_in >= 0
  new_seg = np.ones((b, L), bool)
  new_seg[:, 1:] = occ_in[:, 1:] != occ_in[:, :-1]
  segment_ids = np.cumsum(new_seg, axis=1, dtype=np.int32)
  ar = np.broadcast_to(np.arange(L, dtype=np.int32), (b, L))
  seg_start = np.maximum.accumulate(np.where(new_seg, ar, 0), axis=1)
  positions = ar - seg_start
  weights = ((occ_tg == occ_in) & real).astype(np.float32)
  return {
      'inputs': tokens_BxT1[:, :-1].astype(np.int32),
      'targets': tokens_BxT1[:, 1:].astype(np.int32),
      'segment_ids': np.where(real, segment_ids, 0).astype(np.int32),
      'positions': np.where(real, positions, 0).astype(np.int32),
      'weights': weights,
  }

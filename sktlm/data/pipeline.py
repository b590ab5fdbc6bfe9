"""The grain pipeline: tfds.data_source -> packed rows (MapDataset) -> host slice -> batch -> prefetch.

Shuffling is a seeded permutation of documents per epoch and packing is random access (see packing.py),
so the whole pipeline is a grain MapDataset indexed by row: exact resume is "start at batch k", hosts
compute only their own rows, and grain's thread / process prefetch parallelise it without changing it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import sys
import threading
import time

import grain
import numpy as np

from sktlm.data import packing
from sktlm.data.sources import Source, SplitView

_DOC_CACHE_TOKENS = 4_000_000  # tokenized documents kept per process (rows read documents sequentially)


def _split_key(source: Source, split: str) -> str:
  ds = source.splits[split]
  if isinstance(ds, SplitView):
    return f'{split}-{ds.start}-{ds.stop}'
  return f'{split}-{len(ds)}'


def doc_lengths(source: Source, split: str, tokenizer) -> np.ndarray:
  """Tokens per document ([bos] + text + [eos]) of a split, cached next to the dataset files."""
  name = f'{_split_key(source, split)}.{tokenizer.fingerprint[:16]}.lengths.npy'
  # Next to the dataset; for a read-only (shared) data dir, in the user's cache instead.
  where = hashlib.sha256(source.dataset_dir.encode()).hexdigest()[:16]
  caches = [os.path.join(source.dataset_dir, 'sktlm_index', name),
            os.path.join(os.path.expanduser('~/.cache/sktlm/index'), where, name)]
  for cache in caches:
    if os.path.exists(cache):
      lengths = np.load(cache)
      if len(lengths) == len(source.splits[split]):
        return lengths
  t0 = time.perf_counter()
  ds = source.splits[split]
  n = len(ds)
  lengths = np.empty(n, np.int64)
  chunk = 256
  for lo in range(0, n, chunk):
    idx = list(range(lo, min(n, lo + chunk)))
    recs = ds.__getitems__(idx) if hasattr(ds, '__getitems__') else [ds[i] for i in idx]
    texts = [source.text(r) for r in recs]
    if tokenizer.is_bytes:
      lengths[lo:lo + len(idx)] = [len(t) for t in texts]
    else:
      lengths[lo:lo + len(idx)] = [len(ids) for ids in tokenizer.encode_batch(texts)]
  lengths += 2
  for cache in caches:
    try:
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, lengths)
      os.replace(tmp, cache)  # atomic: concurrent runs may both write it
      break
    except OSError:
      continue
  logging.info('indexed %s/%s: %d docs, %d tokens in %.1fs', source.name, split, n, lengths.sum(),
               time.perf_counter() - t0)
  return lengths


class PackedRows(grain.MapDataset):
  """Row r of this host's share of the packed stream: {'tokens': [L+1] int32, 'occ': [L+1] int64}.

  Local row r is global row (r // b) * B + p * b + r % b, with b = B / P rows per host per batch:
  host p holds the contiguous slice [p*b, (p+1)*b) of every global batch.
  """

  def __init__(self, stream: packing.PackedStream, source: Source, split: str, tokenizer,
               global_batch: int, process_index: int, process_count: int):
    super().__init__()
    self.stream, self.source, self.split, self.tokenizer = stream, source, split, tokenizer
    self.global_batch, self.local_batch = global_batch, global_batch // process_count
    self.process_index = process_index
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._cached_tokens = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_cache', '_lock', '_cached_tokens')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self):
    return sys.maxsize

  def __str__(self):
    return f'PackedRows({self.source.name}/{self.split}, seq_len={self.stream.seq_len})'

  def global_row(self, r: int) -> int:
    step, k = divmod(r, self.local_batch)
    return step * self.global_batch + self.process_index * self.local_batch + k

  def doc_tokens(self, doc: int) -> np.ndarray:
    with self._lock:
      if doc in self._cache:
        self._cache.move_to_end(doc)
        return self._cache[doc]
    text = self.source.text(self.source.splits[self.split][doc])
    tok = self.tokenizer
    ids = np.empty(int(self.stream.lengths[doc]), np.int32)
    ids[0], ids[-1] = tok.bos_id, tok.eos_id
    body = tok.encode_np(text)
    if len(body) != len(ids) - 2:
      raise RuntimeError(f'{self.source.name}/{self.split} doc {doc}: {len(body)} tokens, index says '
                         f'{len(ids) - 2}; the length index is stale (delete {self.source.dataset_dir}'
                         '/sktlm_index)')
    ids[1:-1] = body
    with self._lock:
      if doc in self._cache:  # another thread got there first
        return self._cache[doc]
      self._cache[doc] = ids
      self._cached_tokens += len(ids)
      while self._cached_tokens > _DOC_CACHE_TOKENS and len(self._cache) > 2:
        self._cached_tokens -= len(self._cache.popitem(last=False)[1])
    return ids

  def __getitem__(self, r):
    if isinstance(r, slice):
      return self.slice(r)
    pieces = self.stream.pieces(self.global_row(r))
    tokens, occ = packing.row_arrays(pieces, self.doc_tokens, self.stream.seq_len, self.tokenizer.pad_id)
    return {'tokens': tokens, 'occ': occ}


def _batch_fn(rows):
  return packing.batch_fields(np.stack([r['tokens'] for r in rows]), np.stack([r['occ'] for r in rows]))


def stream_fingerprint(source: Source, tokenizer, seq_len: int, seed: int) -> str:
  """Identifies the token stream: (dataset, tokenizer, seq_len, seed) and nothing else."""
  key = json.dumps([source.name, tokenizer.fingerprint, seq_len, seed])
  return hashlib.sha256(key.encode()).hexdigest()[:16]


class DataIterator:
  """Infinite iterator of this host's batches; get_state()/set_state() resume exactly.

  The state is the global batch index plus a fingerprint of the stream, so it is independent of the
  process count and of grain's worker layout.
  """

  def __init__(self, rows: PackedRows, *, num_workers: int = 0, prefetch: int = 4, start_batch: int = 0,
               fingerprint: str = ''):
    self.rows = rows
    self.num_workers, self.prefetch = num_workers, prefetch
    self.fingerprint = fingerprint
    self.global_batch_size = rows.global_batch
    self.seq_len = rows.stream.seq_len
    self.tokens_per_batch = self.global_batch_size * self.seq_len
    self._batch = start_batch
    self._it = None

  def _open(self):
    ds = self.rows.batch(self.rows.local_batch, drop_remainder=True, batch_fn=_batch_fn)
    ds = ds[self._batch:]
    if self.num_workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # grain's worker setup reads its absl flags (library use, tests)
        flags.FLAGS.mark_as_parsed()
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
    else:
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if self.prefetch else 0,
                                                   prefetch_buffer_size=self.prefetch))
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._open()
    batch = next(self._it)
    self._batch += 1
    return batch

  @property
  def batches_done(self) -> int:
    return self._batch

  def get_state(self) -> dict:
    return {'batch': self._batch, 'rows': self._batch * self.global_batch_size,
            'global_batch_size': self.global_batch_size, 'seq_len': self.seq_len,
            'stream': self.fingerprint}

  def set_state(self, state: dict) -> None:
    from sktlm.errors import UserError
    if state.get('stream') != self.fingerprint:
      raise UserError('the saved data position belongs to a different token stream (dataset, tokenizer, '
                      f"seq_len or seed changed: {state.get('stream')} != {self.fingerprint})")
    rows = int(state['rows'])
    if rows % self.global_batch_size:
      raise UserError(f'cannot resume: {rows} rows consumed is not a multiple of the global batch size '
                      f'{self.global_batch_size}')
    self.close()
    self._batch = rows // self.global_batch_size

  def close(self):
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 -- interpreter shutdown
      pass

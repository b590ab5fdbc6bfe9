"""Data for training and eval: sources (TFDS), tokenizers, packing, the grain pipeline.

API used by the train loop (data_cfg = config.data):
  get_tokenizer(data_cfg)                         -> Tokenizer (.vocab_size unpadded, pad/bos/eos ids)
  make_train_iter(data_cfg, batch_size=, seed=, process_index=, process_count=) -> DataIterator
  make_eval_batches(data_cfg, batch_size=, num_batches=, ...) -> list of batches (validation split)
  prepare(data_cfg)                               -> builds stdlib / text_files (never downloads)

A batch is a dict of numpy arrays [batch_size // process_count, seq_len]: inputs, targets (int32),
segment_ids (1, 2, ... per document, 0 = padding), positions (int32), weights (float32).
See docs/data.md.
"""

from __future__ import annotations

from sktlm.data import packing, pipeline, sources, tokenizers
from sktlm.data.pipeline import DataIterator
from sktlm.errors import UserError

__all__ = ['DataIterator', 'get_tokenizer', 'make_train_iter', 'make_eval_batches', 'iter_eval_batches', 'prepare',
           'info']


def get_tokenizer(data_cfg) -> tokenizers.Tokenizer:
  return tokenizers.get_tokenizer(data_cfg.tokenizer)


def _check_batch(batch_size: int, process_index: int, process_count: int):
  """The processes' share of the batch (data.seq_len >= 2 is the schema's, checked by validate)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'bad process_index/process_count {process_index}/{process_count}')
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f'global batch size {batch_size} must be a positive multiple of the process count '
                    f'{process_count}')


def _stream(data_cfg, split: str, seed: int, train: bool):
  tok = get_tokenizer(data_cfg)
  src = sources.get_source(data_cfg)
  lengths = pipeline.doc_lengths(src, split, tok)
  if len(lengths) == 0:
    raise UserError(f"dataset '{src.name}' has an empty {split} split")
  stream = packing.PackedStream(lengths, data_cfg.seq_len, seed=seed, shuffle=train, repeat=train)
  return tok, src, stream


def make_train_iter(data_cfg, *, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1, start_batch: int = 0, prefetch: int = 4) -> DataIterator:
  """Infinite iterator over this host's slice of every global batch of the training split."""
  _check_batch(batch_size, process_index, process_count)
  tok, src, stream = _stream(data_cfg, 'train', seed, train=True)
  rows = pipeline.PackedRows(stream, src, 'train', tok, batch_size, process_index, process_count)
  return DataIterator(rows, num_workers=data_cfg.num_workers, prefetch=prefetch,
                      start_batch=start_batch,
                      fingerprint=pipeline.stream_fingerprint(src, tok, data_cfg.seq_len, seed))


def make_eval_batches(data_cfg, *, batch_size: int, num_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """The first num_batches batches of the validation split, in order, unshuffled; padded past its end."""
  _check_batch(batch_size, process_index, process_count)
  tok, src, stream = _stream(data_cfg, 'validation', 0, train=False)
  rows = pipeline.PackedRows(stream, src, 'validation', tok, batch_size, process_index, process_count)
  b = batch_size // process_count
  return [pipeline._batch_fn([rows[k * b + i] for i in range(b)]) for k in range(num_batches)]


def iter_eval_batches(data_cfg, *, batch_size: int, split: str = 'validation', max_batches: int = 0):
  """(number of batches, iterator over them): one unshuffled pass over `split` (all of it, or the first
  max_batches batches), the last batch padded (weight 0). Single host (`sktlm eval`)."""
  _check_batch(batch_size, 0, 1)
  tok, src, stream = _stream(data_cfg, split, 0, train=False)
  rows = pipeline.PackedRows(stream, src, split, tok, batch_size, 0, 1)
  n = -(-stream.num_rows // batch_size)
  n = min(n, max_batches) if max_batches > 0 else n
  return n, (pipeline._batch_fn([rows[k * batch_size + i] for i in range(batch_size)]) for k in range(n))


def prepare(data_cfg, allow_download: bool = False) -> float:
  """Builds the configured dataset if needed; returns the seconds spent building (0: was ready).

  Catalog datasets are downloaded only with allow_download=True (`sktlm data prepare`); otherwise an
  unprepared one is a UserError saying how to prepare it.
  """
  if allow_download and data_cfg.name not in ('stdlib', 'text_files'):
    return sources.prepare_catalog(data_cfg.name, sources.data_dir(data_cfg))
  return sources.get_source(data_cfg).build_seconds


def iter_texts(data_cfg, split: str = 'train', max_docs: int = 0):
  """Yields the documents' raw text (bytes) of a split, in stored order."""
  src = sources.get_source(data_cfg)
  ds = src.splits[split]
  n = len(ds) if not max_docs else min(max_docs, len(ds))
  for i in range(n):
    yield src.text(ds[i])


def info(data_cfg) -> dict:
  """Documents and tokens per split under the configured tokenizer (builds the length index)."""
  tok = get_tokenizer(data_cfg)
  src = sources.get_source(data_cfg)
  out = {'dataset': src.name, 'dataset_dir': src.dataset_dir, 'tokenizer': tok.fingerprint,
         'vocab_size': tok.vocab_size, 'splits': {}}
  for split in ('train', 'validation'):
    lengths = pipeline.doc_lengths(src, split, tok)
    out['splits'][split] = {'documents': int(len(lengths)), 'tokens': int(lengths.sum()),
                            'rows': -(-int(lengths.sum() - 1) // data_cfg.seq_len)}
  return out

"""Evaluating a checkpoint on a dataset it may not have been trained on: loss, perplexity and bits per byte,
written as W/evals/<name>.json (docs/run_files.md), which `sktlm scaling --loss=eval:<name>` reads.

Bits per byte here are per UTF-8 byte of the evaluated text, for any tokenizer: total target nats / ln 2 /
bytes of the target tokens (a byte token counts 1, a SentencePiece piece its UTF-8 length, bos/eos/pad 0; the
loss on eos is counted). The training loop's eval_bpb (byte tokenizer only) divides by target tokens instead,
eos included, so it is slightly lower.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import time

import jax
import numpy as np

from sktlm import runfiles
from sktlm.errors import UserError

SPLITS = ('validation', 'train')


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes of the text each id stands for (0 for specials and the vocab padding)."""
  out = np.zeros(vocab_size, np.int64)
  if tokenizer.is_bytes:
    from sktlm.data.tokenizers import BYTE_OFFSET
    out[BYTE_OFFSET:tokenizer.vocab_size] = 1
    return out
  sp = tokenizer._sp
  for i in range(tokenizer.vocab_size):
    if sp.is_byte(i):
      out[i] = 1
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      out[i] = len(sp.id_to_piece(i).replace('▁', ' ').encode('utf-8'))
  return out


def record_name(data_cfg) -> str:
  base = data_cfg.name if data_cfg.name != 'text_files' else os.path.basename(os.path.normpath(data_cfg.path))
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', base or 'eval')


def evaluate(run, data_cfg, *, split: str = 'validation', max_batches: int = 0, progress=None) -> dict:
  """Loss / ppl / bpb of `run` (sktlm.tools.runs.LoadedRun) on one pass over data_cfg's split."""
  from sktlm import data
  from sktlm.train import step
  if split not in SPLITS:
    raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
  B = run.config.train.batch_size
  t0 = time.time()
  n, batches = data.iter_eval_batches(data_cfg, batch_size=B, split=split, max_batches=max_batches)
  nbytes_of = token_bytes(run.tokenizer, run.config.model.vocab_size)
  loss_sum = weight_sum = n_bytes = 0.0
  pending = None
  for k, batch in enumerate(batches):
    n_bytes += float(np.sum(batch['weights'] * nbytes_of[batch['targets']]))
    out = run.setup.eval_step(run.state, step.device_batch(batch, run.setup, B))
    if pending is not None:  # fetch the previous batch's sums while this one runs
      loss_sum, weight_sum = loss_sum + float(pending['loss_sum']), weight_sum + float(pending['weight_sum'])
    pending = out
    if progress:
      progress(k + 1, n)
  if pending is not None:
    pending = jax.device_get(pending)
    loss_sum, weight_sum = loss_sum + float(pending['loss_sum']), weight_sum + float(pending['weight_sum'])
  if weight_sum == 0:
    raise UserError(f'no tokens to evaluate in the {split} split')
  loss = loss_sum / weight_sum
  return {'kind': 'eval', 'name': record_name(data_cfg), 'workdir': os.path.abspath(run.workdir), 'step': run.step,
          'dataset': {'name': data_cfg.name, 'path': data_cfg.path, 'data_dir': data_cfg.data_dir, 'split': split},
          'tokenizer': data_cfg.tokenizer, 'seq_len': data_cfg.seq_len, 'batch_size': B, 'batches': n,
          'tokens': int(weight_sum), 'bytes': int(n_bytes), 'loss': loss, 'ppl': math.exp(min(loss, 50.0)),
          'bpb': loss_sum / math.log(2) / max(n_bytes, 1.0), 'wall_time_s': time.time() - t0,
          'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}


def write_record(workdir: str, record: dict) -> str:
  path = runfiles.eval_path(workdir, record['name'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
  return path

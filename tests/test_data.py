"""The data API the train loop uses: stdlib source, batches, per-host slices, exact resume, eval batches."""

import json
import os
import sys
import time

import numpy as np
import pytest

from sktlm import data
from sktlm.config import load, schema
from sktlm.data import builders, packing, sources
from sktlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@pytest.fixture(scope='session')
def stdlib_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  t0 = time.perf_counter()
  data.prepare(_cfg(d))
  print(f'stdlib prepared in {time.perf_counter() - t0:.2f}s')
  return d


def _cfg(data_dir, **kw):
  cfg = schema.get_config().data
  cfg.data_dir = data_dir
  cfg.seq_len = 64
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_stdlib_builder_versioned_and_split_by_path_hash(stdlib_dir):
  src = sources.get_source(_cfg(stdlib_dir))
  v = sys.version_info
  assert src.name == f'sktlm_stdlib/py{v.major}_{v.minor}_{v.micro}/1.0.0'
  assert src.build_seconds == 0.0  # prepared by the fixture, not rebuilt
  info = json.load(open(os.path.join(src.dataset_dir, 'dataset_info.json')))
  assert sys.version.split()[0] in json.dumps(info)
  train = [src.splits['train'][i]['path'].decode() for i in range(len(src.splits['train']))]
  val = [src.splits['validation'][i]['path'].decode() for i in range(len(src.splits['validation']))]
  assert not set(train) & set(val)
  assert all(builders.is_validation(p) for p in val) and not any(builders.is_validation(p) for p in train)
  files = builders.stdlib_files()
  assert set(train) | set(val) <= set(files) and len(train) + len(val) > 0.95 * len(files)
  assert 0.02 < len(val) / len(files) < 0.09
  rec = src.splits['train'][0]
  path = os.path.join(builders.stdlib_dir(), rec['path'].decode())
  assert open(path, 'rb').read() == rec['text']


def test_batch_format_and_contents(stdlib_dir):
  cfg = _cfg(stdlib_dir)
  it = data.make_train_iter(cfg, batch_size=4, seed=0)
  b = next(it)
  assert set(b) == set(KEYS)
  for k in KEYS:
    assert b[k].shape == (4, 64)
  assert b['inputs'].dtype == np.int32 and b['weights'].dtype == np.float32
  assert it.tokens_per_batch == 4 * 64
  tok = data.get_tokenizer(cfg)
  assert tok.vocab_size == 259 and tok.pad_id == 0 and tok.is_bytes and tok.fingerprint == 'bytes'
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  # Each row's text is a verbatim slice of one or more stdlib files.
  src = sources.get_source(cfg)
  corpus = b''.join(src.splits['train'][i]['text'] for i in range(len(src.splits['train'])))
  for row in range(4):
    for s in np.unique(b['segment_ids'][row]):
      ids = b['inputs'][row][b['segment_ids'][row] == s]
      body = bytes((ids[ids >= 3] - 3).astype(np.uint8))
      assert body in corpus


def test_union_over_hosts_equals_global_batch(stdlib_dir):
  cfg = _cfg(stdlib_dir)
  ref = _take(data.make_train_iter(cfg, batch_size=8, seed=1), 3)
  for p_count in (2, 4):
    parts = [_take(data.make_train_iter(cfg, batch_size=8, seed=1, process_index=p, process_count=p_count), 3)
             for p in range(p_count)]
    for step in range(3):
      for k in KEYS:
        np.testing.assert_array_equal(np.concatenate([parts[p][step][k] for p in range(p_count)]),
                                      ref[step][k])


def test_exact_resume(stdlib_dir):
  cfg = _cfg(stdlib_dir)
  ref = _take(data.make_train_iter(cfg, batch_size=4, seed=2), 7)
  it = data.make_train_iter(cfg, batch_size=4, seed=2)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  it.close()
  fresh = data.make_train_iter(cfg, batch_size=4, seed=2)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), ref[4:])
  # Resuming on a different host count continues the same global stream.
  half = data.make_train_iter(cfg, batch_size=4, seed=2, process_index=1, process_count=2)
  half.set_state(state)
  np.testing.assert_array_equal(next(half)['inputs'], ref[4]['inputs'][2:])
  # A state from another stream is refused.
  other = data.make_train_iter(cfg, batch_size=4, seed=3)
  with pytest.raises(UserError, match='different token stream'):
    other.set_state(state)


def test_grain_worker_processes_give_the_same_batches(stdlib_dir):
  cfg = _cfg(stdlib_dir)
  ref = _take(data.make_train_iter(cfg, batch_size=4, seed=0), 6)
  cfg.num_workers = 2
  it = data.make_train_iter(cfg, batch_size=4, seed=0)
  try:
    _assert_same(_take(it, 3), ref[:3])
    state = it.get_state()
  finally:
    it.close()
  it2 = data.make_train_iter(cfg, batch_size=4, seed=0)
  it2.set_state(state)
  try:
    _assert_same(_take(it2, 3), ref[3:])
  finally:
    it2.close()


def test_stream_independent_of_model_size_and_batch_grouping(stdlib_dir):
  over = {'data.data_dir': stdlib_dir, 'data.seq_len': 64}
  a = load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=pico'), over)
  b = load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=small'), over)
  assert a.model.d_model != b.model.d_model
  it_a = data.make_train_iter(a.data, batch_size=8, seed=a.seed)
  it_b = data.make_train_iter(b.data, batch_size=8, seed=b.seed)
  _assert_same(_take(it_a, 2), _take(it_b, 2))
  assert it_a.get_state()['stream'] == it_b.get_state()['stream']
  # Batch size only groups the same rows.
  rows8 = np.concatenate([x['inputs'] for x in _take(data.make_train_iter(a.data, batch_size=8, seed=0), 2)])
  rows4 = np.concatenate([x['inputs'] for x in _take(data.make_train_iter(a.data, batch_size=4, seed=0), 4)])
  np.testing.assert_array_equal(rows8, rows4)


def test_eval_batches_deterministic_from_validation(stdlib_dir):
  cfg = _cfg(stdlib_dir)
  e1 = data.make_eval_batches(cfg, batch_size=4, num_batches=2)
  e2 = data.make_eval_batches(cfg, batch_size=4, num_batches=2)
  _assert_same(e1, e2)
  parts = [data.make_eval_batches(cfg, batch_size=4, num_batches=2, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([parts[0][1]['inputs'], parts[1][1]['inputs']]),
                                e1[1]['inputs'])
  # Row 0 of the eval batches is the packed validation stream (documents in stored order, bos + bytes + eos)
  # at the row the fixed eval shuffle puts first; the rows of the batches spread over the whole split.
  src = sources.get_source(cfg)
  val = src.splits['validation']
  stream = np.concatenate([np.concatenate([[1], np.frombuffer(val[i]['text'], np.uint8).astype(np.int64) + 3,
                                           [2]]) for i in range(len(val))])
  L = cfg.seq_len
  n_rows = -(-(len(stream) - 1) // L)
  pstream = packing.PackedStream(np.array([len(val[i]['text']) + 2 for i in range(len(val))]), L,
                                 shuffle=False, repeat=False)
  r0 = pstream.stream_row(0)
  np.testing.assert_array_equal(e1[0]['inputs'][0], stream[r0 * L:r0 * L + L])
  rows = [pstream.stream_row(i) for i in range(8)]
  assert len(set(rows)) == 8 and max(rows) - min(rows) > n_rows // 4
  train = _take(data.make_train_iter(cfg, batch_size=4, seed=0), 2)
  assert not any(np.array_equal(t['inputs'], e['inputs']) for t in train for e in e1)


def test_bad_batch_layout(stdlib_dir):
  with pytest.raises(UserError, match='multiple of the process count'):
    data.make_train_iter(_cfg(stdlib_dir), batch_size=6, seed=0, process_count=4)

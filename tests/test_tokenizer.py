"""Tokenizers: byte layout, round trips, lossless SentencePiece training, loading, errors, pipeline use."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from sktlm import data
from sktlm.config import schema
from sktlm.data import sources, tokenizers
from sktlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = ['', 'hello', '  indented:\n\tx = 1\n\n\n', 'héllo wörld — 日本語 🙂', ' leading and trailing  ',
           'def f(a, b):\n    return a ** 2 + b  # comment\n']


def test_byte_tokenizer_layout_and_round_trip():
  tok = tokenizers.get_tokenizer('bytes')
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode('A') == [ord('A') + 3]
  assert tok.encode('é') == [0xC3 + 3, 0xA9 + 3]
  for s in SAMPLES:
    ids = tok.encode(s)
    assert all(3 <= i < 259 for i in ids) and tok.decode(ids) == s
  assert tok.decode([1] + tok.encode('x') + [2, 0, 0]) == 'x'  # specials dropped
  assert tok.encode_np(b'ab').tolist() == tok.encode('ab')


def _corpus():
  import sysconfig
  root = sysconfig.get_paths()['stdlib']
  names = ['os.py', 'json/decoder.py', 'textwrap.py', 'string.py', 'functools.py', 'heapq.py']
  return [open(os.path.join(root, n), encoding='utf-8').read() for n in names] + SAMPLES


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sp') / 'tok.model')
  return tokenizers.train_sentencepiece(_corpus(), out, vocab_size=600, num_threads=1)


def test_sentencepiece_lossless_round_trip(sp_model):
  tok = sp_model
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 600)
  assert not tok.is_bytes and len(tok.fingerprint) == 64
  for s in _corpus() + ['unseen ∮ symbols ⅋ and emoji 🦜\r\n']:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert not {0, 1, 2} & set(ids)
  code = _corpus()[0]
  assert len(tok.encode(code)) < 0.6 * len(code.encode())  # it actually compresses
  clone = pickle.loads(pickle.dumps(tok))  # grain worker processes receive it pickled
  assert clone.encode(code) == tok.encode(code) and clone.fingerprint == tok.fingerprint
  loaded = tokenizers.get_tokenizer(tok.path)
  assert loaded.fingerprint == tok.fingerprint and loaded.encode('x = 1') == tok.encode('x = 1')


def test_tokenizer_errors(tmp_path):
  with pytest.raises(UserError, match='tokenizer file not found'):
    tokenizers.get_tokenizer(str(tmp_path / 'missing.model'))
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(UserError, match='not a valid SentencePiece model'):
    tokenizers.get_tokenizer(str(bad))
  with pytest.raises(UserError, match='must end with .model'):
    tokenizers.train_sentencepiece(['x'], str(tmp_path / 'x.bin'), vocab_size=500)


def test_pipeline_with_sentencepiece(sp_model, tmp_path):
  corpus = tmp_path / 'c'
  corpus.mkdir()
  code = _corpus()[0]
  for i in range(30):  # small documents, so whole ones fit in the rows read below
    (corpus / f'{i}.py').write_text(code[i * 400:(i + 1) * 400 + i])
  cfg = schema.get_config().data
  cfg.update(dict(name='text_files', path=str(corpus), data_dir=str(tmp_path / 'tfds'), seq_len=32,
                  tokenizer=sp_model.path))
  assert data.get_tokenizer(cfg).fingerprint == sp_model.fingerprint
  it = data.make_train_iter(cfg, batch_size=4, seed=0)
  src = sources.get_source(cfg)
  docs = [src.text(src.splits['train'][i]).decode() for i in range(len(src.splits['train']))]
  # Rows arrive in a shuffled order within windows: read whole windows and restore stream order.
  W = it.rows.stream.row_window
  n_rows = max(W, 160) // W * W
  rows = np.concatenate([next(it)['inputs'] for _ in range(-(-n_rows // 4))])[:n_rows]
  order = [it.rows.stream.stream_row(i) for i in range(n_rows)]
  # Cut the packed stream at bos and decode each piece: each is the start of (or all of) a document.
  ids = rows[np.argsort(order)].reshape(-1)
  starts = np.flatnonzero(ids == 1)
  assert len(starts) >= 5
  for a, b in zip(starts[:-1], starts[1:], strict=True):
    piece = ids[a:b]
    assert piece[-1] == 2  # a whole document: bos ... eos
    assert sp_model.decode(piece) in docs
  info = data.info(cfg)
  assert info['splits']['train']['tokens'] == sum(len(sp_model.encode(d)) + 2 for d in docs)


def test_cli_tokenizer_train_and_info(tmp_path):
  corpus = tmp_path / 'c'
  corpus.mkdir()
  for i, text in enumerate(_corpus()):
    (corpus / f'{i}.txt').write_text(text)
  out = tmp_path / 'cli.model'
  args = [sys.executable, '-m', 'sktlm.cli', 'tokenizer', 'train', '--config=experiments/lm.py',
          '--config.data.name=text_files', f'--config.data.path={corpus}',
          f'--config.data.data_dir={tmp_path}/tfds', '--vocab_size=500', f'--out={out}']
  r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert out.exists() and tokenizers.get_tokenizer(str(out)).vocab_size == 500
  r = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'tokenizer', 'info', str(tmp_path / 'nope.model')],
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 2 and 'tokenizer file not found' in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1

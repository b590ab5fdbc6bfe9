"""Sources other than stdlib: local text files, TFDS catalog datasets (offline), and bad input."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sktlm import data
from sktlm.config import schema
from sktlm.data import sources
from sktlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(data_dir, **kw):
  cfg = schema.get_config().data
  cfg.data_dir = str(data_dir)
  cfg.seq_len = 32
  cfg.update(kw)
  return cfg


def _all_texts(src, split):
  ds = src.splits[split]
  return [src.text(ds[i]).decode() for i in range(len(ds))]


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


@pytest.fixture
def no_network(monkeypatch):
  """Any connection attempt fails the test immediately instead of hanging."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def test_text_files_folder_glob_and_rebuild_on_change(tmp_path, no_network):
  corpus = tmp_path / 'corpus'
  texts = {f'd{i:02d}.txt': f'document {i} ' + 'é' * i for i in range(30)}
  for name, t in texts.items():
    _write(str(corpus / name), t)
  _write(str(corpus / 'sub' / 'nested.md'), 'nested file')
  cfg = _cfg(tmp_path / 'tfds', name='text_files', path=str(corpus))
  src = sources.get_source(cfg)
  assert src.build_seconds > 0
  got = _all_texts(src, 'train') + _all_texts(src, 'validation')
  assert sorted(got) == sorted(list(texts.values()) + ['nested file'])
  assert len(_all_texts(src, 'validation')) >= 1 and len(_all_texts(src, 'train')) >= 1
  assert sources.get_source(cfg).build_seconds == 0  # cached
  # A glob picks the matching files only.
  gsrc = sources.get_source(_cfg(tmp_path / 'tfds', name='text_files', path=str(corpus / 'd0*.txt')))
  assert len(_all_texts(gsrc, 'train') + _all_texts(gsrc, 'validation')) == 10
  # Changing a file changes the content key: rebuilt, never mixed with the old build.
  time.sleep(0.01)
  _write(str(corpus / 'd00.txt'), 'changed text')
  src2 = sources.get_source(cfg)
  assert src2.name != src.name and src2.build_seconds > 0
  got2 = _all_texts(src2, 'train') + _all_texts(src2, 'validation')
  assert 'changed text' in got2 and texts['d00.txt'] not in got2
  # And the pipeline runs on it.
  b = next(data.make_train_iter(cfg, batch_size=2, seed=0))
  assert b['inputs'].shape == (2, 32)


def test_text_files_single_txt_and_jsonl(tmp_path):
  txt = tmp_path / 'book.txt'
  paras = [f'Paragraph {i}.\nSecond line {i}.' for i in range(40)]
  txt.write_text('\n\n'.join(paras) + '\n')
  src = sources.get_source(_cfg(tmp_path / 'tfds', name='text_files', path=str(txt)))
  got = [t.strip() for t in _all_texts(src, 'train') + _all_texts(src, 'validation')]
  assert sorted(got) == sorted(paras)
  # One document only: the tail (cut at a line boundary) is held out, nothing lost.
  one = tmp_path / 'one.txt'
  one.write_text(''.join(f'line {i}\n' for i in range(100)))
  src = sources.get_source(_cfg(tmp_path / 'tfds', name='text_files', path=str(one)))
  train, val = _all_texts(src, 'train'), _all_texts(src, 'validation')
  assert len(train) == len(val) == 1 and train[0] + val[0] == one.read_text()
  assert val[0].startswith('line ') and 0 < len(val[0]) < 0.1 * len(one.read_text())
  jl = tmp_path / 'docs.jsonl'
  rows = [{'content': f'row {i}', 'id': i} for i in range(25)] + [{'content': ''}]
  jl.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  cfg = _cfg(tmp_path / 'tfds', name='text_files', path=str(jl), text_field='content')
  src = sources.get_source(cfg)
  got = _all_texts(src, 'train') + _all_texts(src, 'validation')
  assert sorted(got) == sorted(f'row {i}' for i in range(25))
  ev = data.make_eval_batches(cfg, batch_size=2, num_batches=1)
  assert ev[0]['inputs'].shape == (2, 32) and ev[0]['weights'].sum() > 0


def test_text_files_bad_input(tmp_path):
  ddir = tmp_path / 'tfds'
  with pytest.raises(UserError, match='data path not found'):
    sources.get_source(_cfg(ddir, name='text_files', path=str(tmp_path / 'missing')))
  # An empty data.path is refused by validate (tests/test_config_schema.py), before the pipeline runs.
  with pytest.raises(UserError, match='no files match'):
    sources.get_source(_cfg(ddir, name='text_files', path=str(tmp_path / '*.nothing')))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'a.txt').write_text('')
  with pytest.raises(UserError, match='empty corpus'):
    sources.get_source(_cfg(ddir, name='text_files', path=str(empty)))
  junk = tmp_path / 'junk'
  junk.mkdir()
  (junk / 'a.bin').write_bytes(b'\xff\xfe\x00\x01' * 10)
  (junk / 'b.txt').write_text('   \n\n  ')
  with pytest.raises(UserError, match='no valid text'):
    sources.get_source(_cfg(ddir, name='text_files', path=str(junk)))
  jl = tmp_path / 'x.jsonl'
  jl.write_text('{"body": "hello"}\n')
  with pytest.raises(UserError, match="no valid text.*no field 'text'.*fields: body"):
    sources.get_source(_cfg(ddir, name='text_files', path=str(jl)))


class SktlmTestCatalog(tfds.core.GeneratorBasedBuilder):
  """Stands in for a catalog dataset (lm1b, ...): registered by name, train split only, extra feature."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'sentence': tfds.features.Text(), 'label': tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(300):
      yield i, {'sentence': f'sentence number {i}.', 'label': i}


def test_catalog_dataset_by_name(tmp_path, no_network):
  ddir = tmp_path / 'tfds'
  cfg = _cfg(ddir, name='sktlm_test_catalog', text_field='sentence')
  with pytest.raises(UserError, match='not prepared.*sktlm data prepare sktlm_test_catalog'):
    sources.get_source(cfg)
  SktlmTestCatalog(data_dir=str(ddir), file_format='array_record').download_and_prepare()
  src = sources.get_source(cfg)
  train, val = _all_texts(src, 'train'), _all_texts(src, 'validation')
  assert len(val) == 3 and len(train) == 297 and not set(train) & set(val)  # last 1% held out
  b = next(data.make_train_iter(cfg, batch_size=2, seed=0))
  assert b['weights'].sum() > 0
  cfg.text_field = 'text'
  with pytest.raises(UserError, match="text field not found.*'text'.*sentence"):
    sources.get_source(cfg)
  cfg.text_field = 'label'
  with pytest.raises(UserError, match="'label'.*is not text"):
    sources.get_source(cfg)


def test_catalog_not_prepared_fails_fast_offline(tmp_path, no_network):
  t0 = time.perf_counter()
  for name in ('tiny_shakespeare', 'lm1b', 'c4/en'):
    with pytest.raises(UserError, match=f'not prepared.*sktlm data prepare {name}'):
      sources.get_source(_cfg(tmp_path, name=name))
  with pytest.raises(UserError, match="unknown dataset 'no_such_dataset_xyz'"):
    sources.get_source(_cfg(tmp_path, name='no_such_dataset_xyz'))
  assert time.perf_counter() - t0 < 30


def _sktlm(*args, timeout=120):
  env = dict(os.environ, SKTLM_DATA_DIR='/nonexistent-should-not-be-used')
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize('overrides,message', [
    (['--config.data.name=tiny_shakespeare'], 'not prepared'),
    (['--config.data.name=nope_nope'], 'unknown dataset'),
    (['--config.data.name=text_files', '--config.data.path=/no/such/dir'], 'data path not found'),
    (['--config.data.tokenizer=/no/such/tok.model'], 'tokenizer file not found'),
])
def test_cli_bad_input_is_one_line(tmp_path, overrides, message):
  r = _sktlm('data', 'info', '--config=experiments/lm.py', f'--config.data.data_dir={tmp_path}', *overrides)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_prepare_and_info_text_files(tmp_path):
  corpus = tmp_path / 'c'
  for i in range(12):
    _write(str(corpus / f'{i}.txt'), f'text number {i}\n' * (i + 1))
  common = ['--config=experiments/lm.py', f'--data_dir={tmp_path}/tfds', '--config.data.name=text_files',
            f'--config.data.path={corpus}']
  r = _sktlm('data', 'prepare', *common)
  assert r.returncode == 0 and 'ready in' in r.stdout, r.stderr
  r = _sktlm('data', 'info', *common)
  assert r.returncode == 0, r.stderr
  total = sum(len(f'text number {i}\n'.encode()) * (i + 1) + 2 for i in range(12))
  nums = {line.split()[0]: int(line.split()[3].replace(',', '')) for line in r.stdout.splitlines()
          if line.startswith(('train', 'validation'))}
  assert nums['train'] + nums['validation'] == total


def test_concurrent_first_use_builds_once(tmp_path):
  """A sweep starting several runs at once: all see the same prepared dataset, nobody crashes."""
  code = ('import sys; from sktlm import data; from sktlm.config import schema; c = schema.get_config().data; '
          'c.data_dir = sys.argv[1]; '
          'c.seq_len = 16; b = next(data.make_train_iter(c, batch_size=2, seed=0)); '
          'print(int(b["inputs"].sum()))')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
  assert len({o[0] for o in outs}) == 1
  built = [d for d in os.listdir(tmp_path / 'sktlm_stdlib') if not d.startswith('.')]
  assert len(built) == 1 and os.listdir(tmp_path / 'sktlm_stdlib' / built[0]) == ['1.0.0']


def test_epochs_through_the_api_see_every_document_once(tmp_path):
  corpus = tmp_path / 'c'
  for i in range(25):
    _write(str(corpus / f'{i}.txt'), f'doc {i} ' + 'xy' * (i % 7))
  cfg = _cfg(tmp_path / 'tfds', name='text_files', path=str(corpus), seq_len=16)
  src = sources.get_source(cfg)
  docs = _all_texts(src, 'train')
  it = data.make_train_iter(cfg, batch_size=4, seed=5)
  total = sum(len(d.encode()) + 2 for d in docs)
  # Rows come in a shuffled order within windows: read whole windows, then put rows back in stream order.
  W = it.rows.stream.row_window
  n_rows = -(-(3 * total // 16 + 1) // W) * W
  rows = np.concatenate([next(it)['inputs'] for _ in range(-(-n_rows // 4))])[:n_rows]
  order = [it.rows.stream.stream_row(i) for i in range(n_rows)]
  assert sorted(order) == list(range(n_rows))
  stream = rows[np.argsort(order)].reshape(-1)
  tok = data.get_tokenizer(cfg)
  ends = np.flatnonzero(stream == tok.eos_id)
  texts = [tok.decode(p) for p in np.split(stream, ends + 1)[:3 * len(docs)]]
  epochs = [texts[e * len(docs):(e + 1) * len(docs)] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(docs)
  assert epochs[0] != epochs[1] != epochs[2]

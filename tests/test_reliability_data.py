"""Data builds never lose input silently: skipped files and .jsonl lines are counted by reason, reported and
stored beside the dataset; data.strict (or `sktlm data prepare --strict`) fails the build instead."""

import json
import os

import pytest

from sktlm.config import schema
from sktlm.data import sources
from sktlm.errors import UserError


def _cfg(data_dir, **kw):
  cfg = schema.get_config().data
  cfg.update(dict(data_dir=str(data_dir), seq_len=32, name='text_files', **kw))
  return cfg


def _texts(src):
  return sorted(src.splits[s][i]['text'].decode() for s in ('train', 'validation') for i in range(len(src.splits[s])))


def _corpus(root):
  root.mkdir()
  (root / 'good.txt').write_text('a good document\n')
  (root / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))      # not UTF-8
  (root / 'blob.txt').write_bytes(b'text\x00with a NUL byte')                   # binary
  lines = [json.dumps({'text': 'line one'}), '{not json', json.dumps(['a', 'list']),
           json.dumps({'body': 'no text field'}), json.dumps({'text': 7}), json.dumps({'text': 'line six'}), '']
  (root / 'docs.jsonl').write_text('\n'.join(lines) + '\n')
  return root


def test_skipped_input_is_counted_reported_and_strict_fails(tmp_path, capfd):
  corpus = _corpus(tmp_path / 'corpus')
  # Strict first: the build fails naming every reason, and nothing is prepared.
  with pytest.raises(UserError, match=r"data.strict.*2 files .*1 binary.*1 not UTF-8.*4 .jsonl lines"):
    sources.get_source(_cfg(tmp_path / 'tfds', path=str(corpus), strict=True))
  assert not any('dataset_info.json' in f for _, _, fs in os.walk(tmp_path / 'tfds') for f in fs)
  # Default: a line without the text field is counted like the other bad lines, not fatal.
  src = sources.get_source(_cfg(tmp_path / 'tfds', path=str(corpus)))
  assert _texts(src) == ['a good document\n', 'line one', 'line six']
  report = json.load(open(os.path.join(src.dataset_dir, sources.SKIPPED_FILE)))
  assert report['files'] == {'not UTF-8': 1, 'binary (NUL bytes)': 1}
  assert report['lines'] == {'not JSON': 1, 'not a JSON object': 1, "no field 'text'": 1,
                             "'text' not a string": 1}
  err = capfd.readouterr().err
  assert 'skipped 2 files' in err and '4 .jsonl lines' in err and 'docs.jsonl line 2: not JSON' in err
  # A clean corpus reports nothing and stores empty counts.
  clean = tmp_path / 'clean'
  clean.mkdir()
  (clean / 'a.txt').write_text('alpha\n')
  (clean / 'b.txt').write_text('beta\n')
  src = sources.get_source(_cfg(tmp_path / 'tfds', path=str(clean), strict=True))
  assert json.load(open(os.path.join(src.dataset_dir, sources.SKIPPED_FILE))) == \
      {'files': {}, 'lines': {}, 'examples': [], 'summary': ''}
  assert 'skipped' not in capfd.readouterr().err

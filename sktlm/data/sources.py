"""Resolves config.data to prepared TFDS datasets read with tfds.data_source (random access, no TF).

- 'stdlib': built into the data dir on first use (a few seconds).
- 'text_files': built on first use, keyed by a hash of the file list, sizes and mtimes.
- anything else: a TFDS catalog name (lm1b, tiny_shakespeare, ...). Never downloaded here: if it is not
  prepared in the data dir we fail at once and say how to prepare it (`sktlm data prepare NAME`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import sys
import time
from typing import Any

from sktlm.errors import UserError

_PREPARE_HINT = 'sktlm data prepare {name} --data_dir={data_dir}'
SKIPPED_FILE = 'skipped.json'


def _quiet_tfds():
  """Keeps TFDS offline and quiet: no GCS lookups, no progress bars."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.utils import gcs_utils
  gcs_utils._is_gcs_disabled = True  # noqa: SLF001 -- the documented way to keep TFDS off the network
  tfds.display_progress_bar(False)
  for name in ('absl', 'tensorflow_datasets'):
    logging.getLogger(name).setLevel(logging.ERROR)
  return tfds


def data_dir(data_cfg) -> str:
  d = data_cfg.data_dir or os.environ.get('SKTLM_DATA_DIR', '') or '~/.cache/sktlm/tfds'
  return os.path.abspath(os.path.expanduser(d))


@contextlib.contextmanager
def _lock(path: str):
  """Inter-process lock so concurrent runs (a sweep's first step) build a dataset once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class Source:
  """A prepared dataset: random-access train/validation sources of documents."""
  name: str               # e.g. sktlm_stdlib/py3_11_7/1.0.0
  dataset_dir: str        # the TFDS folder holding the array_record files
  text_field: str
  splits: dict[str, Any]  # 'train' / 'validation' -> random-access source (len, __getitem__)
  build_seconds: float = 0.0  # > 0 when this call built the dataset

  def text(self, record) -> bytes:
    return record[self.text_field]


class SplitView:
  """A contiguous index range of a data source (for catalog datasets without a validation split)."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    return self.source[self.start + i]


def _builder_splits(builder) -> dict[str, Any]:
  ds = builder.as_data_source()
  return {'train': ds['train'], 'validation': ds['validation']}


def _prepared_builder(make_builder, lock_path: str, what: str = ''):
  """(builder, seconds spent building): builds under an inter-process lock unless already prepared.

  A build records what it skipped in <dataset dir>/skipped.json, and says so on stderr if `what` names it."""
  builder = make_builder()
  if builder.is_prepared():
    return builder, 0.0
  t0 = time.perf_counter()
  report = None
  with _lock(lock_path), contextlib.redirect_stdout(io.StringIO()):  # TFDS prints progress lines
    builder = make_builder()  # another process may have built it while we waited
    if not builder.is_prepared():
      builder.download_and_prepare()
      report = getattr(builder, 'skip_report', None)
      builder = make_builder()
      if report is not None:
        from sktlm import files
        files.write_json(os.path.join(str(builder.data_dir), SKIPPED_FILE), report)
  if what and report and (report['files'] or report['lines']):
    print(f"{what}: skipped {report['summary']} (counts in {builder.data_dir}/{SKIPPED_FILE}; "
          'data.strict=True fails instead)', file=sys.stderr)
  return builder, time.perf_counter() - t0


def _stdlib(ddir: str) -> Source:
  _quiet_tfds()
  from sktlm.data import builders
  builder, secs = _prepared_builder(
      lambda: builders.SktlmStdlib(data_dir=ddir, file_format='array_record'),
      os.path.join(ddir, '.locks', 'stdlib.lock'))  # its few non-UTF-8 files are known: counted, not shown
  return Source(f'sktlm_stdlib/{builder.builder_config.name}/{builder.version}', str(builder.data_dir),
                'text', _builder_splits(builder), secs)


def _text_files(data_cfg, ddir: str) -> Source:
  _quiet_tfds()
  from sktlm.data import builders
  path = data_cfg.path  # not empty (validate)
  expanded = os.path.expanduser(path)
  if not any(c in path for c in '*?[') and not os.path.exists(expanded):
    raise UserError(f'data path not found: {path}')
  # `config` means a run's config everywhere (tests/test_config_schema.py reads its keys); this is TFDS's.
  builder_config = builders.text_files_config(path, data_cfg.text_field, data_cfg.strict)
  if not builder_config.files:
    raise UserError(f'no files match data path {path}')
  if all(os.path.getsize(f) == 0 for f in builder_config.files):
    raise UserError(f'empty corpus: every file under {path} is empty')
  try:
    builder, secs = _prepared_builder(
        lambda: builders.SktlmTextFiles(config=builder_config, data_dir=ddir, file_format='array_record'),
        os.path.join(ddir, '.locks', f'text_files_{builder_config.name}.lock'), f'text_files corpus {path}')
  except builders.StrictSkip as e:
    raise UserError(f'corpus {path} (data.strict): would skip {e}') from None
  except builders.NoDocuments as e:
    raise UserError(f'corpus {path} has no valid text (no non-empty UTF-8 documents or jsonl lines with a '
                    f"'{data_cfg.text_field}' string){'; skipped ' + str(e) if str(e) else ''}") from None
  return Source(f'sktlm_text_files/{builder_config.name}/{builder.version}', str(builder.data_dir), 'text',
                _builder_splits(builder), secs)


def catalog_builder(name: str, ddir: str):
  """A TFDS catalog builder; UserError for unknown names. Never touches the network."""
  tfds = _quiet_tfds()
  import tensorflow_datasets.text  # noqa: F401 -- registers text datasets the lazy registry misses (c4)
  from tensorflow_datasets.core import registered
  try:
    builder = tfds.builder(name, data_dir=ddir, file_format='array_record')
  except registered.DatasetNotFoundError:
    raise UserError(f"unknown dataset '{name}' (use stdlib, text_files, or a TFDS catalog name such as "
                    'lm1b or tiny_shakespeare)') from None
  except Exception as e:  # noqa: BLE001 -- builder construction errors are config errors here
    raise UserError(f"cannot load TFDS dataset '{name}': {' '.join(str(e).split())[:300]}") from None
  return builder


def _catalog(data_cfg, ddir: str) -> Source:
  import tensorflow_datasets as tfds
  name = data_cfg.name
  builder = catalog_builder(name, ddir)
  hint = _PREPARE_HINT.format(name=name, data_dir=ddir)
  if not builder.is_prepared():
    raise UserError(f"dataset '{name}' is not prepared in {ddir}; prepare it once (downloads) with: {hint}")
  fmt = builder.info.file_format
  fmt = str(getattr(fmt, 'value', fmt or ''))
  if fmt != 'array_record':
    raise UserError(f"dataset '{name}' in {ddir} is stored as {fmt or 'tfrecord'}, not array_record; "
                    f're-prepare it with: {hint}')
  features = builder.info.features
  field = data_cfg.text_field
  if field not in features:
    raise UserError(f"text field not found: dataset '{name}' has no feature '{field}' "
                    f"(features: {', '.join(features.keys())}); set --config.data.text_field")
  if not isinstance(features[field], tfds.features.Text):
    raise UserError(f"feature '{field}' of dataset '{name}' is not text ({type(features[field]).__name__}); "
                    'set --config.data.text_field')
  ds = builder.as_data_source()
  splits = list(ds.keys())
  if 'train' not in splits:
    raise UserError(f"dataset '{name}' has no train split (splits: {', '.join(splits)})")
  train = ds['train']
  for val_name in ('validation', 'test'):
    if val_name in splits:
      val = ds[val_name]
      break
  else:  # hold out the last 1% (at least one document) of train
    n = len(train)
    k = max(1, n // 100)
    if n < 2:
      raise UserError(f"dataset '{name}' has too few documents to hold out a validation split")
    val, train = SplitView(train, n - k, n), SplitView(train, 0, n - k)
  config = f'/{builder.builder_config.name}' if builder.builder_config else ''
  return Source(f'{builder.name}{config}/{builder.version}', str(builder.data_dir), field,
                {'train': train, 'validation': val})


def get_source(data_cfg) -> Source:
  """Prepared source for config.data (building stdlib / text_files on first use)."""
  ddir = data_dir(data_cfg)
  name = data_cfg.name
  if not name:
    raise UserError('config.data.name is empty (use stdlib, text_files or a TFDS catalog name)')
  if name == 'stdlib':
    return _stdlib(ddir)
  if name == 'text_files':
    return _text_files(data_cfg, ddir)
  return _catalog(data_cfg, ddir)


def prepare_catalog(name: str, ddir: str) -> float:
  """Downloads and prepares a catalog dataset as array_record (the only place that may download)."""
  builder = catalog_builder(name, ddir)
  if builder.is_prepared():
    return 0.0
  t0 = time.perf_counter()
  with _lock(os.path.join(ddir, '.locks', f"{name.replace('/', '_')}.lock")):
    builder.download_and_prepare()
  return time.perf_counter() - t0

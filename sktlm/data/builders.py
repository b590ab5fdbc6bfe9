"""TFDS builders for the corpora sktlm builds itself: the Python standard library, and local text files.

Both write array_record (read back with tfds.data_source, no TensorFlow) with features
{'text': Text, 'path': Text}, and split train/validation by a hash of each document's relative path
(plus line/paragraph number inside a single file), so the split never depends on file order or count.

Input that cannot be a document (a file that is not UTF-8 or is binary; a .jsonl line that is not JSON,
not an object, or has no string text field) is skipped and counted by reason (`Skips`); the builder keeps
the count in `skip_report` (sources.py stores it as skipped.json beside the dataset and prints it), or,
with strict=True, fails before writing anything.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5
# Directory names inside the stdlib that are not the standard library's own code.
_STDLIB_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__')


def is_validation(key: str) -> bool:
  """Deterministic ~5% held-out split by a hash of the document's key (relative path)."""
  h = int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')
  return h % 100 < VALIDATION_PERCENT


def split_keys(keys: list[str]) -> tuple[set[str], set[str]]:
  """(train, validation) key sets; with >= 2 documents both splits are non-empty."""
  val = {k for k in keys if is_validation(k)}
  if not val and len(keys) >= 2:  # tiny corpora: hold out the document with the smallest hash
    val = {min(keys, key=lambda k: hashlib.sha256(k.encode('utf-8')).digest())}
  if len(val) == len(keys) and len(keys) >= 2:
    val.discard(max(keys, key=lambda k: hashlib.sha256(k.encode('utf-8')).digest()))
  return set(keys) - val, val


def _features():
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'path': tfds.features.Text()})


# ---------------------------------------------------------------------------------------------------
# The Python standard library.

def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str | None = None) -> list[str]:
  """Relative paths of the stdlib's .py files, sorted (third-party site-packages excluded)."""
  root = root or stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    for name in filenames:
      if name.endswith('.py'):
        out.append(os.path.relpath(os.path.join(dirpath, name), root))
  return sorted(out)


def stdlib_config_name() -> str:
  v = sys.version_info
  return f'py{v.major}_{v.minor}_{v.micro}'


class Skips:
  """Skipped files and .jsonl lines, counted by reason, with the first few places named."""

  def __init__(self):
    self.files: collections.Counter = collections.Counter()
    self.lines: collections.Counter = collections.Counter()
    self.examples: list[str] = []

  def add(self, kind: str, reason: str, where: str) -> None:
    (self.files if kind == 'file' else self.lines)[reason] += 1
    if len(self.examples) < 5:
      self.examples.append(f'{where}: {reason}')

  def __bool__(self):
    return bool(self.files or self.lines)

  def report(self) -> dict:
    return {'files': dict(self.files), 'lines': dict(self.lines), 'examples': self.examples,
            'summary': self.describe()}

  def describe(self) -> str:
    parts = []
    for name, c in (('files', self.files), ('.jsonl lines', self.lines)):
      if c:
        parts.append(f'{sum(c.values())} {name} (' + ', '.join(f'{n} {r}' for r, n in sorted(c.items())) + ')')
    return ' and '.join(parts) + (f'; first: {"; ".join(self.examples[:3])}' if self.examples else '')


class StrictSkip(ValueError):
  """strict=True and some input would be skipped."""


class SktlmStdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard library .py files, one document per file.

  The config name carries the Python version (py3_11_7), so another interpreter builds its own corpus.
  Files that are not valid UTF-8 (a few deliberately broken test inputs) are skipped.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One document per stdlib .py file; 5% validation by path hash.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=stdlib_config_name(),
                                             description=f'Python {sys.version.split()[0]} stdlib')]

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skips = Skips()
    self.skip_report = self.skips.report()

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description='Python standard library source files.', features=_features(),
        metadata=tfds.core.MetadataDict(python_version=sys.version.split()[0], stdlib_dir=stdlib_dir()))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files()
    train, val = split_keys(files)
    return {'train': self._generate_examples(sorted(train)),
            'validation': self._generate_examples(sorted(val))}

  def _generate_examples(self, rel_paths):
    root = stdlib_dir()
    for rel in rel_paths:
      with open(os.path.join(root, rel), 'rb') as f:
        data = f.read()
      try:
        text = data.decode('utf-8')
      except UnicodeDecodeError:
        self.skips.add('file', 'not UTF-8', rel)
        self.skip_report = self.skips.report()
        continue
      if text.strip():
        yield rel, {'text': text, 'path': rel}


# ---------------------------------------------------------------------------------------------------
# Local text files.

@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  """name = a hash of (file list, sizes, mtimes, text_field, format): a changed corpus is rebuilt."""
  files: tuple[str, ...] = ()
  root: str = ''
  text_field: str = 'text'
  single_file: bool = False
  strict: bool = False     # not part of the name: it changes whether a build fails, not what it holds


def text_files_list(path: str) -> tuple[list[str], str]:
  """(absolute file paths, root for relative names) for a folder, a glob or a single file."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    root = path
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      files += [os.path.join(dirpath, n) for n in filenames if not n.startswith('.')]
  elif os.path.isfile(path):
    return [os.path.abspath(path)], os.path.dirname(os.path.abspath(path))
  else:
    files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    root = os.path.dirname(path.split('*')[0].split('?')[0].split('[')[0]) or '.'
  return sorted(os.path.abspath(f) for f in files), os.path.abspath(root)


def text_files_config(path: str, text_field: str, strict: bool = False) -> TextFilesConfig:
  files, root = text_files_list(path)
  single = len(files) == 1 and os.path.isfile(os.path.expanduser(path))
  h = hashlib.sha256(json.dumps([text_field, single, root]).encode())
  for f in files:
    st = os.stat(f)
    h.update(json.dumps([os.path.relpath(f, root), st.st_size, st.st_mtime_ns]).encode())
  return TextFilesConfig(name='c' + h.hexdigest()[:20], description=f'text files from {path}',
                         files=tuple(files), root=root, text_field=text_field, single_file=single,
                         strict=strict)


def iter_documents(files, root: str, text_field: str, single_file: bool, skips: Skips | None = None):
  """Yields (key, text) for every non-empty document; what cannot be one is counted in `skips`.

  .jsonl: one document per line (its `text_field`); a single .txt file: one document per
  blank-line-separated paragraph; any other file in a folder/glob: the whole file.
  """
  skips = skips if skips is not None else Skips()
  for f in files:
    rel = os.path.relpath(f, root)
    if f.endswith('.jsonl'):
      with open(f, 'rb') as fh:
        for i, line in enumerate(fh):
          if not line.strip():
            continue
          where = f'{rel} line {i + 1}'
          try:
            obj = json.loads(line)
          except ValueError:
            skips.add('line', 'not JSON', where)
            continue
          if not isinstance(obj, dict):
            skips.add('line', 'not a JSON object', where)
          elif text_field not in obj:
            skips.add('line', f"no field '{text_field}'", f"{where} (fields: {', '.join(sorted(obj))})")
          elif not isinstance(obj[text_field], str):
            skips.add('line', f"'{text_field}' not a string", where)
          elif obj[text_field].strip():
            yield f'{rel}:{i}', obj[text_field]
      continue
    with open(f, 'rb') as fh:
      data = fh.read()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      skips.add('file', 'not UTF-8', rel)
      continue
    if '\x00' in text:
      skips.add('file', 'binary (NUL bytes)', rel)
      continue
    if single_file:
      for i, para in enumerate(text.split('\n\n')):
        if para.strip():
          yield f'{rel}:{i}', para
    elif text.strip():
      yield rel, text


class SktlmTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files; built once per content hash (see TextFilesConfig).

  A corpus of a single document is cut at a line boundary: the last ~5% becomes the validation split.
  """

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIG_CLS = TextFilesConfig

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description='Local text files.', features=_features(),
        metadata=tfds.core.MetadataDict(root=cfg.root, num_files=len(cfg.files), text_field=cfg.text_field))

  def _documents(self, skips: Skips | None = None):
    cfg = self.builder_config
    return iter_documents(cfg.files, cfg.root, cfg.text_field, cfg.single_file, skips)

  def _split_generators(self, dl_manager):
    del dl_manager
    skips = Skips()
    keys = [k for k, _ in self._documents(skips)]
    self.skip_report = skips.report()
    if skips and self.builder_config.strict:
      raise StrictSkip(skips.describe())
    if not keys:
      raise NoDocuments(skips.describe())
    if len(keys) == 1:
      return {'train': self._generate_single(0), 'validation': self._generate_single(1)}
    train, val = split_keys(keys)
    return {'train': self._generate_examples(train), 'validation': self._generate_examples(val)}

  def _generate_examples(self, keys):
    for key, text in self._documents():
      if key in keys:
        yield key, {'text': text, 'path': key}

  def _generate_single(self, part: int):
    key, text = next(iter(self._documents()))
    cut = text.rfind('\n', 0, int(len(text) * (100 - VALIDATION_PERCENT) / 100)) + 1
    if cut <= 0 or cut >= len(text):
      cut = max(1, int(len(text) * (100 - VALIDATION_PERCENT) / 100))
    piece = text[:cut] if part == 0 else text[cut:]
    yield f'{key}#{part}', {'text': piece, 'path': key}


class NoDocuments(ValueError):
  pass

"""TFDS builders for the corpora sktlm builds itself: the Python standard library, and local text files.

Both write array_record (read back with tfds.data_source, no TensorFlow) with features
{'text': Text, 'path': Text}, and split train/validation by a hash of each document's relative path
(plus line/paragraph number inside a single file), so the split never depends on file order or count.
"""

from __future__ import annotations

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


class SktlmStdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard library .py files, one document per file.

  The config name carries the Python version (py3_11_7), so another interpreter builds its own corpus.
  Files that are not valid UTF-8 (a few deliberately broken test inputs) are skipped.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One document per stdlib .py file; 5% validation by path hash.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=stdlib_config_name(),
                                             description=f'Python {sys.version.split()[0]} stdlib')]

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


def text_files_config(path: str, text_field: str) -> TextFilesConfig:
  files, root = text_files_list(path)
  single = len(files) == 1 and os.path.isfile(os.path.expanduser(path))
  h = hashlib.sha256(json.dumps([text_field, single, root]).encode())
  for f in files:
    st = os.stat(f)
    h.update(json.dumps([os.path.relpath(f, root), st.st_size, st.st_mtime_ns]).encode())
  return TextFilesConfig(name='c' + h.hexdigest()[:20], description=f'text files from {path}',
                         files=tuple(files), root=root, text_field=text_field, single_file=single)


class MissingTextField(ValueError):
  pass


def iter_documents(files, root: str, text_field: str, single_file: bool):
  """Yields (key, text) for every non-empty document.

  .jsonl: one document per line (its `text_field`); a single .txt file: one document per
  blank-line-separated paragraph; any other file in a folder/glob: the whole file.
  """
  for f in files:
    rel = os.path.relpath(f, root)
    if f.endswith('.jsonl'):
      with open(f, 'rb') as fh:
        for i, line in enumerate(fh):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
          except ValueError:
            continue
          if not isinstance(obj, dict):
            continue
          if text_field not in obj:
            raise MissingTextField(f"{rel} line {i + 1} has no field '{text_field}' "
                                   f"(fields: {', '.join(sorted(obj))}); set --config.data.text_field")
          text = obj[text_field]
          if isinstance(text, str) and text.strip():
            yield f'{rel}:{i}', text
      continue
    with open(f, 'rb') as fh:
      data = fh.read()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      continue
    if '\x00' in text:  # binary file
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

  def _documents(self):
    cfg = self.builder_config
    return iter_documents(cfg.files, cfg.root, cfg.text_field, cfg.single_file)

  def _split_generators(self, dl_manager):
    del dl_manager
    keys = [k for k, _ in self._documents()]
    if not keys:
      raise NoDocuments()
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

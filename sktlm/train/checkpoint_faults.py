"""What a failed read of a checkpoint step says, in the user's words: which file is unreadable (empty, cut
short, not JSON, not decodable, missing) or how the checkpoint does not match the model, never the class name of
an exception from Orbax or TensorStore (`sktlm doctor --deep`, a restore that fails). No jax, no Orbax.
"""

from __future__ import annotations

import json
import os
import re

_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
_CUT = re.compile(r'[Rr]equested byte range \[\d+, (\d+)\) is not valid for value of size (\d+)')
_ARRAY = re.compile(r'Error reading "([^"/]+)[^"]*" in OCDBT')
_SHAPE = re.compile(r'Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))')
_TREE = re.compile(r'tree structures do not match:\s*(\S+):')
_NAMED = re.compile(r'named (\S+)\) does not exist at (\S+?)\.?(?:\s|$)')  # Orbax's missing metadata
JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')  # Orbax's, besides array_metadatas/*
_STATUS = re.compile(r'\b[A-Z][A-Z_]+: ')  # TensorStore's status codes (OUT_OF_RANGE: ...)


def describe(step_dir: str, e: BaseException) -> str:
  """One line on why `step_dir` (a checkpoint step folder) did not read back, given the error it raised."""
  bad = bad_file(step_dir)
  if bad:
    return bad
  text = _text(e)
  found = _file_in(step_dir, text)
  if found:
    return found
  m = _SHAPE.search(text)
  if m:
    return f'does not match the model: an array is stored with shape {m.group(2)}, the model has {m.group(1)}'
  m = _TREE.search(text)
  if m:
    return f'does not match the model: the parameter trees differ at {m.group(1)}'
  m = _NAMED.search(text)
  missing = os.path.join(m.group(2), m.group(1)) if m else _missing(e)
  if missing:
    return f'{_rel(step_dir, missing)} is missing'
  return f'does not read back ({_clean(text)})'


def bad_file(step_dir: str) -> str:
  """'<file> is unreadable (...)' for the first of Orbax's files in the step that fails on its own: an empty
  metadata or OCDBT file, or a metadata file that is not JSON; else ''. Reads only the (small) metadata files."""
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      is_json = name in JSON_FILES or os.path.basename(root) == 'array_metadatas'
      if not (is_json or name.endswith('.ocdbt') or os.path.basename(root) == 'd'):
        continue
      try:
        if not os.path.getsize(path):
          return f'{_rel(step_dir, path)} is unreadable (empty)'
        if is_json:
          with open(path, 'rb') as f:
            json.loads(f.read())
      except OSError as err:
        return f'{_rel(step_dir, path)} is unreadable ({err.strerror})'
      except ValueError:
        return f'{_rel(step_dir, path)} is unreadable (cut short or garbled: not valid JSON)'
  return ''


def _file_in(step_dir: str, text: str) -> str:
  """The file a TensorStore error names (or, for a database folder, the data file of the size it read)."""
  paths = [p for p in _LOCAL_FILE.findall(text) if os.path.abspath(p).startswith(os.path.abspath(step_dir))]
  if not paths:
    return ''
  path, cut, array = paths[-1], _CUT.search(text), _ARRAY.search(text)
  of_array = ''
  if os.path.isdir(path):  # an OCDBT database: the error names the array, and gives the data file's size only
    of_array = f' (array {array.group(1)})' if array else ''
    sized = [os.path.join(r, n) for r, _, ns in os.walk(path) for n in sorted(ns)
             if cut and os.path.getsize(os.path.join(r, n)) == int(cut.group(2))]
    path = sized[0] if len(sized) == 1 else path
  what = f'a data file in {_rel(step_dir, path)}' if os.path.isdir(path) else _rel(step_dir, path)
  if cut:
    reason = f'cut short: {cut.group(2)} bytes, where the checkpoint reads up to byte {cut.group(1)}'
  elif any(w in text.lower() for w in ('decod', 'decompress', 'truncated')):
    reason = 'cut short or garbled: it does not decode'
  elif 'NOT_FOUND' in text:
    return f'{what} is missing{of_array}'
  else:
    reason = _clean(text)
  return f'{what} is unreadable ({reason}){of_array}'


def _missing(e: BaseException) -> str:
  for err in _chain(e):
    if isinstance(err, FileNotFoundError) and err.filename:
      return str(err.filename)
  return ''


def _chain(e: BaseException):
  seen = 0
  while e is not None and seen < 10:
    yield e
    e, seen = e.__cause__ or e.__context__, seen + 1


def _text(e: BaseException) -> str:
  return ' | '.join(str(err) for err in _chain(e))


def _clean(text: str, limit: int = 200) -> str:
  text = text.split('. See full TensorStore details')[0].split(' [tensorstore_spec=')[0]
  return ' '.join(_STATUS.sub('', text).split())[:limit]


def _rel(step_dir: str, path: str) -> str:
  return os.path.relpath(os.path.abspath(path), os.path.abspath(step_dir))

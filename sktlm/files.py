"""Small-file I/O that survives kills: atomic durable JSON writes and JSON-lines appends. A leaf (no jax).

Every small file a run or a sweep writes goes through here, so one rule holds everywhere: a reader (or a
SIGKILL at any instant) sees the old file or the new one, never half of one, and no temp file is left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import threading

from sktlm.errors import UserError

TMP_MARK = '.tmp.'  # temp files are '<name>.tmp.<pid>.<thread>'; `sktlm doctor` lists leftovers


def jsonable(v):
  """numpy scalars/arrays -> Python; non-finite floats -> 'nan'/'inf' strings (JSON has neither)."""
  if hasattr(v, 'tolist'):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


# Storage faults as the kernel words them (os.strerror): TensorStore reports the same faults as text.
STORAGE_FAULTS = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO))


def storage_fault(e: BaseException | None) -> tuple[str | None, str] | None:
  """(path or None, reason) if `e`, or what caused it, is a storage fault; else None.

  One wording whichever layer raised it: the reason is the kernel's strerror text ('No space left on device'),
  whether a Python write raised an OSError or TensorStore raised its own error with that text inside. Which
  of the two fails first during an async checkpoint save depends on timing, so the message must not."""
  seen = 0
  while e is not None and seen < 10:
    if isinstance(e, OSError) and e.errno is not None:
      return e.filename or None, e.strerror or os.strerror(e.errno)
    text = str(e)
    for reason in STORAGE_FAULTS:
      if reason in text:
        return None, reason
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def read_json(path: str):
  """The parsed file, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _fsync_dir(path: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or '.', os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_text(path: str, text: str) -> None:
  """Atomic and durable: temp file, fsync, rename, fsync of the folder; the temp file never outlives us."""
  tmp = f'{path}{TMP_MARK}{os.getpid()}.{threading.get_ident()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(path)


def _default(v):
  return v.tolist() if hasattr(v, 'tolist') else str(v)


def dumps(obj) -> str:
  return json.dumps(obj, indent=1, sort_keys=True, default=_default) + '\n'


def write_json(path: str, obj) -> None:
  write_text(path, dumps(obj))


def repair_jsonl(path: str) -> int:
  """Cuts a partial last line (a kill mid-write) so the next append starts on a fresh line; bytes dropped."""
  try:
    with open(path, 'rb+') as f:
      size = f.seek(0, os.SEEK_END)
      if size == 0:
        return 0
      f.seek(size - 1)
      if f.read(1) == b'\n':
        return 0
      pos = size
      while pos > 0:  # find the last newline, reading backwards in blocks
        start = max(0, pos - 65536)
        f.seek(start)
        block = f.read(pos - start)
        i = block.rfind(b'\n')
        if i >= 0:
          keep = start + i + 1
          break
        pos = start
      else:
        keep = 0
      f.truncate(keep)
      return size - keep
  except FileNotFoundError:
    return 0


def read_jsonl(path: str) -> list[dict]:
  """Every well-formed object line (cut or garbled lines are skipped)."""
  out = []
  try:
    with open(path, 'rb') as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict):
          out.append(rec)
  except OSError:
    pass
  return out


def temp_leftovers(folder: str) -> list[str]:
  """Temp files of write_text in `folder` whose writer is gone (its pid is dead)."""
  out = []
  try:
    names = os.listdir(folder)
  except OSError:
    return out
  for name in names:
    if TMP_MARK not in name:
      continue
    pid = name.rsplit(TMP_MARK, 1)[1].split('.')[0]
    if pid.isdigit() and not os.path.exists(f'/proc/{pid}'):
      out.append(os.path.join(folder, name))
  return sorted(out)


def remove_temp_leftovers(folder: str) -> list[str]:
  gone = temp_leftovers(folder)
  for p in gone:
    with contextlib.suppress(OSError):
      os.unlink(p)
  return gone


def check_workdir(workdir: str) -> None:
  """The workdir is a folder or can become one (UserError naming --workdir otherwise)."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = 'is' if probe == path else f'is below {probe}, which is'
    raise UserError(f'--workdir {workdir} {where} a file, not a folder')
  if not os.access(probe, os.W_OK):
    raise UserError(f'--workdir {workdir}: {probe} is not writable')

"""One lock per run: an O_EXCL file naming the process that runs it, with stale-lock detection.

The file holds {"host", "pid", "start"} of the process doing the work (first the launcher, then the
`sktlm train` child, whose pid outlives a SIGKILLed sweep). A lock is stale when that process is gone
(pid dead, or reused: its start time differs) on this host. Locks of other hosts are trusted (the
workdir must then be on a shared filesystem).
"""

from __future__ import annotations

import json
import os
import socket
import time

HOST = socket.gethostname()


def proc_start_time(pid: int) -> str:
  """Start time of `pid` in clock ticks since boot ('' if unknown or gone): guards against pid reuse."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    return stat.rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return ''


def pid_alive(pid: int, start: str = '') -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  now = proc_start_time(pid)
  if now and _is_zombie(pid):
    return False
  return not (start and now and now != start)


def _is_zombie(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except (OSError, IndexError):
    return False


def holder_info(pid: int) -> dict:
  return {'host': HOST, 'pid': pid, 'start': proc_start_time(pid), 'time': time.time()}


def read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.loads(f.read() or '{}')
  except FileNotFoundError:
    return None
  except ValueError:
    return {}  # being written: treat as held


def is_stale(info: dict | None) -> bool:
  if info is None:
    return False
  if not info:
    return False
  if info.get('host') != HOST:
    return False
  return not pid_alive(int(info.get('pid', -1)), info.get('start', ''))


class RunLock:
  """acquire() -> True if this process now holds the lock; False if a live process holds it."""

  def __init__(self, path: str):
    self.path = path
    self.held = False

  def acquire(self) -> bool:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        info = read(self.path)
        if info is None:
          continue  # released meanwhile
        if not is_stale(info):
          return False
        self._break_stale(info)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(holder_info(os.getpid()), f)
      self.held = True
      return True
    return False

  def _break_stale(self, info: dict):
    # Move the stale lock aside atomically, then check that what we moved is the stale one (another
    # sweep may have broken it and taken the lock in between); if not, put it back.
    aside = f'{self.path}.stale.{os.getpid()}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if read(aside) != info:
      try:
        os.link(aside, self.path)  # fails if someone holds the path again
      except FileExistsError:
        pass
    os.unlink(aside)

  def set_holder(self, pid: int):
    """Hands the lock to `pid` (the training process): atomic replace, the path never disappears."""
    tmp = f'{self.path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(holder_info(pid), f)
    os.replace(tmp, self.path)

  def release(self):
    if self.held:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      self.held = False

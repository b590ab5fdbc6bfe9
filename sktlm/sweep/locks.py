"""One lock per run: an O_EXCL file naming the process that runs it, with stale-lock detection.

The file holds {"host", "pid", "start"} of the process doing the work (first the launcher, then the
`sktlm train` child, whose pid outlives a SIGKILLed sweep). A lock is stale when
- its process is gone on this host (pid dead, or reused: its start time differs);
- it is empty or not JSON (a kill or a full disk between the exclusive create and the write) and older
  than EMPTY_GRACE_S;
- it names another host and nothing in the run folder (the lock, which the launcher touches while it waits,
  train.log, metrics.jsonl) changed for `foreign_stale_s` (the workdir is then on a shared filesystem).
Whoever breaks a stale lock says so (`describe`), and a waiter says what it waits for.
"""

from __future__ import annotations

import json
import os
import socket
import time

from sktlm import files, runfiles

HOST = socket.gethostname()
LOCK_ENV = 'SKTLM_SWEEP_LOCK'  # set by the sweep for `sktlm train`: the lock to release if it ends on its own
EMPTY_GRACE_S = 10.0       # an unreadable lock younger than this may be mid-write
FOREIGN_STALE_S = 3600.0   # another host's lock with no activity in its run folder for this long is stale


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
  """The lock's JSON; {} if it exists but is empty or garbled; None if there is none."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    info = json.loads(text)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def _age(path: str) -> float:
  """Seconds since the newest change of the lock or of its run's activity files (inf if none exist)."""
  folder = os.path.dirname(path)
  newest = 0.0
  for p in (path, *(os.path.join(folder, n) for n in runfiles.ACTIVITY)):
    try:
      newest = max(newest, os.path.getmtime(p))
    except OSError:
      pass
  return time.time() - newest if newest else float('inf')


def stale_reason(path: str, info: dict | None, foreign_stale_s: float = FOREIGN_STALE_S) -> str:
  """Why the lock at `path` (holding `info`) is stale, or '' if it must be respected."""
  if info is None:
    return ''
  if not info.get('pid'):
    try:
      age = time.time() - os.path.getmtime(path)
    except OSError:
      return ''
    return f'empty or unreadable lock, {age:.0f}s old' if age > EMPTY_GRACE_S else ''
  if info.get('host') != HOST:
    age = _age(path)
    if age > foreign_stale_s:
      return f'lock of host {info.get("host")} with no activity in its run folder for {age:.0f}s'
    return ''
  if not pid_alive(int(info.get('pid', -1)), info.get('start', '')):
    return f'its process {info.get("pid")} on {HOST} is gone'
  return ''


def describe(info: dict | None) -> str:
  if not info:
    return 'an unreadable lock'
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('time', 0)))
  return f'pid {info.get("pid")} on host {info.get("host")} (since {since})'


def release_if_held_by(path: str, pid: int) -> bool:
  """Removes the lock at `path` if it names `pid` on this host (a training process ending on its own)."""
  info = read(path) or {}
  if info.get('host') == HOST and info.get('pid') == pid:
    try:
      os.unlink(path)
      return True
    except FileNotFoundError:
      pass
  return False


class RunLock:
  """acquire() -> True if this process now holds the lock; False if a live process holds it."""

  def __init__(self, path: str, foreign_stale_s: float = FOREIGN_STALE_S, log=None):
    self.path = path
    self.held = False
    self.holder = os.getpid()
    self.foreign_stale_s = foreign_stale_s
    self.log = log or (lambda msg: print(msg, flush=True))

  def acquire(self) -> bool:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        info = read(self.path)
        if info is None:
          continue  # released meanwhile
        reason = stale_reason(self.path, info, self.foreign_stale_s)
        if not reason:
          return False
        self.log(f'{self.path}: reclaiming a stale lock ({reason})')
        self._break_stale(info)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(holder_info(os.getpid()), f)
        f.flush()
        os.fsync(f.fileno())
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
    files.write_text(self.path, json.dumps(holder_info(pid)))
    self.holder = pid

  def touch(self):
    """Heartbeat for waiters on other hosts (see FOREIGN_STALE_S)."""
    try:
      os.utime(self.path)
    except OSError:
      pass

  def release(self):
    """Removes the lock if it still names this process or its child (the child may have released it and
    another sweep taken it since)."""
    if self.held:
      if (read(self.path) or {}).get('pid') in (os.getpid(), self.holder):
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
      self.held = False

"""Running one sweep run as a real `sktlm train` process: lock, launch, wait, record. Backend-neutral.

`run_one(task)` is what a local worker thread or a Ray task executes. It is idempotent: a run whose
summary.json says done (or diverged) is not started again; a run locked by a live process (another
sweep, or the orphaned training process of a killed sweep) is waited for, never duplicated; anything
else (new, interrupted, failed) is (re)launched and `sktlm train` resumes from its own checkpoints.

Files in the run directory besides what `sktlm train` writes: train.log (stdout+stderr of every
attempt, appended), sweep.lock (while running), sweep_run.json (settings and one record per attempt).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Any

from sktlm.sweep import locks

TERMINAL = ('done', 'diverged')
LOCK = 'sweep.lock'
RECORD = 'sweep_run.json'
LOG = 'train.log'
GRACE_S = 20.0  # after SIGTERM, before SIGKILL
# Runs are stopped with SIGTERM (train saves a checkpoint and exits 143): unlike SIGINT it is not ignored
# in processes started in the background by a shell.
STOP = signal.SIGTERM

_live: dict[int, subprocess.Popen] = {}
_live_mu = threading.Lock()


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, obj: Any):
  """Atomic: a reader (or a SIGKILL) never sees half a file."""
  tmp = f'{path}.tmp.{os.getpid()}.{threading.get_ident()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def summary(run_dir: str) -> dict | None:
  return read_json(os.path.join(run_dir, 'summary.json'))


def log_tail(path: str, n: int = 20, start: int = 0) -> str:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(start, size - 16384))
      text = f.read().decode('utf-8', errors='replace')
  except OSError:
    return ''
  return '\n'.join(text.splitlines()[-n:])


def interrupt_all():
  """SIGTERM to every training process this process started (their process groups), SIGKILL if late."""
  with _live_mu:
    procs = list(_live.values())
  for p in procs:
    _signal(p, STOP)
  deadline = time.time() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      _signal(p, signal.SIGKILL)


def _signal(p: subprocess.Popen, sig):
  try:
    os.killpg(p.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run_one(task: dict, stop: threading.Event | None = None) -> dict:
  """task: name, run_dir, cmd (list), cwd, env (extra), settings, poll_s. Returns a result dict."""
  name, run_dir = task['name'], task['run_dir']
  poll = task.get('poll_s', 1.0)
  os.makedirs(run_dir, exist_ok=True)
  lock = locks.RunLock(os.path.join(run_dir, LOCK))
  waited = False
  while True:
    s = summary(run_dir)
    if s and s.get('status') in TERMINAL:
      return _result(name, s['status'], 0, s, skipped=not waited, adopted=waited)
    if lock.acquire():
      break
    # A live process runs it (another sweep, or the orphan of a killed one): wait for it, never duplicate.
    waited = True
    if stop is not None and stop.is_set():
      return _result(name, 'interrupted', None, None, message='left running in another process')
    time.sleep(poll)
  try:
    s = summary(run_dir)
    if s and s.get('status') in TERMINAL:  # finished while we waited for the lock
      return _result(name, s['status'], 0, s, adopted=waited)
    return _launch(task, lock, stop)
  finally:
    lock.release()


def _launch(task: dict, lock: locks.RunLock, stop: threading.Event | None) -> dict:
  name, run_dir = task['name'], task['run_dir']
  record_path = os.path.join(run_dir, RECORD)
  record = read_json(record_path) or {'name': name, 'settings': task.get('settings', {}), 'attempts': []}
  record['command'] = task['cmd']
  log_path = os.path.join(run_dir, LOG)
  env = dict(os.environ, **task.get('env', {}))
  env.setdefault('PYTHONUNBUFFERED', '1')
  start = time.time()
  with open(log_path, 'ab') as log:
    offset = log.tell()
    log.write(f'=== sktlm sweep: attempt {len(record["attempts"]) + 1} of {name} on {locks.HOST} at '
              f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n=== {" ".join(task["cmd"])}\n'.encode())
    log.flush()
    proc = subprocess.Popen(task['cmd'], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=task.get('cwd') or None, env=env, start_new_session=True)
  with _live_mu:
    _live[proc.pid] = proc
  attempt = {'host': locks.HOST, 'pid': proc.pid, 'start': start, 'end': None, 'exit_code': None,
             'status': 'running'}
  record['attempts'].append(attempt)
  lock.set_holder(proc.pid)
  write_json(record_path, record)
  interrupted = False
  try:
    while True:
      try:
        rc = proc.wait(timeout=0.5)
        break
      except subprocess.TimeoutExpired:
        if stop is not None and stop.is_set() and not interrupted:
          interrupted = True
          _signal(proc, STOP)
      except KeyboardInterrupt:  # Ray cancels a task by raising this in it
        interrupted = True
        _signal(proc, STOP)
        try:
          rc = proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
          _signal(proc, signal.SIGKILL)
          rc = proc.wait()
        break
  finally:
    with _live_mu:
      _live.pop(proc.pid, None)
  s = summary(run_dir)
  if s is not None and os.path.getmtime(os.path.join(run_dir, 'summary.json')) < start - 1:
    s = None  # left by an earlier attempt
  if s and s.get('status') in TERMINAL and rc == 0:
    status = s['status']
  elif s and s.get('status') == 'diverged':
    status = 'diverged'
  elif interrupted or rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):  # 143: train stopped by a signal
    status = 'interrupted'
  else:
    status = 'failed'
  attempt.update(end=time.time(), exit_code=rc, status=status)
  write_json(record_path, record)
  message = (s or {}).get('message', '') if status != 'done' else ''
  tail = log_tail(log_path, start=offset) if status not in TERMINAL else ''
  return _result(name, status, rc, s, message=message, log_tail=tail)


def _result(name, status, rc, s, *, skipped=False, adopted=False, message='', log_tail=''):
  return {'name': name, 'status': status, 'exit_code': rc, 'summary': s, 'skipped': skipped,
          'adopted': adopted, 'message': message, 'log_tail': log_tail}

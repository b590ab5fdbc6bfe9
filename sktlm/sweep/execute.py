"""Running one sweep run as a real `sktlm train` process: lock, launch, wait, record. Backend-neutral.

`run_one(task)` is what a local worker thread or a Ray task executes. It is idempotent: a run whose
summary.json says done (complete: losses present) or diverged is not started again; a run locked by a live
process (another sweep, or the orphaned training process of a killed sweep) is waited for, never
duplicated, and the wait is announced (and bounded by task['lock_timeout_s'] if > 0); anything else (new,
interrupted, failed, done without its losses) is (re)launched and `sktlm train` resumes from its own
checkpoints. `run_status` is the one rule for a run's state on disk.

Files in the run directory besides what `sktlm train` writes: train.log (stdout+stderr of every
attempt, appended), sweep.lock (while running), sweep_run.json (settings and one record per attempt).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from sktlm import files, runfiles
from sktlm.sweep import locks

GRACE_S = 20.0  # after SIGTERM, before SIGKILL
# Runs are stopped with SIGTERM (train saves a checkpoint and exits 143): unlike SIGINT it is not ignored
# in processes started in the background by a shell.
STOP = signal.SIGTERM

LOCK_ENV = locks.LOCK_ENV


class Live:
  """The training processes one backend started and has not seen end (so that it can stop them all)."""

  def __init__(self):
    self._procs: dict[int, subprocess.Popen] = {}
    self._mu = threading.Lock()

  def add(self, proc: subprocess.Popen):
    with self._mu:
      self._procs[proc.pid] = proc

  def remove(self, proc: subprocess.Popen):
    with self._mu:
      self._procs.pop(proc.pid, None)

  def interrupt_all(self):
    """SIGTERM to every process (their process groups), SIGKILL if late."""
    with self._mu:
      procs = list(self._procs.values())
    for p in procs:
      _signal(p, STOP)
    deadline = time.time() + GRACE_S
    for p in procs:
      try:
        p.wait(timeout=max(0.1, deadline - time.time()))
      except subprocess.TimeoutExpired:
        _signal(p, signal.SIGKILL)


def run_status(run_dir: str) -> str:
  """The run's state from its files: done / diverged / running (a live lock) / the last attempt's status
  (failed, interrupted) / pending."""
  done = runfiles.finished(runfiles.read_summary(run_dir))
  if done:
    return done
  lock_path = runfiles.path(run_dir, runfiles.SWEEP_LOCK)
  info = locks.read(lock_path)
  if info is not None and not locks.stale_reason(lock_path, info):
    return runfiles.RUNNING
  rec = runfiles.read(run_dir, runfiles.SWEEP_RECORD) or {}
  last = (rec.get('attempts') or [{}])[-1].get('status')
  # done: but its summary is incomplete
  return runfiles.PENDING if last in (None, runfiles.RUNNING, runfiles.DONE) else last


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


def _signal(p: subprocess.Popen, sig):
  try:
    os.killpg(p.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run_one(task: dict, stop: threading.Event | None = None, live: Live | None = None) -> dict:
  """task: name, run_dir, cmd (list), cwd, env (extra), settings, poll_s, lock_timeout_s (0: wait as long
  as the holder lives). `live`: where the backend tracks the process while it runs. Returns a result dict."""
  name, run_dir = task['name'], task['run_dir']
  poll, timeout = task.get('poll_s', 1.0), task.get('lock_timeout_s', 0) or 0
  os.makedirs(run_dir, exist_ok=True)
  lock = locks.RunLock(runfiles.path(run_dir, runfiles.SWEEP_LOCK),
                       log=lambda msg: print(f'[{name}] {msg}', flush=True))
  waited_since = None
  while True:
    status = runfiles.finished(runfiles.read_summary(run_dir))
    if status:
      return _result(name, status, 0, runfiles.read_summary(run_dir), skipped=waited_since is None,
                     adopted=waited_since is not None)
    if lock.acquire():
      break
    # A live process runs it (another sweep, or the orphan of a killed one): wait for it, never duplicate.
    if waited_since is None:
      waited_since = time.time()
      print(f'[{name}] waiting for {locks.describe(locks.read(lock.path))}, which holds {lock.path}'
            + (f' (giving up after {timeout:g}s)' if timeout else ''), flush=True)
    if stop is not None and stop.is_set():
      return _result(name, runfiles.INTERRUPTED, None, None, message='left running in another process')
    if timeout and time.time() - waited_since > timeout:
      return _result(name, runfiles.LOCKED, None, None, message=f'still locked by '
                     f'{locks.describe(locks.read(lock.path))} after {timeout:g}s ({lock.path})')
    time.sleep(poll)
  try:
    status = runfiles.finished(runfiles.read_summary(run_dir))
    if status:  # finished while we waited for the lock
      return _result(name, status, 0, runfiles.read_summary(run_dir), adopted=waited_since is not None)
    return _launch(task, lock, stop, live or Live())
  finally:
    lock.release()


def _launch(task: dict, lock: locks.RunLock, stop: threading.Event | None, live: Live) -> dict:
  name, run_dir = task['name'], task['run_dir']
  record_path = runfiles.path(run_dir, runfiles.SWEEP_RECORD)
  record = files.read_json(record_path) or {'name': name, 'settings': task.get('settings', {}), 'attempts': []}
  record['command'] = task['cmd']
  log_path = runfiles.path(run_dir, runfiles.SWEEP_LOG)
  env = dict(os.environ, **task.get('env', {}))
  env.setdefault('PYTHONUNBUFFERED', '1')
  env[LOCK_ENV] = lock.path
  start = time.time()
  with open(log_path, 'ab') as log:
    offset = log.tell()
    log.write(f'=== sktlm sweep: attempt {len(record["attempts"]) + 1} of {name} on {locks.HOST} at '
              f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n=== {" ".join(task["cmd"])}\n'.encode())
    log.flush()
    proc = subprocess.Popen(task['cmd'], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=task.get('cwd') or None, env=env, start_new_session=True)
  live.add(proc)
  attempt = {'host': locks.HOST, 'pid': proc.pid, 'start': start, 'end': None, 'exit_code': None,
             'status': runfiles.RUNNING}
  record['attempts'].append(attempt)
  lock.set_holder(proc.pid)
  files.write_json(record_path, record)
  interrupted = False
  beat = time.time()
  try:
    while True:
      try:
        rc = proc.wait(timeout=0.5)
        break
      except subprocess.TimeoutExpired:
        if time.time() - beat > 60:
          lock.touch()
          beat = time.time()
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
    live.remove(proc)
  s = runfiles.read_summary(run_dir)
  if s is not None and os.path.getmtime(runfiles.path(run_dir, runfiles.SUMMARY)) < start - 1:
    s = None  # left by an earlier attempt
  if runfiles.finished(s) and rc == 0:
    status = s['status']
  elif s and s.get('status') == runfiles.DIVERGED:
    status = runfiles.DIVERGED
  elif interrupted or rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):  # 143: train stopped by a signal
    status = runfiles.INTERRUPTED
  else:
    status = runfiles.FAILED
  attempt.update(end=time.time(), exit_code=rc, status=status)
  files.write_json(record_path, record)
  message = (s or {}).get('message', '') if status != runfiles.DONE else ''
  tail = log_tail(log_path, start=offset) if status not in runfiles.TERMINAL else ''
  return _result(name, status, rc, s, message=message, log_tail=tail)


def _result(name, status, rc, s, *, skipped=False, adopted=False, message='', log_tail=''):
  return {'name': name, 'status': status, 'exit_code': rc, 'summary': s, 'skipped': skipped,
          'adopted': adopted, 'message': message, 'log_tail': log_tail}

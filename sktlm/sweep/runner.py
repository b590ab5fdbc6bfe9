"""The sweep scheduler: launches runs on a backend (local threads or Ray tasks), respects branch
dependencies, shows live status and keeps results.csv/json current.

State lives only in the run directories (summary.json, sweep_run.json, sweep.lock), so a rerun of the
same command picks up where a killed one stopped.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import queue
import sys
import threading
import time

from sktlm import files, runfiles
from sktlm.errors import UserError
from sktlm.sweep import cores, execute, progress, results
from sktlm.sweep.schedule import PlannedRun, fmt_time


def default_train_cmd() -> list[str]:
  return [sys.executable, '-m', 'sktlm.cli', 'train']


class LocalBackend:
  """Each run in a worker thread that owns one `sktlm train` subprocess; with `slots` (one core list per
  concurrent run, sweep/cores.py) each run is pinned to the cores of a free slot."""

  name = 'local'

  def __init__(self, parallel: int, slots: list[list[int]] | None = None):
    self.parallel = max(1, parallel)
    self.stop = threading.Event()
    self.live = execute.Live()  # the `sktlm train` processes of this backend's runs
    self.pool = cf.ThreadPoolExecutor(self.parallel, thread_name_prefix='sweep-run')
    self.free = queue.SimpleQueue()  # a worker takes a slot for the run's lifetime: never more than parallel
    for cpus in (slots or [])[:self.parallel]:
      self.free.put(cpus)
    self.pinned = bool(slots)

  def submit(self, task: dict, resources: dict):
    del resources
    return self.pool.submit(self._run, task)

  def _run(self, task: dict) -> dict:
    if not self.pinned:
      return execute.run_one(task, self.stop, self.live)
    cpus = self.free.get()
    try:
      return execute.run_one({**task, 'env': {**task.get('env', {}), cores.ENV: cores.fmt(cpus)}}, self.stop, self.live)
    finally:
      self.free.put(cpus)

  def wait(self, handles: list, timeout: float) -> list:
    done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
    return list(done)

  def result(self, handle) -> dict:
    return handle.result()

  def interrupt(self, handles: list):
    del handles
    self.stop.set()
    self.live.interrupt_all()

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)


def check_settings(runs: list[PlannedRun], sweep_dir: str, common: dict):
  """Refuses to reuse a run directory that was made with other settings (its results would be stale)."""
  bad = []
  for r in runs:
    rec = runfiles.read(os.path.join(sweep_dir, r.name), runfiles.SWEEP_RECORD)
    want = {**common, **r.settings}
    if rec and rec.get('settings') is not None and _canon(rec['settings']) != _canon(want):
      bad.append(f'{r.name}: {rec["settings"]} -> {want}')
  if bad:
    raise UserError(f'run directories in {sweep_dir} were made with other settings ({"; ".join(bad[:3])}); '
                    'use another --workdir or move those runs away')


def _canon(d: dict) -> str:
  import json
  return json.dumps(d, sort_keys=True, default=str)


def run_sweep(runs: list[PlannedRun], sweep_dir: str, backend, *, common: dict | None = None,
              train_cmd: list[str] | None = None, retry_failed: bool = True, display=None,
              poll_s: float = 1.0, env: dict | None = None, lock_timeout_s: float = 0) -> list[dict]:
  """Runs everything not finished yet; returns the result rows (also written to results.csv/json)."""
  common = common or {}
  sweep_dir = os.path.abspath(sweep_dir)
  os.makedirs(sweep_dir, exist_ok=True)
  files.remove_temp_leftovers(sweep_dir)  # of results writes killed with an earlier sweep
  check_settings(runs, sweep_dir, common)
  if hasattr(backend, 'check'):
    backend.check(runs)
  train_cmd = train_cmd or default_train_cmd()
  display = display or progress.Display()
  by_name = {r.name: r for r in runs}
  state: dict[str, str] = {}
  last: dict[str, dict] = {}
  started: dict[str, float] = {}
  for r in runs:
    on_disk = execute.run_status(os.path.join(sweep_dir, r.name))
    keep = on_disk in runfiles.TERMINAL or (on_disk == runfiles.FAILED and not retry_failed)
    state[r.name] = on_disk if keep else runfiles.PENDING
  n_skip = sum(v in runfiles.TERMINAL for v in state.values())
  if n_skip:
    display.event(f'{n_skip} of {len(runs)} runs already finished in {sweep_dir}; skipping them')

  def write_results():
    rows = [results.row(r, sweep_dir, common, state=state[r.name], last=last.get(r.name)) for r in runs]
    results.write(rows, sweep_dir)
    return rows

  def header():
    shown = (runfiles.DONE, runfiles.RUNNING, runfiles.FAILED, runfiles.PENDING)
    counts = {k: sum(v == k for v in state.values()) for k in shown}
    other = len(runs) - sum(counts.values())
    return f'sweep {sweep_dir} [{backend.name}]: ' + ', '.join(f'{counts[k]} {k}' for k in shown) + (
        f', {other} other' if other else '')

  def views():
    return [progress.run_view(r.name, state[r.name], r.steps, os.path.join(sweep_dir, r.name),
                              started.get(r.name)) for r in runs]

  def task(r: PlannedRun) -> dict:
    run_dir = os.path.join(sweep_dir, r.name)
    parent_dir = os.path.join(sweep_dir, r.parent) if r.parent else ''
    return dict(name=r.name, run_dir=run_dir, cmd=train_cmd + r.train_args(run_dir, parent_dir),
                cwd=os.getcwd(), env=dict(env or {}), settings={**common, **r.settings}, poll_s=poll_s,
                lock_timeout_s=lock_timeout_s)

  def ready(r: PlannedRun) -> bool | None:
    """True: can start; False: wait; None: can never start (parent failed before the branch step)."""
    if not r.parent:
      return True
    ps = state[r.parent]
    if ps == runfiles.DONE or runfiles.has_checkpoint(os.path.join(sweep_dir, r.parent), r.parent_step):
      return True
    if ps in (runfiles.FAILED, runfiles.DIVERGED, runfiles.BLOCKED, runfiles.INTERRUPTED):
      return None
    return False

  inflight: dict = {}
  write_results()
  try:
    while True:
      for r in runs:
        if state[r.name] != runfiles.PENDING or len(inflight) >= getattr(backend, 'parallel', 1 << 30):
          continue
        ok = ready(r)
        if ok is None:
          state[r.name] = runfiles.BLOCKED
          last[r.name] = {'message': f'parent {r.parent} ended ({state[r.parent]}) before step '
                                     f'{r.parent_step}'}
          display.event(f'blocked {r.name}: {last[r.name]["message"]}')
          continue
        if ok:
          inflight[backend.submit(task(r), r.resources)] = r.name
          state[r.name] = runfiles.RUNNING
          started[r.name] = time.time()
          display.event(f'started {r.name}')
      if not inflight:
        break
      for h in backend.wait(list(inflight), timeout=poll_s):
        name = inflight.pop(h)
        try:
          res = backend.result(h)
        except Exception as e:  # noqa: BLE001 - a backend error (e.g. a lost Ray worker) fails one run
          res = {'name': name, 'status': runfiles.FAILED, 'exit_code': None, 'message': f'{type(e).__name__}: {e}',
                 'log_tail': ''}
        state[name] = res['status']
        last[name] = res
        display.event(_describe(res, by_name[name], time.time() - started[name]))
        write_results()
      display.update(views, header)
  except (KeyboardInterrupt, UserError) as e:  # UserError: results.csv/json could not be written (disk full)
    display.event(f'{"interrupted" if isinstance(e, KeyboardInterrupt) else e}: stopping runs (they resume '
                  'from their checkpoints on the next start)')
    backend.interrupt(list(inflight))
    for h in list(inflight):
      name = inflight.pop(h)
      try:
        res = backend.result(h) if backend.wait([h], timeout=execute.GRACE_S + 5) else None
      except Exception:  # noqa: BLE001
        res = None
      state[name] = (res or {}).get('status', runfiles.INTERRUPTED)
      if res:
        last[name] = res
    with contextlib.suppress(UserError):  # the results files may be what failed
      write_results()
    raise
  finally:
    backend.close()
  rows = write_results()
  display.final(views(), header())
  for row in rows:
    if row['status'] not in (runfiles.DONE, runfiles.PENDING):
      display.event(f'{row["name"]}: {row["status"]} (exit code {row["exit_code"]}) {row["message"]}\n'
                    + _indent(row['log_tail']))
  return rows


def _describe(res: dict, r: PlannedRun, dt: float) -> str:
  s = res.get('summary') or {}
  if res['status'] in runfiles.TERMINAL:
    how = 'already finished' if res.get('skipped') else ('finished elsewhere' if res.get('adopted') else
                                                          f'in {fmt_time(dt)}')
    loss = s.get('final_eval_loss', s.get('final_train_loss'))
    return f'{res["status"]} {r.name} {how}' + (f', loss {loss:.4f}' if isinstance(loss, float) else '')
  return (f'{res["status"]} {r.name}: exit code {res.get("exit_code")} {res.get("message", "")}\n'
          + _indent(res.get('log_tail', '')))


def _indent(text: str, n: int = 8) -> str:
  lines = (text or '').splitlines()[-n:]
  return '\n'.join('    | ' + line for line in lines)

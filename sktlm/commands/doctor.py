"""`sktlm doctor --workdir=RUN | --sweep_dir=SWEEP [--fix]` (or the folder alone): lists what is inconsistent
in a run or a sweep folder.

Checks: stale sweep.lock files (dead holder, empty/garbled, another host's lock with no activity), temp
files left by killed writes, Orbax temp folders of killed saves, a cut last line in metrics.jsonl, runs
whose summary says done without their losses, results.csv that disagrees with results.json, and done rows
of results.csv without losses. `--fix` repairs what is safe (removes stale locks, temp files and temp
folders when no live process holds the run, cuts the partial metrics line, re-renders results.csv from
results.json); a done run without its losses is completed by rerunning `sktlm train` (or the sweep) on it.
`--deep` also reads every array of every checkpoint (Orbax, into host memory, one array at a time: no mesh,
no config) and reports the ones that do not read back; `--fix` moves those to `checkpoints.quarantine/`
(never deletes), so the next `sktlm train` resumes from the newest good one.
Exit code 0 when nothing is left to fix, 1 otherwise. Imports jax only with --deep.
"""

from __future__ import annotations

import csv
import os

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run folder to check')
_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'a sweep folder to check (its runs too)')
_FIX = flags.DEFINE_bool('fix', False, 'repair what is safe to repair')
_DEEP = flags.DEFINE_bool('deep', False, 'also read every array of every checkpoint (finds corrupt ones)')


def _is_run(path: str) -> bool:
  from sktlm import runfiles
  return any(os.path.exists(runfiles.path(path, n)) for n in runfiles.MARKERS)


class Report:
  def __init__(self, fix: bool, deep: bool = False):
    self.fix, self.deep, self.left, self.fixed = fix, deep, 0, 0

  def problem(self, path: str, text: str, repair=None, advice: str = ''):
    """One finding; `repair` (a callable) runs with --fix."""
    if repair is not None and self.fix:
      repair()
      self.fixed += 1
      print(f'{path}: {text} [fixed]')
      return
    self.left += 1
    how = ' (--fix repairs it)' if repair is not None else (f' ({advice})' if advice else '')
    print(f'{path}: {text}{how}')


def check_run(run_dir: str, rep: Report) -> None:
  from sktlm import files, runfiles
  from sktlm.sweep import locks
  lock_path = runfiles.path(run_dir, runfiles.SWEEP_LOCK)
  info = locks.read(lock_path)
  live = info is not None and not locks.stale_reason(lock_path, info)
  if info is not None and not live:
    rep.problem(lock_path, f'stale lock: {locks.stale_reason(lock_path, info)}',
                lambda: os.path.exists(lock_path) and os.unlink(lock_path))
  for tmp in files.temp_leftovers(run_dir):
    rep.problem(tmp, 'temp file of a killed write', lambda t=tmp: os.unlink(t))
  ck = runfiles.checkpoints_dir(run_dir)
  for tmp in runfiles.checkpoint_tmp_folders(ck):
    if live:
      rep.problem(tmp, 'checkpoint save in progress or killed', advice=f'held by {locks.describe(info)}')
    else:
      rep.problem(tmp, 'temp folder of a killed checkpoint save', lambda t=tmp: runfiles.remove_checkpoint_tmp_folders(
          os.path.dirname(t)))
      break  # one repair removes them all
  metrics = runfiles.path(run_dir, runfiles.METRICS)
  if os.path.exists(metrics) and os.path.getsize(metrics):
    with open(metrics, 'rb') as f:
      f.seek(-1, os.SEEK_END)
      cut = f.read(1) != b'\n'
    if cut and not live:
      rep.problem(metrics, 'last line cut by a kill', lambda: files.repair_jsonl(metrics))
  s = runfiles.read_summary(run_dir)
  bad = runfiles.summary_problems(s)
  if bad:
    rep.problem(runfiles.path(run_dir, runfiles.SUMMARY), f'status done but incomplete: {", ".join(bad)}',
                advice='rerun the same `sktlm train` command (or the sweep): it completes the summary')
  steps = runfiles.steps_on_disk(ck)
  if rep.deep:
    from sktlm.train import checkpoint  # Orbax reads every array: the one part of doctor that needs training's I/O
    for step in steps:
      bad = checkpoint.verify(os.path.join(ck, str(step)))
      if bad and live:
        rep.problem(os.path.join(ck, str(step)), f'corrupt checkpoint: {bad}', advice=f'held by {locks.describe(info)}')
      elif bad:
        rep.problem(os.path.join(ck, str(step)), f'corrupt checkpoint (to {runfiles.QUARANTINE}/): {bad}',
                    lambda st=step: runfiles.quarantine(ck, st, 'corrupt'))
    steps = runfiles.steps_on_disk(ck)
  if s and s.get('status') == runfiles.DONE and steps and steps[-1] != s.get('step'):
    rep.problem(ck, f'latest checkpoint step {steps[-1]} != summary step {s.get("step")}',
                advice='rerun the same `sktlm train` command: it trains on from the latest checkpoint')


def check_sweep(sweep_dir: str, rep: Report) -> None:
  from sktlm import files, runfiles
  from sktlm.sweep import results
  for tmp in files.temp_leftovers(sweep_dir):
    rep.problem(tmp, 'temp file of a killed write', lambda t=tmp: os.unlink(t))
  bad = results.consistent(sweep_dir)
  if bad:
    fixable = isinstance(files.read_json(os.path.join(sweep_dir, 'results.json')), list)
    rep.problem(os.path.join(sweep_dir, 'results.csv'), bad,
                (lambda: results.sync_csv(sweep_dir)) if fixable else None,
                advice='rerun the sweep command: it rewrites both')
  csv_path = os.path.join(sweep_dir, 'results.csv')
  if os.path.exists(csv_path):
    with open(csv_path, newline='') as f:
      for row in csv.DictReader(f):
        if row.get('status') == runfiles.DONE and not row.get('final_train_loss'):
          rep.problem(csv_path, f'run {row.get("name")} is done without losses',
                      advice='rerun the sweep command: it completes the run and its row')
  for name in sorted(os.listdir(sweep_dir)):
    path = os.path.join(sweep_dir, name)
    if os.path.isdir(path) and _is_run(path):
      check_run(path, rep)


def main(argv):
  from sktlm.errors import UserError
  given = [p for p in (_WORKDIR.value, _SWEEP_DIR.value) if p] + argv[1:]
  if len(given) != 1:
    raise UserError('usage: sktlm doctor --workdir=RUN | --sweep_dir=SWEEP [--deep] [--fix] (or the folder alone)')
  path = given[0]
  if not os.path.isdir(path):
    raise UserError(f'{path}: not a folder')
  rep = Report(_FIX.value, _DEEP.value)
  if _is_run(path):
    check_run(path, rep)
  else:
    check_sweep(path, rep)
  done = f', {rep.fixed} fixed' if rep.fixed else ''
  print(f'{path}: {rep.left} problem(s) left{done}' if rep.left or rep.fixed else f'{path}: consistent')
  return 1 if rep.left else 0

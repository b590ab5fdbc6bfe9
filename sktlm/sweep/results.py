"""results.csv / results.json of a sweep: one row per run, from each run's summary.json (docs/run_files.md).

The first columns (COLUMNS) are the interface `sktlm scaling` reads; keep their names stable.
Both files are rewritten atomically after every finished run, so killing the sweep loses nothing.
results.json is written first and results.csv is rendered from it (`csv_text`), so a kill between the two
leaves a csv that `consistent` (and `sktlm doctor`) detects and `sync_csv` repairs.
"""

from __future__ import annotations

import csv
import io
import json
import os

from sktlm import files, run_row, runfiles
from sktlm.errors import UserError
from sktlm.sweep import execute
from sktlm.sweep.schedule import PlannedRun

COLUMNS = ['name', 'overrides', 'status', 'exit_code', 'n_params_total', 'n_params_non_embedding',
           'n_params_active', 'tokens', 'flops_6n', 'flops_exact', 'final_train_loss', 'final_eval_loss',
           'best_eval_loss', 'wall_time_s', 'tokens_per_s', 'mfu', 'workdir', 'log_tail']
EXTRA = ['flops_executed', 'size', 'n_params_active_non_embedding', 'steps', 'batch_size', 'seq_len', 'parent',
         'parent_step', 'config', 'message'] + list(run_row.MOE_COLUMNS)


def row(run: PlannedRun, sweep_dir: str, common: dict, state: str = '', last: dict | None = None) -> dict:
  """state/last: the scheduler's view of a run that did not finish (failed, interrupted, pending)."""
  run_dir = os.path.join(sweep_dir, run.name)
  s = runfiles.read_summary(run_dir) or {}
  record = runfiles.read(run_dir, runfiles.SWEEP_RECORD) or {}
  attempts = record.get('attempts') or []
  status = runfiles.finished(s) or state or execute.run_status(run_dir)
  exit_code = attempts[-1].get('exit_code') if attempts else None
  if last and last.get('exit_code') is not None:
    exit_code = last['exit_code']
  # What the summary lacks (a run not started or not finished) is the plan's: params, FLOPs, tokens, steps.
  planned = {'params': run.params, 'flops': run.flops, 'tokens': run.tokens, 'step': run.steps}
  got = run_row.from_summary({**planned, **{k: v for k, v in s.items() if v not in (None, {}, '')}})
  tail = ''
  if status not in (runfiles.DONE, runfiles.PENDING, runfiles.RUNNING):
    tail = (last or {}).get('log_tail') or execute.log_tail(runfiles.path(run_dir, runfiles.SWEEP_LOG))
  return {
      'name': run.name,
      'overrides': json.dumps({**common, **run.settings}, sort_keys=False, default=str),
      'status': status,
      'exit_code': exit_code,
      **{k: got[k] for k in ('n_params_total', 'n_params_non_embedding', 'n_params_active', 'tokens', 'flops_6n',
                             'flops_exact', 'final_train_loss', 'final_eval_loss', 'best_eval_loss',
                             'wall_time_s', 'tokens_per_s', 'mfu')},
      'workdir': run.name,
      'log_tail': tail,
      'flops_executed': got['flops_executed'],
      'size': run.size,
      'n_params_active_non_embedding': got['n_params_active_non_embedding'],
      'steps': got['steps'],
      'batch_size': run.batch_size,
      'seq_len': run.seq_len,
      'parent': run.parent,
      'parent_step': run.parent_step if run.parent else None,
      'config': run.config,
      'message': got['message'] or (last or {}).get('message', ''),
      **{k: got[k] for k in run_row.MOE_COLUMNS},
  }


def csv_text(rows: list[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS + EXTRA, extrasaction='ignore', lineterminator='\n')
  w.writeheader()
  for r in rows:
    w.writerow({k: '' if v is None else v for k, v in r.items()})
  return buf.getvalue()


def write(rows: list[dict], sweep_dir: str):
  """Both files, atomically. An I/O error (a full disk) is one UserError naming the file: the earlier
  version of each file stays whole (files.write_text), and so do the runs' own files."""
  os.makedirs(sweep_dir, exist_ok=True)
  text = files.dumps(rows)
  for name, content in (('results.json', text), ('results.csv', csv_text(json.loads(text)))):  # csv: as re-read
    path = os.path.join(sweep_dir, name)
    try:
      files.write_text(path, content)
    except OSError as e:
      raise UserError(f'cannot write {path}: {e.strerror}; the earlier {name} and every '
                      "run's own files are intact (free space and rerun the sweep: it rewrites both)") from None


def consistent(sweep_dir: str) -> str:
  """'' if results.csv is what results.json renders to (or neither exists), else what is wrong."""
  jpath, cpath = os.path.join(sweep_dir, 'results.json'), os.path.join(sweep_dir, 'results.csv')
  if not os.path.exists(jpath) and not os.path.exists(cpath):
    return ''
  rows = files.read_json(jpath)
  if not isinstance(rows, list):
    return 'results.json is missing or unreadable'
  try:
    with open(cpath) as f:
      text = f.read()
  except OSError:
    return 'results.csv is missing'
  return '' if text == csv_text(rows) else 'results.csv disagrees with results.json'


def sync_csv(sweep_dir: str) -> None:
  rows = files.read_json(os.path.join(sweep_dir, 'results.json'))
  files.write_text(os.path.join(sweep_dir, 'results.csv'), csv_text(rows))

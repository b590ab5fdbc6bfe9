"""results.csv / results.json of a sweep: one row per run, from each run's summary.json (docs/run_files.md).

The first columns (COLUMNS) are the interface `sktlm scaling` reads; keep their names stable.
Both files are rewritten atomically after every finished run, so killing the sweep loses nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os

from sktlm.sweep import execute
from sktlm.sweep.plan import PlannedRun

COLUMNS = ['name', 'overrides', 'status', 'exit_code', 'n_params_total', 'n_params_non_embedding',
           'n_params_active', 'tokens', 'flops_6n', 'flops_exact', 'final_train_loss', 'final_eval_loss',
           'best_eval_loss', 'wall_time_s', 'tokens_per_s', 'mfu', 'workdir', 'log_tail']
EXTRA = ['size', 'n_params_active_non_embedding', 'steps', 'batch_size', 'seq_len', 'parent', 'parent_step',
         'config', 'message']


def row(run: PlannedRun, sweep_dir: str, common: dict, state: str = '', last: dict | None = None) -> dict:
  """state/last: the scheduler's view of a run that did not finish (failed, interrupted, pending)."""
  run_dir = os.path.join(sweep_dir, run.name)
  s = execute.summary(run_dir) or {}
  record = execute.read_json(os.path.join(run_dir, execute.RECORD)) or {}
  attempts = record.get('attempts') or []
  status = s.get('status') if s.get('status') in execute.TERMINAL else (
      state or (attempts[-1]['status'] if attempts else 'pending'))
  exit_code = attempts[-1].get('exit_code') if attempts else None
  if last and last.get('exit_code') is not None:
    exit_code = last['exit_code']
  params = s.get('params') or run.params
  fl = s.get('flops') or run.flops
  tail = ''
  if status not in ('done', 'pending', 'running'):
    tail = (last or {}).get('log_tail') or execute.log_tail(os.path.join(run_dir, execute.LOG))
  return {
      'name': run.name,
      'overrides': json.dumps({**common, **run.settings}, sort_keys=False, default=str),
      'status': status,
      'exit_code': exit_code,
      'n_params_total': params.get('total'),
      'n_params_non_embedding': params.get('non_embedding'),
      'n_params_active': params.get('active'),
      'tokens': s.get('tokens', run.tokens),
      'flops_6n': fl.get('6N'),
      'flops_exact': fl.get('exact'),
      'final_train_loss': s.get('final_train_loss'),
      'final_eval_loss': s.get('final_eval_loss'),
      'best_eval_loss': s.get('best_eval_loss'),
      'wall_time_s': s.get('wall_time_s'),
      'tokens_per_s': s.get('tokens_per_s'),
      'mfu': s.get('mfu'),
      'workdir': run.name,
      'log_tail': tail,
      'size': run.size,
      'n_params_active_non_embedding': params.get('active_non_embedding'),
      'steps': s.get('step', run.steps) if s else run.steps,
      'batch_size': run.batch_size,
      'seq_len': run.seq_len,
      'parent': run.parent,
      'parent_step': run.parent_step if run.parent else None,
      'config': run.config,
      'message': s.get('message') or (last or {}).get('message', ''),
  }


def write(rows: list[dict], sweep_dir: str):
  os.makedirs(sweep_dir, exist_ok=True)
  execute.write_json(os.path.join(sweep_dir, 'results.json'), rows)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS + EXTRA, extrasaction='ignore', lineterminator='\n')
  w.writeheader()
  for r in rows:
    w.writerow({k: '' if v is None else v for k, v in r.items()})
  tmp = os.path.join(sweep_dir, f'results.csv.tmp.{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write(buf.getvalue())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(sweep_dir, 'results.csv'))

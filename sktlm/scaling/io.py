"""Reading sweep results: results.csv (written by `sktlm sweep`), or run workdirs directly, and curves.

A run row is a dict with the results.csv columns (see docs/scaling.md); numbers are floats (nan when
missing), `overrides` a dict, `workdir` an absolute path ('' when unknown). Only status=done rows with the
needed values are used for fits; every other row is reported, never silently lost.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re

import numpy as np

from sktlm import run_row, runfiles
from sktlm.errors import UserError

NUMERIC = ('n_params_total', 'n_params_non_embedding', 'n_params_active', 'tokens', 'flops_6n', 'flops_exact',
           'flops_executed', 'final_train_loss', 'final_eval_loss', 'best_eval_loss', 'wall_time_s',
           'tokens_per_s', 'mfu', 'budget', 'moe_experts', 'moe_top_k', 'moe_granularity', 'moe_shared_experts',
           'moe_dropped_frac')
N_COLUMNS = {'non_embedding': 'n_params_non_embedding', 'total': 'n_params_total', 'active': 'n_params_active'}
LOSS_COLUMNS = {'best_eval': 'best_eval_loss', 'final_eval': 'final_eval_loss', 'final_train': 'final_train_loss'}
# C per report convention (config/accounting.py). Records name the exact count `flops_model` (newer) or `flops_exact`.
FLOPS_COLUMNS = {'exact': 'flops_exact', '6n': 'flops_6n'}


@dataclasses.dataclass
class Sweep:
  label: str
  path: str
  rows: list[dict]
  source: str                       # 'results.csv' or 'workdirs'
  warnings: list[str] = dataclasses.field(default_factory=list)


def _float(v) -> float:
  if v is None or (isinstance(v, str) and not v.strip()):
    return math.nan
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def _budget_from_overrides(overrides: dict) -> float:
  for k, v in overrides.items():
    if str(k).split('.')[-1] in ('budget', 'flops_budget', 'compute_budget'):
      return _float(v)
  return math.nan


def _normalise(row: dict, base_dir: str) -> dict:
  out = dict(row)
  if _float(row.get('flops_model')) > 0:  # the model-FLOPs column of newer records is the exact count
    out['flops_exact'] = row['flops_model']
  for k in NUMERIC:
    out[k] = _float(row.get(k))
  ov = row.get('overrides') or {}
  if isinstance(ov, str):
    try:
      ov = json.loads(ov) if ov.strip() else {}
    except json.JSONDecodeError:
      ov = {'_raw': ov}
  out['overrides'] = ov if isinstance(ov, dict) else {'_raw': ov}
  if math.isnan(out['budget']):
    out['budget'] = _budget_from_overrides(out['overrides'])
  out['name'] = str(row.get('name') or os.path.basename(str(row.get('workdir') or '').rstrip('/')) or '?')
  if math.isnan(out['budget']):  # sktlm.sweep.planners.isoflop names runs 'C-<budget>_size-<size>'
    m = re.search(r'(?:^|_)C-([0-9.]+(?:e[+-]?[0-9]+)?)(?:_|$)', out['name'])
    out['budget'] = _float(m.group(1)) if m else math.nan
  out['status'] = (row.get('status') or runfiles.DONE).strip()
  wd = str(row.get('workdir') or '')
  out['workdir'] = os.path.normpath(os.path.join(base_dir, wd)) if wd else ''
  return out


def read_results_csv(path: str) -> list[dict]:
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames  # read while the file is open (None: an empty file)
      rows = list(reader)
  except (OSError, csv.Error, UnicodeDecodeError) as e:
    raise UserError(f'cannot read {path}: {e}') from None
  if fields is None:
    raise UserError(f'{path} is empty (no header): no results to fit')
  base = os.path.dirname(os.path.abspath(path))
  return [_normalise(r, base) for r in rows]


def row_from_workdir(workdir: str) -> dict:
  """One results row from a run's summary.json and config.json (sktlm.run_row: the builder sweep results use
  too), no sweep runner needed. Older summaries are read with sktlm.runfiles' fallbacks."""
  try:
    s = runfiles.load(workdir, runfiles.SUMMARY)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {workdir}/{runfiles.SUMMARY}: {e}') from None
  row = dict(name=os.path.basename(os.path.normpath(workdir)), status=s.get('status', runfiles.DONE),
             workdir=os.path.abspath(workdir), **run_row.from_summary(s))
  if row['n_params_active'] is None:  # summaries written before MoE
    row['n_params_active'] = row['n_params_total']
  try:
    row.update(run_row.from_workdir_config(runfiles.load(workdir, runfiles.CONFIG)))
  except (OSError, json.JSONDecodeError, AttributeError):
    pass
  return _normalise(row, '')


def table_from_workdirs(root: str, max_depth: int = 3) -> list[dict]:
  """Rows for every run workdir (a folder with summary.json) at or below `root`."""
  found = []
  root = os.path.abspath(root)
  for dirpath, dirnames, filenames in os.walk(root):
    depth = dirpath[len(root):].count(os.sep)
    if runfiles.SUMMARY in filenames:
      found.append(dirpath)
      dirnames[:] = []        # a run's own subfolders (checkpoints/) hold no runs
    elif depth >= max_depth:
      dirnames[:] = []
    dirnames.sort()
  return [row_from_workdir(w) for w in sorted(found)]


def load_sweep(path: str, label: str | None = None) -> Sweep:
  """A sweep folder with results.csv, a results.csv file, or a folder of run workdirs."""
  if not os.path.exists(path):
    raise UserError(f'{path}: no such file or directory')
  label = label or os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
  csv_path = path if os.path.isfile(path) else os.path.join(path, 'results.csv')
  if os.path.isfile(csv_path):
    return Sweep(label, path, read_results_csv(csv_path), 'results.csv')
  rows = table_from_workdirs(path)
  if not rows:
    raise UserError(f'{path}: no results.csv and no run workdirs (summary.json) below it')
  return Sweep(label, path, rows, 'workdirs')


def loss_column(loss_key: str) -> str:
  """Row column of a --loss choice; 'eval:NAME' is `sktlm eval`'s record W/evals/NAME.json."""
  return LOSS_COLUMNS.get(loss_key, loss_key)


def _eval_loss(workdir: str, name: str) -> float:
  rec = runfiles.read_eval(workdir, name)
  return _float(rec.get('loss')) if rec is not None else math.nan


def select(sweep: Sweep, n_key: str, loss_key: str, flops_key: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Arrays of the done runs with usable values: name, N, D, C, loss, budget, row index; and warnings."""
  n_col, loss_col, c_col = N_COLUMNS[n_key], loss_column(loss_key), FLOPS_COLUMNS[flops_key]
  if loss_key.startswith('eval:'):  # sktlm eval records beside each run
    for r in sweep.rows:
      r[loss_col] = _eval_loss(r['workdir'], loss_key[5:]) if r['workdir'] else math.nan
  warnings = []
  statuses: dict[str, int] = {}
  keep, bad_vals, c_fallback = [], [], 0
  for i, r in enumerate(sweep.rows):
    if r['status'] != runfiles.DONE:
      statuses[r['status']] = statuses.get(r['status'], 0) + 1
      continue
    n, d, loss, c = r[n_col], r['tokens'], r[loss_col], r[c_col]
    if not (n > 0 and loss > 0 and math.isfinite(loss)):
      bad_vals.append(r['name'])
      continue
    if not c > 0 and flops_key == '6n' and d > 0:
      c = 6.0 * n * d
      c_fallback += 1
    keep.append((i, r['name'], n, d, c, loss, r['budget']))
  if statuses:
    warnings.append(f'{sweep.label}: skipped runs not done: '
                    + ', '.join(f'{v} {k}' for k, v in sorted(statuses.items())))
  if bad_vals:
    warnings.append(f'{sweep.label}: {len(bad_vals)} done run(s) without a usable {n_col} / {loss_col}: '
                    + ', '.join(bad_vals[:5]) + (' ...' if len(bad_vals) > 5 else ''))
  if c_fallback:
    warnings.append(f'{sweep.label}: flops_6n missing for {c_fallback} run(s): used 6 * N * tokens')
  cols = list(zip(*keep, strict=True)) if keep else [[]] * 7
  out = dict(index=np.array(cols[0], dtype=int), name=np.array(cols[1], dtype=object),
             N=np.array(cols[2], dtype=np.float64), D=np.array(cols[3], dtype=np.float64),
             C=np.array(cols[4], dtype=np.float64), loss=np.array(cols[5], dtype=np.float64),
             budget=np.array(cols[6], dtype=np.float64))
  return out, warnings


def read_curves(workdir: str) -> dict[str, dict[str, np.ndarray]] | None:
  """{'train': {step, tokens, flops, flops_6n, lr, loss}, 'eval': {step, tokens, flops, flops_6n, lr, eval_loss}}
  (flops: the exact count) from metrics.jsonl (last record per (kind, step), as a resumed run may repeat
  steps), or None."""
  last = runfiles.last_records(workdir)
  if last is None:
    return None
  out = {}
  for kind, loss_key in (('train', 'loss'), ('eval', 'eval_loss')):
    recs = [last[k] for k in sorted(k for k in last if k[0] == kind)]
    out[kind] = {key: np.array([_float(r.get(key)) for r in recs], dtype=np.float64)
                 for key in ('step', 'tokens', 'flops_6n', 'lr', loss_key)}
    out[kind]['flops'] = np.array([_float(runfiles.record_flops(r)) for r in recs], dtype=np.float64)
  return out

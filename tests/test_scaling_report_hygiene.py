"""Report hygiene (issue 27): the covered column says what the intervals say; a parameter the runs do not pin is
"not identified", not a number; allocations beyond the compute frontier are labelled as extrapolations; no
interval from a fit with fewer than n_params + 2 points; the E sensitivity is the largest move over every
predicted point."""

import csv
import json
import math
import os

import numpy as np
import pytest

from sktlm.scaling import analysis, fit, io, report
from sktlm.scaling.laws import chinchilla


def _table(md: str, header_start: str) -> list[dict]:
  """The rows of the markdown table whose header line starts with `header_start`, as dicts."""
  lines = md.splitlines()
  i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
  cols = [c.strip() for c in lines[i].strip('|').split('|')]
  out = []
  for line in lines[i + 2:]:
    if not line.startswith('|'):
      break
    out.append(dict(zip(cols, (c.strip() for c in line.strip('|').split('|')), strict=True)))
  return out


def test_covered_column_follows_the_intervals(tmp_path):
  """Backtest table: 'NO' where the held-out truth is shifted 3% off the law (its interval misses it); the
  predicted-vs-actual table: the verdicts of fits.json, both kinds present (one size of b shifted by 5%)."""
  from test_scaling_predict import SIZES, write_sweep
  write_sweep(str(tmp_path / 'a'), SIZES, shifts={SIZES[-1]: 0.03})
  big = [SIZES[-1] * 2, SIZES[-1] * 4]
  write_sweep(str(tmp_path / 'b'), big, shifts={big[1]: 0.05}, wobble=False)
  doc = report.run([str(tmp_path / 'a')], str(tmp_path / 'out'),
                   analysis.Options(n_boot=30, curves=False, predict=(str(tmp_path / 'b'),)))
  md = (tmp_path / 'out' / 'report.md').read_text()
  bt = [r for r in _table(md, '| sweep | law | held-out run') if r['law'] == 'L(N,D)']
  assert len(bt) == 3 and all(r['covered'] == 'NO' for r in bt), bt
  pv = [r for r in _table(md, '| law | run | N | D | C | N x') if r['law'] == 'L(N,D)']
  want = {r['run']: r['covered'] for r in doc['sweeps']['a']['predicted']['b'] if r['law'] == 'L(N,D)'}
  assert len(pv) == 6 and {r['run']: r['covered'] == 'yes' for r in pv} == want
  assert {r['covered'] for r in pv} == {'NO', 'yes'}


def _ladder(root, n, loss, d=5.12e5):
  os.makedirs(root)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'status', 'n_params_non_embedding', 'tokens', 'flops_exact',
                                      'best_eval_loss'])
    w.writeheader()
    for i, (ni, li) in enumerate(zip(n, loss, strict=True)):
      w.writerow(dict(name=f's{i}', status='done', n_params_non_embedding=ni, tokens=d, flops_exact=7 * ni * d,
                      best_eval_loss=li))


def test_unidentified_parameters_are_not_reported_as_numbers(tmp_path):
  # The rule: a 95% interval wider than a factor 100, or one that crosses 0.
  assert not fit.identified(2.2, 4.8e167) and not fit.identified(0.019, 31) and not fit.identified(-0.1, 0.3)
  assert fit.identified(35.6, 63.85) and fit.identified(0.8, 0.8) and fit.identified(math.nan, math.nan)
  # L(N) on the default ladder's best losses per size (issue 27: A [2.2, 4.8e167], alpha [0.019, 31]) ...
  n = [1.07e5, 2.4e5, 5.4e5, 1.13e6, 2.16e6]
  _ladder(str(tmp_path / 'default'), n, [1.868, 1.789, 1.7345, 1.7402, 1.7146])
  doc = report.run([str(tmp_path / 'default')], str(tmp_path / 'o1'), analysis.Options(curves=False, backtest=0))
  (row,) = [r for r in _table((tmp_path / 'o1' / 'report.md').read_text(), '| sweep | law |') if r['law'] == 'L(N)']
  assert row['A'].startswith('not identified by these runs [') and row['alpha'].startswith('not identified')
  assert {'A', 'alpha'} <= set(doc['sweeps']['default']['fits']['L(N)']['not_identified'])
  # ... while a law the runs pin is a number with its interval.
  _ladder(str(tmp_path / 'exact'), n, [2.0 + 60 / x ** 0.3 * (1 + 0.002 * (-1) ** i) for i, x in enumerate(n)])
  report.run([str(tmp_path / 'exact')], str(tmp_path / 'o2'), analysis.Options(curves=False, backtest=0))
  (row,) = [r for r in _table((tmp_path / 'o2' / 'report.md').read_text(), '| sweep | law |') if r['law'] == 'L(N)']
  assert 'not identified' not in row['E'] + row['A'] + row['alpha'] and row['alpha'].startswith('0.3')


def test_allocations_beyond_the_frontier_are_labelled(tmp_path):
  """FLOPs per token not proportional to N (the numerical allocation): the line at the frontier's largest C is
  plain, the lines at 10x and 100x it are labelled; so is a --target_flops allocation beyond it."""
  from test_scaling_predict import DS, SIZES, law
  root = tmp_path / 'grid'
  os.makedirs(root)
  with open(root / 'results.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'overrides', 'status', 'n_params_non_embedding', 'tokens',
                                      'flops_exact', 'best_eval_loss', 'parent'])
    w.writeheader()
    for i, n in enumerate(SIZES):  # a WSD ladder: shorter budgets branch from the longest
      for j, d in enumerate(DS):
        w.writerow(dict(name=f'n{i}_d{j}', overrides=json.dumps({'n': i, 'd': j}), status='done',
                        n_params_non_embedding=n, tokens=d, flops_exact=(6 * n + 3e5) * d, best_eval_loss=law(n, d),
                        parent='' if j == len(DS) - 1 else f'n{i}_d{len(DS) - 1}'))
  c_top = (6 * SIZES[-1] + 3e5) * DS[-1]
  report.run([str(root)], str(tmp_path / 'out'), analysis.Options(n_boot=0, curves=False, backtest=0,
                                                                  target_flops=30 * c_top))
  md = (tmp_path / 'out' / 'report.md').read_text()
  lines = [x for x in md.splitlines() if x.startswith('  - C = ')]
  assert len(lines) == 3
  assert 'extrapolation' not in lines[0]
  assert '(10x beyond the largest C on the compute frontier: an extrapolation)' in lines[1]
  assert '(100x beyond the largest C on the compute frontier: an extrapolation)' in lines[2]
  assert 'compute-optimal N at C=' in md and '30x beyond the largest C on the compute frontier' in md


def test_no_interval_from_fewer_than_n_params_plus_two_points(tmp_path):
  from test_scaling_backtest import SIZES, write_ladder
  write_ladder(str(tmp_path / 'five'))   # 5 sizes: the backtest fits L(N) on 4 points for 3 parameters
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'five')), analysis.Options(n_boot=30, curves=False))
  (row,) = [r for r in a.backtest.rows if r['law'] == 'L(N)']
  assert a.backtest.fits['L(N)'].n_points == 4
  assert np.isnan(row['ci']).all() and row['covered'] is None
  assert row['interval_note'] == 'no interval: 4 points for 3 parameters'
  # 5 points for 3 parameters (n_params + 2): an interval.
  import test_scaling_backtest as tb
  tb.SIZES = SIZES + [3e7]
  try:
    tb.write_ladder(str(tmp_path / 'six'))
  finally:
    tb.SIZES = SIZES
  b = analysis.analyze(io.load_sweep(str(tmp_path / 'six')), analysis.Options(n_boot=30, curves=False))
  (row,) = [r for r in b.backtest.rows if r['law'] == 'L(N)']
  assert np.isfinite(row['ci']).all() and row['interval_note'] == ''


def test_e_sensitivity_is_the_largest_move_over_every_held_out_point(tmp_path):
  from test_scaling_predict import DS, LAW, SIZES, write_sweep
  write_sweep(str(tmp_path / 'a'), SIZES)
  e = 1.2 * LAW['E']  # a wrong E: the predictions move with it, by different amounts at different D
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=0, curves=False, fix_E=e))
  (s,) = a.sensitivity['backtest']
  assert s['law'] == 'L(N,D)' and len(s['runs']) == len(DS)
  g = a.agg
  train = a.backtest.train
  held = [list(g['name']).index(r) for r in s['runs']]
  for row in s['rows']:
    # independently: refit on the training points at this E, predict every held-out point
    f = chinchilla.LAW.fit(dict(N=g['N'][train], D=g['D'][train]), g['loss'][train], n_boot=0, fix_E=row['E'])
    f0 = chinchilla.LAW.fit(dict(N=g['N'][train], D=g['D'][train]), g['loss'][train], n_boot=0, fix_E=e)
    moves = [float(f.predict(g['N'][i], g['D'][i]) / f0.predict(g['N'][i], g['D'][i]) - 1) for i in held]
    k = int(np.argmax(np.abs(moves)))
    assert row['max_move'] == pytest.approx(moves[k], rel=1e-6, abs=1e-12)
    assert row['max_move_run'] == s['runs'][k]
  assert any(r['max_move'] != 0 for r in s['rows'])

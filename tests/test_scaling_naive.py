"""Every backtest and --predict row beside predictors that know nothing about scale (sktlm/scaling/naive.py):
copy (the largest fitted size's loss at the nearest token budget) and C-trend (a pure power law in C on the
fitted frontier). On exact data from a law in which N matters, the law wins by far; on exact data in which only
D matters, copying is exact and the report says the ladder is not testing scaling."""

import csv
import json
import os

import numpy as np
import pytest

from sktlm.scaling import analysis, backtest, io, naive, report

SIZES = [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6]
DS = [1e5, 2e5, 4e5]
LAW = dict(E=1.6, A=40.0, alpha=0.35, B=300.0, beta=0.4)


def law(n, d, t=LAW):
  return t['E'] + t['A'] / n ** t['alpha'] + t['B'] / d ** t['beta']


def write_sweep(root, t=LAW):
  """A WSD-like ladder (every size at every D, branches with a parent), exactly on the law `t`."""
  os.makedirs(root)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'overrides', 'status', 'n_params_non_embedding', 'tokens',
                                      'flops_6n', 'flops_exact', 'best_eval_loss', 'parent'])
    w.writeheader()
    for i, n in enumerate(SIZES):
      for j, d in enumerate(DS):
        w.writerow(dict(name=f'n{i}_d{j}', overrides=json.dumps({'n': i, 'd': j}), status='done',
                        n_params_non_embedding=n, tokens=d, flops_6n=6 * n * d, flops_exact=6 * n * d,
                        best_eval_loss=law(n, d, t), parent='' if j == len(DS) - 1 else f'n{i}_d{len(DS) - 1}'))


def test_the_law_beats_knowing_nothing_where_n_matters(tmp_path):
  write_sweep(str(tmp_path / 'a'))
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=0, curves=False))
  rows = [r for r in a.backtest.rows if r['law'] == 'L(N,D)']
  assert len(rows) == len(DS)
  for r in rows:
    # copy: the largest fitted size (SIZES[-2]) at the same token budget, exactly
    assert r['copy'] == pytest.approx(law(SIZES[-2], r['D']), rel=1e-12)
    assert r['copy_run'] == f'n{len(SIZES) - 2}_d{DS.index(r["D"])}'
    assert r['copy_error'] == pytest.approx(r['copy'] / r['actual'] - 1, rel=1e-12) and r['copy_error'] > 0.01
    assert abs(r['rel_error']) < 1e-4                                   # the law: to fit precision
    nv = a.backtest.naive
    assert r['ctrend'] == pytest.approx(nv.k / r['C'] ** nv.a, rel=1e-12)
  text, beats = naive.verdict(rows)
  assert beats and 'not testing scaling' not in text
  lines = backtest.headline('a', a.backtest)
  (line,) = [x for x in lines if x.startswith('backtest a: L(N,D) against knowing nothing')]
  worst_copy = max(abs(r['copy_error']) for r in rows)
  assert f'worst copy error +{100 * worst_copy:.2f}%' in line and 'the law beats the copy by' in line


def test_where_only_d_matters_copying_is_exact_and_the_report_says_so(tmp_path):
  flat = dict(LAW, A=0.0)      # no N term: the loss is set by D alone
  write_sweep(str(tmp_path / 'flat'), t=flat)
  out = tmp_path / 'report'
  doc = report.run([str(tmp_path / 'flat')], str(out), analysis.Options(n_boot=0, curves=False))
  rows = [r for r in doc['sweeps']['flat']['backtest']['rows'] if r['law'] == 'L(N,D)']
  assert rows and all(r['copy_error'] == 0.0 for r in rows)            # the copy is exact
  text, beats = naive.verdict(rows)
  assert not beats and 'not testing scaling' in text
  assert any('L(N,D) against knowing nothing' in x and 'The ladder is not testing scaling' in x
             for x in doc['backtest_summary'])
  md = (out / 'report.md').read_text()
  assert '| copy (error) | C-trend (error) |' in md and 'The ladder is not testing scaling' in md


def test_c_trend_is_a_pure_power_law_on_the_frontier():
  """Frontier points exactly on L = 9 / C^0.06, and dominated points (more compute, higher loss) that a fit on
  every point would follow: the C-trend ignores them and extrapolates the frontier exactly."""
  c = np.logspace(12, 15, 7)
  frontier = 9.0 / c ** 0.06
  dominated_c = c[1:] * 1.5
  dominated = frontier[:-1] * 1.2
  k, a = naive.fit_ctrend(np.concatenate([c, dominated_c]), np.concatenate([frontier, dominated]))
  assert k == pytest.approx(9.0, rel=1e-6) and a == pytest.approx(0.06, rel=1e-6)
  assert np.isnan(naive.fit_ctrend(c[:1], frontier[:1])).all()  # it needs 2 frontier points

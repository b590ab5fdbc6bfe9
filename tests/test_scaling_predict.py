"""Backtests and --predict on synthetic sweeps whose held-out truth differs from the law by a known amount,
and seed aggregation through both input paths (results.csv and folders of run workdirs).

The training points lie on L(N, D) = E + A/N^alpha + B/D^beta (plus a small deterministic wobble, so that
bootstrap intervals have a width); the held-out points are the law times (1 + shift). A correct backtest then
reports rel_error = 1 / (1 + shift) - 1 (predicted / actual - 1): a flipped sign, the inverted ratio
(actual / predicted - 1 = shift) or a constant 0 all miss that by more than the tolerance, and the interval
(narrow around the law) must not cover a 3% shift but must cover an unshifted point.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sktlm.scaling import analysis, io

LAW = dict(E=1.6, A=40.0, alpha=0.35, B=300.0, beta=0.4)
SIZES = [1e5, 2e5, 4e5, 8e5, 1.6e6, 3.2e6]
DS = [1e5, 2e5, 4e5]
WOBBLE = (0.001, -0.001, 0.0005)   # relative, per D: deterministic "noise" for finite bootstrap intervals


def law(n, d):
  return LAW['E'] + LAW['A'] / n ** LAW['alpha'] + LAW['B'] / d ** LAW['beta']


def write_sweep(root, sizes, shifts=None, wobble=True, seeds=(0,), seed_sd=0.0):
  """results.csv of a WSD-like ladder: every size at every D; `shifts` {size: relative shift of its truth}."""
  os.makedirs(root)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'overrides', 'status', 'n_params_non_embedding', 'tokens',
                                      'flops_6n', 'flops_exact', 'best_eval_loss', 'parent'])
    w.writeheader()
    for i, n in enumerate(sizes):
      for j, d in enumerate(DS):
        for s in seeds:
          loss = law(n, d) * (1 + (shifts or {}).get(n, 0.0)) * (1 + (WOBBLE[j] * (-1) ** i if wobble else 0))
          loss += seed_sd * (s - np.mean(seeds))
          ov = {'arg.width': int(n), 'config.train.steps': int(d)}
          if len(seeds) > 1:
            ov['config.seed'] = s
          w.writerow(dict(name=f'n{i}_d{j}_s{s}', overrides=json.dumps(ov), status='done', n_params_non_embedding=n,
                          tokens=d, flops_6n=6 * n * d, flops_exact=6.5 * n * d, best_eval_loss=loss,
                          parent='' if j == len(DS) - 1 else f'n{i}_d{len(DS) - 1}_s{s}'))


def nd_rows(a):
  return [r for r in a.backtest.rows if r['law'] == 'L(N,D)']


def test_backtest_error_sign_ratio_and_coverage(tmp_path):
  shift = 0.03
  write_sweep(str(tmp_path / 'a'), SIZES, shifts={SIZES[-1]: shift})
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=40, curves=False))
  assert a.backtest.unit == 'size' and a.backtest.held_out == [SIZES[-1]]
  rows = nd_rows(a)
  assert len(rows) == len(DS)                      # every token budget of the held-out size
  for r in rows:
    truth = law(r['N'], r['D'])                    # what a law fitted on the rest predicts (to the wobble)
    assert r['predicted'] == pytest.approx(truth, rel=2e-3)
    expected = r['predicted'] / r['actual'] - 1    # the definition: predicted / actual - 1
    assert r['rel_error'] == pytest.approx(expected, abs=1e-12)
    # ~ -2.9%: negative (the law under-predicts a point shifted up) and not the inverted ratio (+3.0%)
    assert r['rel_error'] == pytest.approx(1 / (1 + shift) - 1, abs=3e-3)
    assert r['rel_error'] < -0.02
    assert r['covered'] is False and not r['ci'][0] <= r['actual'] <= r['ci'][1]
    assert r['ci'][1] - r['ci'][0] < 0.02 * r['actual']  # a real interval, not everything


def test_backtest_interval_covers_an_unshifted_point(tmp_path):
  write_sweep(str(tmp_path / 'a'), SIZES)
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=40, curves=False))
  for r in nd_rows(a):
    assert abs(r['rel_error']) < 3e-3
    assert r['covered'] is True and r['ci'][0] <= r['actual'] <= r['ci'][1]


def test_backtest_k2_predicts_both_held_out_sizes(tmp_path):
  shifts = {SIZES[-2]: 0.02, SIZES[-1]: -0.04}
  write_sweep(str(tmp_path / 'a'), SIZES, shifts=shifts)
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=0, curves=False, backtest=2))
  bt = a.backtest
  assert bt.k == 2 and bt.held_out == SIZES[-2:]
  assert a.backtest.fits['L(N,D)'].n_points == 4 * len(DS)
  rows = nd_rows(a)
  assert sorted({r['N'] for r in rows}) == SIZES[-2:] and len(rows) == 2 * len(DS)
  for r in rows:
    assert r['rel_error'] == pytest.approx(1 / (1 + shifts[r['N']]) - 1, abs=3e-3)


def test_fix_e_holds_the_asymptote_and_reports_sensitivity(tmp_path):
  write_sweep(str(tmp_path / 'a'), SIZES, wobble=False)
  opts = analysis.Options(n_boot=10, curves=False, fix_E=LAW['E'])
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), opts)
  f = a.fits['L(N,D)']
  assert f.values['E'] == LAW['E'] and np.all(f.boot[:, 0] == LAW['E'])
  for k in ('A', 'B', 'alpha', 'beta'):
    assert f.values[k] == pytest.approx(LAW[k], rel=1e-4), k
  (s,) = a.sensitivity['backtest']
  assert s['law'] == 'L(N,D)'
  sens = s['rows']
  assert [s['E'] for s in sens] == pytest.approx([0.75 * LAW['E'], LAW['E'], 1.25 * LAW['E']])
  assert sens[1]['objective'] < min(sens[0]['objective'], sens[2]['objective'])  # the true E fits best
  assert len({round(s['predicted'][-1], 6) for s in sens}) == 3                   # and the predictions move
  assert sens[1]['max_move'] == 0 and sens[0]['max_move'] != 0 and sens[2]['max_move'] != 0
  # A wrong fixed E degrades the fit: the free-E L(N,D) objective is ~0, E fixed 10% off is not.
  b = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=0, curves=False,
                                                                             fix_E=1.1 * LAW['E']))
  assert b.fits['L(N,D)'].objective > 100 * f.objective + 1e-8


def test_cli_predict_another_sweep(tmp_path):
  """`sktlm scaling A --predict=B --fix_E=E`: B's sizes lie 2x-8x beyond A's; one is shifted by +5%."""
  write_sweep(str(tmp_path / 'a'), SIZES[:4])
  big = [SIZES[3] * 2, SIZES[3] * 8]
  write_sweep(str(tmp_path / 'b'), big, shifts={big[1]: 0.05}, wobble=False)
  out = tmp_path / 'report'
  r = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', str(tmp_path / 'a'), f'--predict={tmp_path / "b"}',
                      f'--out={out}', '--bootstrap=30', '--backtest=0', f'--fix_E={LAW["E"]}',
                      '--fix_E_why=the law the sweeps were drawn from'], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  doc = json.loads((out / 'fits.json').read_text())
  rows = [x for x in doc['sweeps']['a']['predicted']['b'] if x['law'] == 'L(N,D)']
  assert len(rows) == 2 * len(DS)
  for x in rows:
    assert x['n_factor'] == pytest.approx(x['N'] / SIZES[3])
    assert x['c_factor'] == pytest.approx(x['N'] * x['D'] / (SIZES[3] * DS[-1]))
    shift = 0.05 if x['N'] == big[1] else 0.0
    assert x['rel_error'] == pytest.approx(1 / (1 + shift) - 1, abs=3e-3)
    assert x['covered'] is (shift == 0)
    # beside knowing nothing: a's largest size (SIZES[3], wobbled by -WOBBLE) at the same token budget
    assert x['copy'] == pytest.approx(law(SIZES[3], x['D']) * (1 - WOBBLE[DS.index(x['D'])]), rel=1e-12)
    assert np.isfinite(x['ctrend'])
  assert doc['sweeps']['a']['e_sensitivity']['b'][0]['rows'][1]['E'] == LAW['E']
  assert any(line.startswith('predict b from a: L(N,D) worst error -4.') for line in r.stdout.splitlines()), r.stdout
  assert any(line.startswith('predict b from a: L(N,D) against knowing nothing: worst law error -4.')
             for line in r.stdout.splitlines()), r.stdout
  md = (out / 'report.md').read_text()
  assert '## Predicted versus actual' in md and 'E is fixed at 1.6' in md and 'E sensitivity (a' in md
  assert 'Why this value: the law the sweeps were drawn from' in md
  assert (out / 'predicted_vs_actual.png').exists()
  bad = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', str(tmp_path / 'a'), f'--out={out}',
                        '--fix_E=-1'], capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and '--fix_E must be > 0' in bad.stderr and 'Traceback' not in bad.stderr
  why = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', str(tmp_path / 'a'), f'--out={out}',
                        '--fix_E_why=because'], capture_output=True, text=True, timeout=600)
  assert why.returncode == 2 and '--fix_E_why needs --fix_E' in why.stderr and 'Traceback' not in why.stderr


# ----------------------------------------------------------------------------- seeds through every input path

def write_workdirs(root, seeds=(0, 1, 2), offsets=(-0.02, 0.0, 0.02)):
  """Run workdirs as `sktlm train` writes them (summary.json + config.json), 3 seeds x 5 sizes x 2 budgets;
  the seed mean of each configuration lies on the law."""
  for i, n in enumerate(SIZES[:5]):
    for j, d in enumerate(DS[1:]):
      for s, off in zip(seeds, offsets, strict=True):
        wd = os.path.join(root, f'size-{i}_steps-{j}_seed-{s}')
        os.makedirs(wd)
        summary = dict(status='done', tokens=d, best_eval_loss=law(n, d) + off, final_eval_loss=law(n, d) + off,
                       params=dict(total=n * 1.2, non_embedding=n, active=n * 1.2),
                       flops={'6N': 6 * n * d, 'model': 6.5 * n * d, 'exact': 6.5 * n * d})
        config = dict(seed=s, model=dict(size='pico', d_model=64 * (i + 1)),
                      train=dict(steps=int(d // 1000), batch_size=8,
                                 init_from=os.path.join(root, f'size-{i}_steps-1_seed-{s}') if j == 0 else ''),
                      data=dict(seq_len=128))
        with open(os.path.join(wd, 'summary.json'), 'w') as f:
          json.dump(summary, f)
        with open(os.path.join(wd, 'config.json'), 'w') as f:
          json.dump(config, f)


def test_seeds_of_run_workdirs_are_one_configuration(tmp_path):
  write_workdirs(str(tmp_path / 'runs'))
  sweep = io.load_sweep(str(tmp_path / 'runs'))
  assert sweep.source == 'workdirs' and len(sweep.rows) == 30
  a = analysis.analyze(sweep, analysis.Options(n_boot=0, curves=False))
  g = a.agg
  assert len(g['loss']) == 10 and np.all(g['n_seeds'] == 3)     # 5 sizes x 2 budgets, 3 seeds each
  np.testing.assert_allclose(g['loss'], law(g['N'], g['D']), rtol=1e-12)  # the seed means
  np.testing.assert_allclose(g['loss_std'], 0.02, rtol=1e-9)
  assert a.fits['L(N)'].n_points == 5
  assert a.backtest.unit == 'size'
  for r in a.backtest.rows:
    assert r['n_seeds'] == 3 and r['actual'] == pytest.approx(law(r['N'], r['D']), rel=1e-12)


def test_seeds_of_results_csv_are_one_configuration(tmp_path):
  write_sweep(str(tmp_path / 'a'), SIZES, wobble=False, seeds=(0, 1, 2), seed_sd=0.02)
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'a')), analysis.Options(n_boot=0, curves=False))
  g = a.agg
  assert len(g['loss']) == len(SIZES) * len(DS) and np.all(g['n_seeds'] == 3)
  np.testing.assert_allclose(g['loss'], law(g['N'], g['D']), rtol=1e-12)
  np.testing.assert_allclose(g['loss_std'], 0.02, rtol=1e-9)

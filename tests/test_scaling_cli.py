"""End to end: `sktlm scaling` on synthetic sweep folders (results.csv + metrics.jsonl), as a subprocess.

Losses follow a known law, so the report's fitted numbers can be checked, not just its existence.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The law the synthetic runs follow (non-embedding N), Chinchilla-like exponents.
TRUE = dict(E=1.7, A=300.0, B=900.0, alpha=0.34, beta=0.30)
COLUMNS = ['name', 'overrides', 'status', 'n_params_total', 'n_params_non_embedding', 'n_params_active', 'tokens',
           'flops_6n', 'flops_exact', 'final_train_loss', 'final_eval_loss', 'best_eval_loss', 'wall_time_s',
           'tokens_per_s', 'mfu', 'workdir']


def law(n, d, t=TRUE):
  return t['E'] + t['A'] / n ** t['alpha'] + t['B'] / d ** t['beta']


def write_sweep(root, budgets=(1e15, 4e15, 1.6e16), sizes=(2e5, 6e5, 2e6, 6e6, 2e7), t=TRUE, extra_rows=(),
                curves=True):
  """An IsoFLOP sweep: every size at every budget (D = C / 6N); losses exactly on the law."""
  os.makedirs(root, exist_ok=True)
  rows = []
  for c in budgets:
    for n in sizes:
      d = c / (6 * n)
      name = f'n{n:.0e}_c{c:.0e}'
      loss = law(n, d, t)
      wd = os.path.join('runs', name)
      if curves:
        os.makedirs(os.path.join(root, wd), exist_ok=True)
        with open(os.path.join(root, wd, 'metrics.jsonl'), 'w') as f:
          for k in range(1, 11):  # a curve ending at the final loss; one repeated step (a resume)
            tok = d * k / 10
            rec = dict(kind='train', step=k * 10, tokens=tok, flops=6 * n * tok * 1.1, flops_6n=6 * n * tok,
                       loss=law(n, tok, t) + 0.01)
            f.write(json.dumps(rec) + '\n')
            if k % 5 == 0:
              f.write(json.dumps(dict(kind='eval', step=k * 10, tokens=tok, flops=6 * n * tok * 1.1,
                                      flops_6n=6 * n * tok, eval_loss=law(n, tok, t))) + '\n')
          f.write(json.dumps(dict(kind='train', step=100, tokens=d, flops=6.6 * n * d, flops_6n=6 * n * d,
                                  loss=loss + 0.01)) + '\n')
      rows.append(dict(name=name, overrides=json.dumps({'arg.size': name}), status='done', n_params_total=n * 1.3,
                       n_params_non_embedding=n, n_params_active=n * 1.3, tokens=d, flops_6n=c, flops_exact=c * 1.1,
                       final_train_loss=loss + 0.01, final_eval_loss=loss, best_eval_loss=loss, wall_time_s=10,
                       tokens_per_s=d / 10, mfu=0.3, workdir=wd))
  rows += list(extra_rows)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow(r)
  return rows


def sktlm(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', *args], capture_output=True, text=True,
                        timeout=timeout)


def _fits(out):
  with open(os.path.join(out, 'fits.json')) as f:
    return json.load(f)


def test_cli_end_to_end_report_plots_and_fitted_numbers(tmp_path):
  sweep = tmp_path / 'isoflop'
  write_sweep(str(sweep), extra_rows=[dict(name='crashed', status='failed', workdir='runs/crashed')])
  out = tmp_path / 'report'
  r = sktlm(str(sweep), f'--out={out}', '--bootstrap=20', '--target_params=1e9', '--target_tokens=2e10')
  assert r.returncode == 0, r.stderr
  assert 'skipped runs not done: 1 failed' in r.stderr
  for name in ('curves_tokens', 'curves_flops', 'loss_vs_n', 'frontier', 'isoflop', 'residuals'):
    png = (out / f'{name}.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000, name
    assert (out / f'{name}.svg').read_text().lstrip().startswith('<?xml')
  md = (out / 'report.md').read_text()
  for section in ('## Warnings', '## Fits', '## Compute-optimal allocation', '## Predictions', '## Runs',
                  '![isoflop](isoflop.png)', '| crashed | failed |'):
    assert section in md, section
  doc = _fits(out)
  assert doc['settings']['n'] == 'non_embedding' and doc['settings']['flops'] == 'exact'
  sw = doc['sweeps']['isoflop']
  assert sw['n_runs'] == 16 and sw['n_used'] == 15
  p = sw['fits']['L(N,D)']
  for name, v in TRUE.items():
    assert p['values'][name] == pytest.approx(v, rel=1e-3), name
  # Approach 2 on law-generated runs (C is the exact count = 1.1 x 6ND here) ~ Approach 3's exponent.
  assert sw['fits']['isoflop']['a'] == pytest.approx(TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']), abs=0.03)
  pred = {q['what']: q['value'] for q in sw['predictions']}
  key = 'loss at N=1e+09, D=2e+10 (L(N,D))'  # the report's wording
  assert pred[key] == pytest.approx(law(1e9, 2e10), rel=1e-4)


def test_cli_compares_two_sweeps(tmp_path):
  other = dict(TRUE, A=500.0, alpha=0.30)
  write_sweep(str(tmp_path / 'a'), curves=False)
  write_sweep(str(tmp_path / 'b'), t=other, sizes=(3e5, 1e6, 3e6, 1e7), curves=True)
  out = tmp_path / 'cmp'
  # --sweep_dir here, positional folders in the test above: both spellings work
  r = sktlm(f"--sweep_dir={tmp_path / 'a'}", f"--sweep_dir={tmp_path / 'b'}", f'--out={out}', '--bootstrap=0',
            '--labels=dense,moe',
            '--n=total', '--flops=6N', '--target_flops=1e19')
  assert r.returncode == 0, r.stderr
  doc = _fits(out)
  assert set(doc['sweeps']) == {'dense', 'moe'}
  # --n=total: N is 1.3 x the non-embedding count the law was written in, so A scales by 1.3^alpha.
  assert doc['sweeps']['dense']['fits']['L(N,D)']['values']['A'] == pytest.approx(TRUE['A'] * 1.3 ** 0.34,
                                                                                   rel=1e-3)
  assert doc['sweeps']['moe']['fits']['L(N,D)']['values']['alpha'] == pytest.approx(0.30, rel=1e-3)
  md = (out / 'report.md').read_text()
  assert '| dense | L(N,D)' in md and '| moe | L(N,D)' in md and '### moe' in md
  assert (out / 'loss_vs_n.png').exists() and (out / 'curves_tokens.png').exists()


def _workdir(root, name, n, tokens, loss):
  wd = os.path.join(root, name)
  os.makedirs(wd)
  summary = dict(status='done', step=100, steps=100, tokens=tokens, final_train_loss=loss + 0.02,
                 final_eval_loss=loss + 0.01, best_eval_loss=loss, wall_time_s=5.0, tokens_per_s=tokens / 5,
                 mfu=0.2, params=dict(total=n + 1000, embedding=500, head=500, non_embedding=n, active=n + 1000,
                                      active_non_embedding=n),
                 flops_per_token={'6N': 6 * n, 'exact': 7 * n}, flops={'6N': 6 * n * tokens, 'exact': 7 * n * tokens})
  with open(os.path.join(wd, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump({'model': {'size': name}}, f)


def test_run_workdirs_without_results_csv(tmp_path):
  from sktlm.scaling import analysis, io, report
  root = tmp_path / 'ladder'
  sizes = [1e5, 3e5, 1e6, 3e6, 1e7]
  for i, n in enumerate(sizes):
    _workdir(str(root), f'size{i}', n, 1e8, 2.0 + 50 / n ** 0.3)
  sweep = io.load_sweep(str(root))
  assert sweep.source == 'workdirs' and [r['name'] for r in sweep.rows] == [f'size{i}' for i in range(5)]
  assert sweep.rows[2]['n_params_non_embedding'] == 1e6 and sweep.rows[2]['flops_exact'] == 7e6 * 1e8
  assert sweep.rows[2]['size'] == 'size2' and set(sweep.rows[2]['overrides']) == {'config_id'}  # sktlm.run_row
  opts = analysis.Options(n_boot=10)
  doc = report.run([str(root)], str(tmp_path / 'out'), opts)
  fits = doc['sweeps']['ladder']['fits']
  assert fits['L(N)']['values']['alpha'] == pytest.approx(0.3, rel=1e-4)
  assert fits['L(N,D)'] is None  # one token budget: D does not vary
  assert any('L(N,D) not fitted' in w and 'vary both N and D' in w for w in doc['warnings'])
  assert 'isoflop' not in fits  # a size ladder is not an IsoFLOP sweep: not attempted, no noise


def test_loader_tolerates_missing_optional_columns(tmp_path):
  from sktlm.scaling import io
  path = tmp_path / 'results.csv'
  path.write_text('name,status,n_params_non_embedding,tokens,best_eval_loss\n'
                  'a,done,1e6,1e9,3.0\nb,done,3e6,1e9,2.8\nc,diverged,1e7,1e9,nan\nd,done,1e7,1e9,\n')
  sweep = io.load_sweep(str(path))
  data, warnings = io.select(sweep, 'non_embedding', 'best_eval', '6n')
  assert list(data['name']) == ['a', 'b']
  np.testing.assert_allclose(data['C'], [6e15, 1.8e16])  # 6 N D fallback
  text = ' '.join(warnings)
  assert sweep.rows[0]['budget'] != sweep.rows[0]['budget']  # nan: no budget declared
  assert '1 diverged' in text and 'without a usable' in text and 'd' in text and '6 * N * tokens' in text


def test_cli_user_errors_are_one_line(tmp_path):
  bad = tmp_path / 'two_sizes'
  bad.mkdir()
  (bad / 'results.csv').write_text('name,status,n_params_non_embedding,tokens,best_eval_loss,flops_exact\n'
                                   'a,done,1e6,1e9,3.0,1e16\nb,done,3e6,1e9,2.8,3e16\n')
  cases = [
      ([f'--out={tmp_path}/o'], 'give at least one sweep directory'),
      ([str(tmp_path / 'missing'), f'--out={tmp_path}/o'], 'no such file or directory'),
      ([str(bad)], '--out=<folder> is required'),
      ([str(bad), f'--out={tmp_path}/o', '--n=embedding'], 'non_embedding'),
      ([str(bad), f'--out={tmp_path}/o', '--target_tokens=1e9'], 'needs --target_params'),
      ([str(bad), f'--out={tmp_path}/o'], 'no scaling law could be fitted'),
  ]
  for args, msg in cases:
    r = sktlm(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert msg in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_scaling_never_imports_jax():
  code = ('import sys; import sktlm.commands.scaling; from sktlm.scaling import report, plots, fit, io; '
          'bad = [m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax", "optax"))]; '
          'assert not bad, bad')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr


def test_isoflop_budget_from_planner_run_names(tmp_path):
  """sktlm.sweep.planners.isoflop names runs 'C-<budget>_size-<size>': those group runs into budgets."""
  from sktlm.scaling import io
  path = tmp_path / 'results.csv'
  path.write_text('name,status,n_params_non_embedding,tokens,best_eval_loss,flops_exact,overrides\n'
                  'C-1e+18_size-pico,done,1e6,1e9,3.0,1.3e18,"{""arg.size"": ""pico""}"\n'
                  'C-3.16e+17_size-nano,done,3e6,1e9,2.8,3e17,\n'
                  'x,done,3e6,1e9,2.8,3e17,"{""arg.budget"": 2e17}"\n'
                  'size-tiny,done,3e6,1e9,2.8,3e17,\n')
  rows = io.load_sweep(str(path)).rows
  assert [r['budget'] for r in rows[:3]] == [1e18, 3.16e17, 2e17]
  assert rows[0]['overrides'] == {'arg.size': 'pico'} and np.isnan(rows[3]['budget'])

"""The MoE report section on a synthetic sweep drawn from a known law: the compute multiplier against its
closed form, the backtest, the target prediction and the section's files."""

import math
import os

import numpy as np
import pytest

from sktlm.scaling import analysis, io, moe_report
from sktlm.scaling import moe_laws as ml

TRUE = dict(a=30.0, delta=-0.25, alpha=-0.2, gamma=0.012, c=1.2)
R = 2.0          # tokens per active parameter of the ladder
K = 7.0          # C = K N D: a FLOP convention with FLOPs per token proportional to N


def _rows(noise=0.002, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for size, n in (('s1', 1e5), ('s2', 3e5), ('s3', 1e6), ('s4', 3e6)):
    for e in (1, 4, 8, 16):
      loss = ml.joint_line_loss(TRUE, n, e) * math.exp(rng.normal(0, noise))
      rows.append(dict(name=f'size-{size}_E-{e}', status='done', size=size, moe_experts=e, moe_top_k=1,
                       moe_granularity=1.0, moe_shared_experts=0, moe_dropped_frac=0.0 if e > 1 else None,
                       n_params_active_non_embedding=n, n_params_non_embedding=n * (1 + 0.6 * (e - 1)),
                       tokens=R * n, flops_exact=K * n * R * n, best_eval_loss=loss, overrides={}, workdir=''))
  return io.Sweep('synthetic', '/nowhere', rows, 'results.csv')


def _analyses(sweep, opts):
  """What a report section receives: the analyses of its sweeps (the MoE section reads only their runs)."""
  return [analysis.SweepAnalysis(label=sweep.label, opts=opts, sweep=sweep, data={})]


def _closed_form_multiplier(p, n, e):
  """Equal loss under the merged law: a Ê1^d N'^(al + g lnÊ1) = a Ê^d N^(al + g lnÊ), c cancels; C = K R N^2."""
  l1, le = math.log(ml.effective_experts(1.0)), math.log(ml.effective_experts(float(e)))
  ln_np = (p['delta'] * (le - l1) + (p['alpha'] + p['gamma'] * le) * math.log(n)) / (p['alpha'] + p['gamma'] * l1)
  return math.exp(2 * ln_np) / n ** 2


def test_dense_equivalent_matches_closed_form():
  law = ml.joint_line_law()
  theta = law.theta(TRUE)
  for n, e in ((1e5, 4), (3e6, 16)):
    n_eq = moe_report.dense_equivalent_n(law, theta, n, R * n, e)
    assert (n_eq / n) ** 2 == pytest.approx(_closed_form_multiplier(TRUE, n, e), rel=1e-8)


def test_section_recovers_multiplier_backtest_and_target(tmp_path):
  res = moe_report.analyse(_rows(), 'best_eval_loss', 'flops_exact', n_boot=16, seed=0, delta=1e-3,
                           target='experiments/flagship.py', flops_key='exact')
  assert res['fit']['kind'] == 'joint_line'
  for m in res['multipliers']:
    want = _closed_form_multiplier(TRUE, m['N_act'], m['X'])
    assert m['multiplier'] == pytest.approx(want, rel=0.15), m   # loss noise 0.2% moves C at equal loss ~10%
    assert m['ci'][0] < m['ci'][1]
    assert m['multiplier'] > 1.5   # the drawn law: routing saves compute, more with more experts
  by_x = res['multiplier_by_X']
  assert by_x[4] < by_x[8] < by_x[16]
  bt = res['backtest']
  assert bt['size'] == 's4' and len(bt['rows']) == 4 and bt['n_train'] == 12
  assert max(abs(r['rel_error']) for r in bt['rows']) < 0.01
  t = res['target']
  assert (t['experts'], t['top_k'], t['X']) == (192, 8, 24.0)
  assert t['loss'] == pytest.approx(float(res['_fit'].predict(dict(N=t['N_act'], E=24.0))[0]), rel=1e-12)
  assert t['extrapolation_C'] == pytest.approx(t['C'] / (K * R * 3e6 ** 2), rel=1e-12)
  assert t['at_sweep_ratio']   # the merged law predicts along the ladder's D/N, and says so
  opts = analysis.Options(n_boot=4, seed=0, moe_target='experiments/flagship.py')
  md = moe_report.render_section(moe_report.analyse_section(_analyses(_rows(), opts), opts), str(tmp_path))
  text = '\n'.join(md)
  assert '## Mixture of experts' in text and 'Extrapolation' in text and 'Backtest' in text
  assert os.path.exists(tmp_path / 'moe.json') and os.path.exists(tmp_path / 'moe_multiplier_0.png')


def test_no_section_without_dense_and_moe_runs():
  s = _rows()
  s.rows = [r for r in s.rows if r['moe_experts'] == 1]
  opts = analysis.Options(n_boot=0)
  assert moe_report.analyse_section(_analyses(s, opts), opts) is None

"""One FLOP convention end to end: synthetic runs on the real size ladder (sktlm.config.sizes shapes, FLOPs per
token from sktlm.config.accounting), losses from a known L(N, D), analysed under --flops=exact and --flops=6n.

The reference allocation is computed here independently: scipy's bounded scalar minimiser along
D = C / f(N), with f interpolated by numpy from the shapes' FLOPs per token.
"""

import csv
import json

import numpy as np
import pytest
from scipy import optimize

from sktlm.config import accounting, schema
from sktlm.scaling import analysis, compute, io, report
from sktlm.scaling.laws import chinchilla

TRUE = dict(E=1.8, A=350.0, B=1100.0, alpha=0.33, beta=0.31)
SIZES = ['pico', 'nano', 'micro', 'mini', 'tiny', 'small']
T, V = 128, 384


def law(n, d, t=TRUE):
  return t['E'] + t['A'] / n ** t['alpha'] + t['B'] / d ** t['beta']


def shapes():
  """(non-embedding N, {'exact': FLOPs/token, '6N': ...}) per ladder size."""
  out = []
  for s in SIZES:
    mc = schema.get_config(s).model
    mc.vocab_size = V
    out.append((accounting.param_counts(mc)['non_embedding'], accounting.flops_per_token(mc, T)))
  return out


def write_sweep(root, tokens_per_param=(4.0, 10.0, 25.0)):
  root.mkdir()
  with open(root / 'results.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'overrides', 'status', 'n_params_non_embedding', 'n_params_total',
                                      'n_params_active', 'tokens', 'flops_6n', 'flops_exact', 'best_eval_loss'])
    w.writeheader()
    for s, (n, fpt) in zip(SIZES, shapes(), strict=True):
      for r in tokens_per_param:
        d = r * n
        w.writerow(dict(name=f'size-{s}_r-{r}', overrides=json.dumps({'arg.size': s, 'arg.r': r}), status='done',
                        n_params_non_embedding=n, n_params_total=n + 2 * V * 64, n_params_active=n + 2 * V * 64,
                        tokens=d, flops_6n=fpt['6N'] * d, flops_exact=fpt['exact'] * d, best_eval_loss=law(n, d)))


def reference_f(convention):
  key = {'exact': 'exact', '6n': '6N'}[convention]
  ln_n = np.log([n for n, _ in shapes()])
  ln_f = np.log([f[key] for _, f in shapes()])
  return lambda n: np.exp(np.interp(np.log(n), ln_n, ln_f))


def reference_optimum(values, c, f):
  res = optimize.minimize_scalar(lambda u: law(np.exp(u), c / f(np.exp(u)), values),
                                 bounds=(np.log(shapes()[0][0]), np.log(shapes()[-1][0])), method='bounded',
                                 options=dict(xatol=1e-12))
  return np.exp(res.x)


def _analyse(tmp_path, convention, write=False, **targets):
  """(fits.json's sweep entry, L(N,D) predictions by quantity, fits.json); report.md and plots if `write`."""
  opts = analysis.Options(flops_key=convention, n_boot=0, curves=False, backtest=0, **targets)
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'ladder')), opts)
  doc = report.write(str(tmp_path / f'out-{convention}'), [a], opts) if write else report.document([a], opts)
  sw = doc['sweeps']['ladder']
  return sw, {p['quantity']: p for p in sw['predictions'] if p['law'] == 'L(N,D)'}, doc


def test_exact_convention_allocation_is_consistent_with_c(tmp_path):
  write_sweep(tmp_path / 'ladder')
  c = 3e14  # a budget whose optimum lies inside the ladder (between micro and small)
  sw, pred, doc = _analyse(tmp_path, 'exact', write=True, target_flops=c)
  fitted = sw['fits']['L(N,D)']['values']
  for k, v in TRUE.items():
    assert fitted[k] == pytest.approx(v, rel=1e-3), k
  n_opt, d_opt, l_opt = (pred[f'compute-optimal {q}']['value'] for q in ('N', 'D', 'loss'))
  f = reference_f('exact')
  assert shapes()[0][0] < n_opt < shapes()[-1][0]
  assert d_opt * f(n_opt) == pytest.approx(c, rel=1e-6)            # D_opt spends exactly C
  assert l_opt == pytest.approx(law(n_opt, d_opt, fitted), rel=1e-6)  # L_opt is the law there
  assert n_opt == pytest.approx(reference_optimum(fitted, c, f), rel=1e-6)  # and it is the minimum
  # Negative control: the old 6ND allocation on the same exact C is far off at these sizes.
  assert abs(c / (6 * n_opt) / d_opt - 1) > 0.1
  n6, _, _ = chinchilla.LAW.optimal(fitted, c)
  assert abs(n6 / n_opt - 1) > 0.05
  # The report states its convention once, at the top.
  md = (tmp_path / 'out-exact' / 'report.md').read_text()
  assert md.count('FLOP convention:') == 1 and 'model FLOPs (PaLM)' in md
  assert doc['settings']['flops'] == 'exact' and sw['flops_per_token']['convention'] == 'exact'


def test_conventions_cannot_mix(tmp_path):
  """The same runs under exact and 6n: a target config's budget differs by exactly f_exact / f_6n of its shape;
  the L(N, D) law (no C in it) is identical; each allocation spends its own convention's C."""
  write_sweep(tmp_path / 'ladder')
  n_t, fpt_t = shapes()[2]  # micro
  d_t = 50 * n_t
  res = {conv: _analyse(tmp_path, conv, target_params=n_t, target_tokens=d_t) for conv in ('exact', '6n')}
  c = {conv: p['compute-optimal N']['at']['C'] for conv, (_, p, _) in res.items()}
  assert c['exact'] == pytest.approx(fpt_t['exact'] * d_t, rel=1e-12)
  assert c['6n'] == pytest.approx(fpt_t['6N'] * d_t, rel=1e-12)
  assert c['exact'] / c['6n'] == pytest.approx(fpt_t['exact'] / fpt_t['6N'], rel=1e-12)
  assert res['exact'][1]['loss']['value'] == res['6n'][1]['loss']['value']
  for conv, (sw, p, _) in res.items():
    n_opt, d_opt = p['compute-optimal N']['value'], p['compute-optimal D']['value']
    assert d_opt * reference_f(conv)(n_opt) == pytest.approx(c[conv], rel=1e-6), conv
    assert n_opt == pytest.approx(reference_optimum(sw['fits']['L(N,D)']['values'], c[conv], reference_f(conv)),
                                  rel=1e-6), conv
  # L(C) is fitted on each convention's own C: the frontier's C differ by the runs' exact/6N ratios.
  lc = {conv: sw['fits']['L(C)']['values'] for conv, (sw, _, _) in res.items()}
  assert lc['exact']['A'] != pytest.approx(lc['6n']['A'], rel=1e-3)


def test_closed_form_and_numeric_agree_for_pure_6nd():
  f = compute.FlopsPerToken(np.array([1e6, 1e8, 1e10]), 6 * np.array([1e6, 1e8, 1e10]), '6n')
  assert f.k == pytest.approx(6.0)
  rows = np.array([[TRUE[k] for k in ('E', 'A', 'B', 'alpha', 'beta')], [1.7, 400.0, 1500.0, 0.33, 0.29]])
  for c in (1e17, 1e20, 5.76e23):
    closed = compute.optimal_closed_form(rows, c)
    numeric = compute.optimal_numeric(rows, c, f)
    for a, b in zip(closed, numeric, strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-7)
  # A non-linear f takes the numerical path; f = k N with k != 6 the closed form with that k.
  assert compute.FlopsPerToken(np.array([1e6, 1e8]), np.array([7e6, 6.5e8]), 'exact').k is None
  k7 = compute.FlopsPerToken(np.array([1e6, 1e8]), np.array([7e6, 7e8]), 'exact')
  np.testing.assert_allclose(compute.optimal(TRUE, 1e20, k7), compute.optimal_closed_form(TRUE, 1e20, 7.0))


def test_flops_flag_accepts_only_the_conventions():
  assert compute.convention('6N') == '6n' and compute.convention('exact') == 'exact'
  with pytest.raises(compute.UserError, match='--flops must be one of exact, 6n'):
    compute.convention('causal')

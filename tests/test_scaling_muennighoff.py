"""The data-repetition law of Muennighoff et al. 2023 (sktlm/scaling/laws/muennighoff.py): its published
constants and the authors' own reference losses, its Jacobian, recovery of its constants from exact data, and
the registry fitting and backtesting it from a sweep that records unique tokens (and leaving alone one that
does not)."""

import csv
import json
import os

import numpy as np
import pytest

from sktlm.scaling import analysis, io, laws
from sktlm.scaling.laws import chinchilla
from sktlm.scaling.laws import muennighoff as mu

P = mu.PUBLISHED
VALUES = {'E': P['E'], 'A': P['A'], 'B': P['B'], 'alpha': P['alpha'], 'beta': P['beta'], 'R*_N': P['RN'],
          'R*_D': P['RD']}


def _law(n, d, u, v=VALUES):
  return mu.LAW.predict(lambda k: v[k], dict(N=np.asarray(n, float), D=np.asarray(d, float), U=np.asarray(u, float)))


def test_published_constants_and_reference_losses():
  # The paper's text: R*_D ~ 15.4 (a repeated token loses value with a half-life of ~15 epochs), R*_N ~ 5.3.
  assert P['RD'] == pytest.approx(15.4, abs=0.05) and P['RN'] == pytest.approx(5.3, abs=0.05)
  # The two models of the paper's Figure 1 (right), as the authors' README evaluates them (25B unique tokens).
  np.testing.assert_allclose(_law([6.34e9, 8.67e9], [242e9, 178e9], 25e9), [2.2256440889984477, 2.2269634075087867],
                             rtol=1e-12)
  # One epoch at a size the unique data can feed (N <= N_opt(U)): Chinchilla's law with the same constants.
  n, d = np.array([1e7, 1e8, 1e9]), np.array([2e10, 2e10, 5e10])
  chin = chinchilla.LAW.predict(lambda k: VALUES[k], dict(N=n, D=d))
  np.testing.assert_allclose(_law(n, d, d), chin, rtol=1e-12)
  assert np.all(_law(n, 8 * d, d) > chinchilla.LAW.predict(lambda k: VALUES[k], dict(N=n, D=8 * d)))  # repeats cost


def test_jacobian_matches_central_differences():
  rng = np.random.default_rng(0)
  n, u = 10 ** rng.uniform(7, 10, 30), 10 ** rng.uniform(8, 11, 30)
  d = u * rng.choice([1, 2, 8, 40], 30)
  p = np.array([[6.26, 7.30, 0.63, 0.35, 0.35, np.log(5.3), np.log(15.4)], [5.0, 8.0, 0.2, 0.3, 0.45, 1.0, 2.0]])
  _, jac = mu.log_loss(p, n, d, u)
  h = 1e-6
  num = np.stack([(mu.log_loss(p + h * e, n, d, u)[0] - mu.log_loss(p - h * e, n, d, u)[0]) / (2 * h)
                  for e in np.eye(7)], axis=-1)
  np.testing.assert_allclose(jac, num, rtol=1e-6, atol=1e-8)


def _grid():
  """Sizes around and beyond what the unique data can feed (N_opt(1e9) ~ 5e7), 1 to 64 epochs."""
  n, u, epochs = np.meshgrid([1e7, 3e7, 1e8, 3e8, 1e9], [1e8, 1e9, 1e10], [1, 4, 16, 64], indexing='ij')
  return n.ravel(), (u * epochs).ravel(), u.ravel()


def test_recovers_its_constants_from_exact_data():
  n, d, u = _grid()
  f = mu.LAW.fit(dict(N=n, D=d, U=u), _law(n, d, u), n_boot=0)
  for k, v in VALUES.items():
    assert f.values[k] == pytest.approx(v, rel=1e-6), k
  assert f.converged and not f.warnings and f.objective < 1e-20


def _write(root, with_unique=True):
  """results.csv of a repetition ladder; each size's shorter runs are branches of its longest (a `parent`), so
  the sweep is a size ladder (backtested by size), not an IsoFLOP grid."""
  os.makedirs(root)
  n, d, u = _grid()
  keep = u < 1e10
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['name', 'overrides', 'status', 'n_params_non_embedding', 'tokens',
                                      'unique_tokens', 'flops_6n', 'flops_exact', 'best_eval_loss', 'parent'])
    w.writeheader()
    for i in np.flatnonzero(keep):
      w.writerow(dict(name=f'n{n[i]:.0e}_d{d[i]:.0e}_u{u[i]:.0e}', overrides=json.dumps({'i': int(i)}),
                      status='done', n_params_non_embedding=n[i], tokens=d[i],
                      unique_tokens=u[i] if with_unique else '', flops_6n=6 * n[i] * d[i],
                      flops_exact=6 * n[i] * d[i], best_eval_loss=float(_law(n[i], d[i], u[i])),
                      parent='' if d[i] == 64 * u[i] else f'n{n[i]:.0e}_d{64 * u[i]:.0e}_u{u[i]:.0e}'))


def test_the_registry_fits_and_backtests_it_from_a_sweep(tmp_path):
  assert mu.LAW in laws.LAWS
  _write(str(tmp_path / 'rep'))
  a = analysis.analyze(io.load_sweep(str(tmp_path / 'rep')), analysis.Options(n_boot=0, curves=False))
  f = a.fits['L(N,D,U)']
  for k, v in VALUES.items():
    assert f.values[k] == pytest.approx(v, rel=1e-5), k
  rows = [r for r in a.backtest.rows if r['law'] == 'L(N,D,U)']
  assert len(rows) == 8 and {r['N'] for r in rows} == {1e9}        # every held-out point of the largest size
  assert max(abs(r['rel_error']) for r in rows) < 1e-5
  # Without unique tokens in the results the law is not attempted, and says nothing.
  _write(str(tmp_path / 'plain'), with_unique=False)
  b = analysis.analyze(io.load_sweep(str(tmp_path / 'plain')), analysis.Options(n_boot=0, curves=False, backtest=0))
  assert 'L(N,D,U)' not in b.fits and not any('L(N,D,U)' in w for w in b.warnings)

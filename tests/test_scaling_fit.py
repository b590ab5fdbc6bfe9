"""Scaling-law fits: gradients, optimiser agreement with scipy, recovery of known laws, error/warning paths."""

import numpy as np
import pytest
from scipy import optimize

from sktlm.scaling import fit, isoflop, laws, lbfgs
from sktlm.scaling.laws import chinchilla

TRUE = dict(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.29)


def fit_power_law(x, loss, kind='L(N)', **kw):
  law = laws.BY_KIND[kind]
  return law.fit({law.columns[0]: x}, loss, **kw)


def fit_parametric(n, d, loss, **kw):
  return chinchilla.LAW.fit({'N': n, 'D': d}, loss, **kw)


def _log_law(p_P, x_Nxk):
  """log(exp(a_1 - alpha_1 x_1) + ... + exp(e)): the fitted form, for one parameter vector (float64)."""
  k = x_Nxk.shape[1]
  t = np.concatenate([p_P[:k] - p_P[k + 1:] * x_Nxk, np.full((len(x_Nxk), 1), p_P[k])], axis=1)
  return np.log(np.exp(t).sum(axis=1))


def _law(n, d, t=TRUE):
  return t['E'] + t['A'] / n ** t['alpha'] + t['B'] / d ** t['beta']


@pytest.mark.parametrize('k', [1, 2])
def test_objective_gradient_matches_central_differences(k):
  rng = np.random.default_rng(0)
  x = rng.uniform(10, 25, size=(40, k))
  p = rng.uniform([3] * k + [0.3] + [0.2] * k, [8] * k + [0.8] + [0.5] * k, size=(3, 2 * k + 1))
  y = _log_law(p[0], x) + rng.normal(0, 2e-3, size=40)  # residuals both inside and outside delta
  w = rng.integers(0, 3, size=(3, 40)).astype(float)
  _, g = lbfgs.objective(p, x, y, w, 1e-3)
  h = 1e-8  # small: central differences straddling the Huber kink err by O(h)
  num = np.stack([(lbfgs.objective(p + h * e, x, y, w, 1e-3)[0] - lbfgs.objective(p - h * e, x, y, w, 1e-3)[0])
                  / (2 * h) for e in np.eye(2 * k + 1)], axis=1)
  np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


def test_objective_is_summed_huber_of_log_residuals():
  n, d = np.array([1e8, 3e8, 1e9]), np.array([1e9, 2e10, 5e10])
  loss = _law(n, d) * np.array([1.0, 1.0005, 1.01])  # residuals 0, ~5e-4 (quadratic part), ~1e-2 (linear part)
  p = np.array([np.log(TRUE['A']), np.log(TRUE['B']), np.log(TRUE['E']), TRUE['alpha'], TRUE['beta']])
  f, _ = lbfgs.objective(p[None], np.log(np.stack([n, d], 1)), np.log(loss), None, 1e-3)
  r = np.log(_law(n, d)) - np.log(loss)
  huber = np.where(np.abs(r) <= 1e-3, 0.5 * r ** 2, 1e-3 * (np.abs(r) - 0.5e-3))
  np.testing.assert_allclose(f[0], huber.sum(), rtol=1e-12)


def test_batched_lbfgs_matches_scipy_per_start():
  """The batched multi-start path finds the optimum scipy L-BFGS-B finds from the same starts."""
  rng = np.random.default_rng(1)
  n = np.repeat(np.logspace(7, 9, 5), 4)
  d = np.tile(np.logspace(9, 11, 4), 5)
  loss = _law(n, d) * np.exp(rng.normal(0, 0.01, size=n.size))
  x, y = np.log(np.stack([n, d], 1)), np.log(loss)
  starts = chinchilla.chinchilla_grid()[rng.choice(4500, 60, replace=False)]
  m = lbfgs.minimize_grid(starts, x, y)
  p_ref, f_ref = lbfgs.minimize_scipy(starts, x, y)
  assert m.fun <= f_ref * (1 + 1e-7)
  np.testing.assert_allclose(m.p, p_ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize('kind,xs,t', [
    ('L(N)', np.logspace(6, 9, 7), dict(E=2.1, A=60.0, alpha=0.3)),
    ('L(C)', np.logspace(15, 20, 8), dict(E=1.9, A=45.0, alpha=0.09)),
])
def test_power_law_recovers_noise_free_law(kind, xs, t):
  loss = t['E'] + t['A'] / xs ** t['alpha']
  f = fit_power_law(xs, loss, kind=kind, n_boot=20, seed=0)
  for name in ('E', 'A', 'alpha'):
    assert f.values[name] == pytest.approx(t[name], rel=1e-4), name
    lo, hi = f.ci(name)
    assert lo - 1e-6 * abs(t[name]) <= t[name] <= hi + 1e-6 * abs(t[name])
  assert f.converged and not f.warnings
  np.testing.assert_allclose(f.predict(xs), loss, rtol=1e-6)


def test_parametric_recovers_noise_free_law():
  n = np.repeat(np.logspace(7, 9.5, 5), 4)
  d = np.tile(np.logspace(9, 11.5, 4), 5)
  f = fit_parametric(n, d, _law(n, d), n_boot=10, seed=0)
  for name in f.names:
    assert f.values[name] == pytest.approx(TRUE[name], rel=1e-4), name
  assert f.objective < 1e-12 and f.converged and not f.warnings
  assert f.n_starts == 4500


def test_bootstrap_is_seeded_and_covers_truth_under_noise():
  rng = np.random.default_rng(3)
  xs = np.logspace(6, 9, 10)
  t = dict(E=2.0, A=80.0, alpha=0.32)
  loss = (t['E'] + t['A'] / xs ** t['alpha']) * np.exp(rng.normal(0, 0.003, xs.size))
  f1 = fit_power_law(xs, loss, n_boot=100, seed=7)
  f2 = fit_power_law(xs, loss, n_boot=100, seed=7)
  f3 = fit_power_law(xs, loss, n_boot=100, seed=8)
  np.testing.assert_array_equal(f1.boot, f2.boot)
  assert not np.array_equal(f1.boot, f3.boot)
  lo, hi = f1.ci('alpha')
  assert lo < t['alpha'] < hi and hi - lo < 0.3
  # Prediction intervals come from the same refits.
  p = f1.predict_boot(1e10)
  assert p.shape == (len(f1.boot),) and fit.interval(p)[0] < f1.predict(1e10) < fit.interval(p)[1]


def test_compute_optimal_closed_form_matches_numeric_minimum():
  for c in (1e18, 1e21, 5.76e23):
    n_opt, d_opt, l_opt = chinchilla.LAW.optimal(TRUE, c)
    res = optimize.minimize_scalar(lambda ln, c=c: _law(np.exp(ln), c / (6 * np.exp(ln))), bounds=(5, 35),
                                   method='bounded', options=dict(xatol=1e-10))
    assert n_opt == pytest.approx(np.exp(res.x), rel=1e-5)
    assert d_opt == pytest.approx(c / (6 * n_opt), rel=1e-12)
    assert l_opt == pytest.approx(res.fun, rel=1e-10)
  # Vectorised over bootstrap parameter rows.
  arr = np.array([[TRUE[k] for k in ('E', 'A', 'B', 'alpha', 'beta')]] * 3)
  n_b, _, _ = chinchilla.LAW.optimal(arr, 1e21)
  np.testing.assert_allclose(n_b, chinchilla.LAW.optimal(TRUE, 1e21)[0])


def test_isoflop_recovers_exact_parabola_vertices():
  k_true, a_true = 0.09, 0.5
  n_l, c_l, c_exact, loss_l = [], [], [], []
  for c in (1e17, 1e18, 1e19, 1e20):
    ln_opt = np.log(k_true) + a_true * np.log(c)
    for dn in (-1.5, -0.7, 0.0, 0.4, 1.2):
      n = np.exp(ln_opt + dn)
      n_l.append(n)
      c_l.append(c * (1 + 0.03 * dn))  # real runs miss the budget by a few %
      c_exact.append(c)
      loss_l.append(3.0 - 0.1 * np.log10(c) + 0.05 * dn ** 2)
  iso = isoflop.fit_isoflop(np.array(n_l), np.array(c_l), np.array(loss_l), n_boot=30)
  assert len(iso.budgets) == 4
  # Budget representatives are geometric means of the (slightly scattered) run FLOPs: compare exponents.
  assert iso.a == pytest.approx(a_true, abs=0.01)
  assert iso.d_opt(1e21) == pytest.approx(1e21 / (6 * iso.n_opt(1e21)))
  for b in iso.budgets:
    assert b['N_opt'] == pytest.approx(k_true * (b['C'] * 1.0) ** a_true, rel=0.1)
  assert not iso.warnings
  # Declared budgets group exactly and give the exact law.
  iso2 = isoflop.fit_isoflop(np.array(n_l), np.array(c_exact), np.array(loss_l),
                         declared_budgets=np.repeat([1, 2, 3, 4], 5), n_boot=0)
  assert iso2.a == pytest.approx(a_true, rel=1e-9) and iso2.k == pytest.approx(k_true, rel=1e-9)


def test_isoflop_agrees_with_parametric_optimum_on_law_data():
  """Approach 2 on runs generated from an L(N, D) law lands near Approach 3's closed form."""
  n_l, c_l = [], []
  for c in (1e19, 1e20, 1e21):
    n0 = chinchilla.LAW.optimal(TRUE, c)[0]
    for f in np.logspace(-0.5, 0.5, 7):
      n_l.append(n0 * f)
      c_l.append(c)
  n, c = np.array(n_l), np.array(c_l)
  iso = isoflop.fit_isoflop(n, c, _law(n, c / (6 * n)), n_boot=0)
  assert iso.a == pytest.approx(TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']), abs=0.01)
  assert iso.n_opt(1e22) == pytest.approx(chinchilla.LAW.optimal(TRUE, 1e22)[0], rel=0.05)


def test_group_budgets():
  c = np.array([1e18, 1.1e18, 0.95e18, 3e18, 3.2e18, 1e19])
  ids, budgets = isoflop.group_budgets(c, gap=1.25)
  assert list(ids) == [0, 0, 0, 1, 1, 2] and len(budgets) == 3
  # Declared budgets group exactly; each group's C is the geometric mean of its runs' compute.
  ids, budgets = isoflop.group_budgets(c, declared=np.array([5, 5, 7, 7, 7, np.nan]))
  assert list(ids) == [0, 0, 1, 1, 1, 2]
  np.testing.assert_allclose(budgets, [np.sqrt(1.1e36), (0.95 * 3 * 3.2) ** (1 / 3) * 1e18, 1e19])


# ---------------------------------------------------------------------------------------- error paths

def test_too_few_distinct_sizes_is_an_error():
  with pytest.raises(fit.FitError, match='at least 3 distinct'):
    fit_power_law(np.array([1e6, 1e6, 1e7]), np.array([3.0, 3.1, 2.5]), n_boot=0)


def test_constant_losses_are_an_error():
  with pytest.raises(fit.FitError, match='all 4 losses are equal'):
    fit_power_law(np.logspace(6, 9, 4), np.full(4, 3.0), n_boot=0)


def test_non_positive_values_are_an_error():
  with pytest.raises(fit.FitError, match='non-positive or non-finite loss'):
    fit_power_law(np.logspace(6, 9, 4), np.array([3.0, np.nan, 2.5, 2.4]), n_boot=0)


def test_parametric_needs_five_runs_varying_n_and_d():
  n, d = np.logspace(7, 9, 4), np.logspace(9, 11, 4)
  with pytest.raises(fit.FitError, match='at least 5 runs'):
    fit_parametric(n, d, _law(n, d), n_boot=0)
  n, d = np.logspace(7, 9, 6), np.full(6, 1e10)
  with pytest.raises(fit.FitError, match='vary both N and D'):
    fit_parametric(n, d, _law(n, d), n_boot=0)


def test_isoflop_needs_two_convex_budgets():
  n = np.logspace(6, 8, 5)
  with pytest.raises(fit.FitError, match='at least 2 compute budgets'):
    isoflop.fit_isoflop(n, np.full(5, 1e18), 3 + (np.log(n) - 16) ** 2 * 0.01, n_boot=0)
  n2 = np.concatenate([n, n])
  c2 = np.repeat([1e18, 1e19], 5)
  concave = 3 - (np.log(n2) - 16) ** 2 * 0.01
  with pytest.raises(fit.FitError) as e:
    isoflop.fit_isoflop(n2, c2, concave, n_boot=0)
  assert 'got 0' in str(e.value)


def test_boundary_fits_are_flagged():
  xs = np.logspace(6, 9, 6)
  pure = 50.0 / xs ** 0.2  # no irreducible term: E runs to 0
  f = fit_power_law(xs, pure, n_boot=0)
  assert any('collapsed to ~0' in w for w in f.warnings), f.warnings
  rising = 2.0 + 0.001 * xs ** 0.1
  f = fit_power_law(xs, rising, n_boot=0)
  assert any('< 0' in w for w in f.warnings), f.warnings
  three = fit_power_law(xs[:3], 2 + 30 / xs[:3] ** 0.3, n_boot=0)
  assert any('interpolates' in w for w in three.warnings)


def test_non_converged_optimiser_is_flagged():
  m = lbfgs.Minimum(p=np.zeros(3), fun=1.0, converged=False, message='ABNORMAL_TERMINATION_IN_LNSRCH',
                    candidates=np.zeros((1, 3)), n_starts=1)
  warnings = fit._finish_warnings('L(N)', m, n_boot=100, n_dropped=30, n_points=5, n_params=3)
  assert any('did not converge (ABNORMAL' in w for w in warnings)
  assert any('30 of 100 bootstrap resamples' in w for w in warnings)


def test_parametric_fit_refuses_collinear_n_and_d():
  """A size ladder with D = k N cannot separate the N and D terms: refused, not a nonsense fit."""
  n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
  d = 0.3 * n
  loss = 1.5 + 400 / n**0.3 + 900 / d**0.3
  with pytest.raises(fit.FitError, match='cannot separate N from D'):
    fit_parametric(n, d, loss, n_boot=0)
  assert not chinchilla.LAW.allocation_defined({'alpha': -0.5, 'beta': 0.3})


def test_engine_forms_agree_with_the_power_sum_and_their_gradients():
  """The engine's other forms (sktlm.scaling.forms) against Hoffmann et al.'s analytic objective: the power sum
  written as log-sum-exp of linear features (LinearLSE) and as a log-model with its Jacobian (LogModel) give the
  same objective and gradient, for K parameter vectors with bootstrap weights."""
  from sktlm.scaling import forms
  rng = np.random.default_rng(2)
  x = rng.uniform(10, 25, size=(30, 2))
  p = rng.uniform([3, 3, 0.3, 0.2, 0.2], [8, 8, 0.8, 0.5, 0.5], size=(4, 5))
  y = _log_law(p[0], x) + rng.normal(0, 2e-3, size=30)
  w = rng.integers(0, 3, size=(4, 30)).astype(float)
  one, zero = np.ones(30), np.zeros(30)
  feats = (np.stack([one, zero, zero, -x[:, 0], zero], 1), np.stack([zero, one, zero, zero, -x[:, 1]], 1),
           np.stack([zero, zero, one, zero, zero], 1))

  def log_model(q):
    t = np.stack([q @ f.T for f in feats])                   # (terms, K, N)
    soft = np.exp(t - t.max(axis=0))
    soft /= soft.sum(axis=0)
    ll = np.log(np.exp(t).sum(axis=0))
    return ll, sum(s[..., None] * f[None] for s, f in zip(soft, feats, strict=True))

  ref = lbfgs.objective(p, x, y, w, 1e-3)
  for form in (forms.LinearLSE(feats), forms.LogModel(log_model)):
    f, g = form.huber(p, y, w, 1e-3)
    np.testing.assert_allclose(f, ref[0], rtol=1e-12)
    np.testing.assert_allclose(g, ref[1], rtol=1e-9, atol=1e-12)
    f_e, g_e = form.huber(p, y, w, 1e-3, frozen=(2,))
    assert np.all(g_e[:, 2] == 0) and np.allclose(np.delete(g_e, 2, 1), np.delete(g, 2, 1))

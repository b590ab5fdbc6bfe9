"""The Tissue et al. 2024 loss-curve law: areas against their definition, recovery of a known law from a
cosine run's logged curve, and prediction of a WSD run's final loss (a different schedule)."""

import numpy as np
import pytest

from sktlm.scaling import curve_law

TRUE = dict(L0=2.1, A=0.9, alpha=0.45, C=0.35)
STEPS, LOG_EVERY, PEAK = 2000, 10, 1e-3


def cosine(n, warmup=100):
  s = np.arange(1, n + 1)
  warm = PEAK * s / warmup
  cos = PEAK * 0.5 * (1 + np.cos(np.pi * np.clip((s - warmup) / (n - warmup), 0, 1)))
  return np.where(s <= warmup, warm, cos)


def wsd(n, warmup=100, decay=0.2):
  s = np.arange(1, n + 1)
  start = int(n * (1 - decay))
  return np.where(s <= warmup, PEAK * s / warmup, np.where(s <= start, PEAK, PEAK * (n - s) / (n - start)))


def true_curve(eta):
  return curve_law.CurveLaw(**TRUE, lam=curve_law.LAMBDA, n_points=0, rmse=0.0).curve(eta)


def logged(eta):
  """What metrics.jsonl holds: every LOG_EVERY steps, the LR at that step and the mean loss since the last."""
  per_step = true_curve(eta)
  steps = np.arange(LOG_EVERY, len(eta) + 1, LOG_EVERY)
  loss = np.array([per_step[s - LOG_EVERY:s].mean() for s in steps])
  return steps, eta[steps - 1], loss


def test_areas_match_their_definition():
  eta = wsd(60, warmup=5, decay=0.5)   # steps 1-4 rise, step 5 is the first at the peak
  s1, s2 = curve_law.areas(eta, 0.9)
  assert curve_law.warmup_end(eta) == 4 and np.isnan(s1[:4]).all() and np.isnan(s2[:4]).all()
  post = eta[4:]
  eta0 = np.concatenate([[post[0]], post])
  ref2 = [sum(sum((eta0[k - 1] - eta0[k]) * 0.9 ** (i - k) for k in range(1, i + 1)) for i in range(1, j + 1))
          for j in range(1, len(post) + 1)]  # eta0[k] is eta_k (1-based from the warmup end), eta_0 = eta_1
  np.testing.assert_allclose(s1[4:], np.cumsum(eta)[4:], rtol=1e-12)  # S1 includes the warmup's area
  np.testing.assert_allclose(s2[4:], ref2, rtol=1e-10, atol=1e-18)
  assert np.all(s2[4:] >= 0)  # the warmup's rising LR is not negative annealing
  assert np.all(curve_law.areas(np.full(50, 3e-4))[1] == 0)  # a constant LR never anneals


def test_fit_on_cosine_predicts_wsd_final_loss():
  steps, lr, loss = logged(cosine(STEPS))
  eta = curve_law.per_step_lr(steps, lr, STEPS)
  law = curve_law.fit([(eta, steps, loss)], skip_steps=100)
  for k, v in TRUE.items():
    assert getattr(law, k) == pytest.approx(v, rel=1e-3), k
  target = wsd(STEPS)
  w_steps, w_lr, _ = logged(target)
  predicted = law.curve(curve_law.per_step_lr(w_steps, w_lr, STEPS))[-1]
  actual = true_curve(target)[-1]
  assert predicted == pytest.approx(actual, rel=1e-5)
  # Negative control: without the annealing term the WSD run's final loss is missed by far more.
  no_anneal = curve_law.CurveLaw(**{**TRUE, 'C': 0.0}, lam=curve_law.LAMBDA, n_points=0, rmse=0.0)
  assert abs(no_anneal.curve(target)[-1] / actual - 1) > 10 * abs(predicted / actual - 1)


def transient_curve(eta, rng, lam=curve_law.LAMBDA, noise=0.004):
  """An independent generator (a step loop, not curve_law.areas): from the warmup end on, the law (S1 from
  step 1, S2 from the peak) plus an early transient from ln(384) that decays over ~40 steps, plus per-step
  noise. During warmup: the forward term (S1 from step 1, large) plus the transient."""
  law_l0, law_a, law_alpha, law_c = TRUE['L0'], TRUE['A'], TRUE['alpha'], TRUE['C']
  peak_at = next(i for i, e in enumerate(eta) if e >= max(eta) * (1 - 1e-9))
  out, s1, s2, m, prev = [], 0.0, 0.0, 0.0, None
  for i, e in enumerate(eta):
    transient = (np.log(384) - law_l0) * np.exp(-(i + 1) / 40.0)
    s1 += e
    if i < peak_at:
      out.append(law_l0 + law_a * s1 ** -law_alpha + transient)
      continue
    m = lam * m + ((prev if prev is not None else e) - e)
    s2, prev = s2 + m, e
    out.append(law_l0 + law_a * s1 ** -law_alpha - law_c * s2 + transient)
  return np.array(out) + rng.normal(0, noise, len(eta))


def test_warmup_transient_and_noise_fitted_after_warmup():
  """Fit a cosine run whose curve has a warmup transient and noise (generated independently), predict a WSD
  run's final loss: fitted from the warmup end (the default) it is within 0.5%; from step 0, the warmup
  records (and warmup as negative annealing) wreck it."""
  rng = np.random.default_rng(0)
  eta = cosine(STEPS, warmup=200)
  per_step = transient_curve(eta, rng)
  steps = np.arange(LOG_EVERY, STEPS + 1, LOG_EVERY)
  loss = np.array([per_step[s - LOG_EVERY:s].mean() for s in steps])
  law = curve_law.fit([(curve_law.per_step_lr(steps, eta[steps - 1], STEPS), steps, loss)])
  target = wsd(STEPS, warmup=200)
  actual = transient_curve(target, np.random.default_rng(1), noise=0.0)[-1]
  predicted = law.curve(target)[-1]
  assert abs(predicted / actual - 1) < 0.005, (predicted, actual)
  assert law.alpha == pytest.approx(TRUE['alpha'], rel=0.25)


def test_too_few_points_is_an_error():
  with pytest.raises(curve_law.FitError, match='needs >= 6'):
    curve_law.fit([(np.full(30, 1e-3), np.array([10, 20, 30]), np.array([3.0, 2.9, 2.8]))])


def test_cli_fits_one_run_and_predicts_another(tmp_path):
  """`sktlm scaling --curve_fit=cos --curve_predict=wsd` on run workdirs whose metrics.jsonl follow the law."""
  import json
  import subprocess
  import sys
  for name, eta in (('cos', cosine(STEPS)), ('wsd', wsd(STEPS))):
    wd = tmp_path / 'runs' / name
    wd.mkdir(parents=True)
    steps, lr, loss = logged(eta)
    with open(wd / 'metrics.jsonl', 'w') as f:
      for s, l_, x in zip(steps, lr, loss, strict=True):
        f.write(json.dumps(dict(kind='train', step=int(s), tokens=int(s) * 1024, lr=float(l_), loss=float(x))) + '\n')
    (wd / 'summary.json').write_text(json.dumps(dict(status='done', tokens=STEPS * 1024, final_train_loss=loss[-1],
                                                     params=dict(total=1e6, non_embedding=8e5))))
  out = tmp_path / 'report'
  r = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', str(tmp_path / 'runs'), f'--out={out}',
                      '--curve_fit=cos', '--curve_predict=wsd', '--bootstrap=0'], capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr
  (p,) = json.loads((out / 'fits.json').read_text())['curve_law']['predictions']
  assert p['run'] == 'wsd' and p['step'] == STEPS and abs(p['rel_error']) < 1e-5
  assert 'loss-curve law: predicts wsd at step 2000' in r.stdout
  assert '## Loss-curve law (Tissue et al. 2024)' in (out / 'report.md').read_text()
  bad = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'scaling', str(tmp_path / 'runs'), f'--out={out}',
                        '--curve_fit=nope'], capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "no run named 'nope'" in bad.stderr and 'Traceback' not in bad.stderr

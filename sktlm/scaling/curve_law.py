"""The full-loss-curve law of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing"):

  L(s) = L0 + A * S1(s)^-alpha - C * S2(s)

S1(s) = sum_{i<=s} eta_i is the forward area (the LR summed over steps) and S2(s) = sum_{i<=s} m_i the
annealing area, with momentum m_i = lam * m_{i-1} + (eta_{i-1} - eta_i) (lam = 0.999, the paper's value):
annealing lowers the loss with a delay. Fitted on one or more runs' train-loss curves (metrics.jsonl), the
law predicts the curve, and the final loss, of the same model under another LR schedule (a WSD decay branch,
a different decay shape or length).

Warmup: the law describes the loss after the LR warmup. S1 counts every step (the warmup's area is training
progress too), but S2 accumulates LR drops only from the warmup end (the first step at the peak LR): the
warmup's rising LR is not negative annealing. Records at or before the warmup end (or `skip_steps`, for a
longer early transient: the loss falling from ln(vocab)) are not fitted; the law is nan inside the warmup.

The logged LR is sampled every log_every steps; per-step LRs are interpolated linearly between the logged
ones (exact for linear warmup and linear decay, close for cosine). A logged train loss is the mean over the
steps since the previous record, and the law is averaged over the same window.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import forms, io, lbfgs
from sktlm.scaling.fit import FitError

LAMBDA = 0.999


def per_step_lr(steps: np.ndarray, lr: np.ndarray, last: int | None = None) -> np.ndarray:
  """eta_1..eta_last interpolated linearly from logged (step, lr) pairs (held after the last record)."""
  steps, lr = np.asarray(steps, dtype=np.float64), np.asarray(lr, dtype=np.float64)
  ok = np.isfinite(steps) & np.isfinite(lr)
  steps, lr = steps[ok], lr[ok]
  if steps.size < 2:
    raise FitError('loss-curve law: the run logged fewer than 2 learning rates')
  last = int(steps.max()) if last is None else last
  if steps[0] > 0:  # before the first record: extend its slope back to step 0 (a warmup starts near 0)
    slope = (lr[1] - lr[0]) / (steps[1] - steps[0])
    steps, lr = np.concatenate([[0.0], steps]), np.concatenate([[max(0.0, lr[0] - slope * steps[0])], lr])
  return np.interp(np.arange(1, last + 1), steps, lr)


def warmup_end(eta: np.ndarray) -> int:
  """Steps before the LR first reaches its peak (0 without a warmup): eta_1..eta_w rise, eta_{w+1} is the peak."""
  eta = np.asarray(eta, dtype=np.float64)
  if not eta.size:
    return 0
  return int(np.argmax(eta >= eta.max() * (1 - 1e-9)))


def areas(eta: np.ndarray, lam: float = LAMBDA, warmup: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(S1, S2) after each step for per-step LRs eta_1..eta_n: S1 from step 1, S2 from the warmup end (`warmup`
  None: detected from eta); both nan inside the warmup. At the first step at the peak there is no annealing."""
  eta = np.asarray(eta, dtype=np.float64)
  w = warmup_end(eta) if warmup is None else warmup
  post = eta[w:]
  s1 = np.cumsum(eta)[w:]
  drop = np.diff(post, prepend=post[:1]) * -1.0
  m = np.empty_like(post)
  acc = 0.0
  for i, d in enumerate(drop):  # O(steps), a few thousand at most here
    acc = lam * acc + d
    m[i] = acc
  pad = np.full(w, np.nan)
  return np.concatenate([pad, s1]), np.concatenate([pad, np.cumsum(m)])


@dataclasses.dataclass
class CurveLaw:
  L0: float
  A: float
  alpha: float
  C: float
  lam: float
  n_points: int
  rmse: float

  def curve(self, eta: np.ndarray) -> np.ndarray:
    """Predicted loss after each step of a run with per-step LRs eta (nan inside the warmup)."""
    s1, s2 = areas(eta, self.lam)
    with np.errstate(invalid='ignore'):
      return self.L0 + self.A * np.power(s1, -self.alpha) - self.C * s2

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _windows(steps: np.ndarray) -> list[np.ndarray]:
  """Step indices (0-based) averaged by each logged record: those since the previous record."""
  prev = np.concatenate([[0], steps[:-1]]).astype(int)
  return [np.arange(p, int(s)) for p, s in zip(prev, steps, strict=True)]


def _window_matrix(steps: np.ndarray, keep: np.ndarray, n_steps: int) -> np.ndarray:
  """(kept records, steps): row r averages the per-step law over record r's window."""
  windows = _windows(steps)
  m = np.zeros((int(keep.sum()), n_steps))
  for r, w in enumerate(w for w, k in zip(windows, keep, strict=True) if k):
    m[r, w] = 1.0 / len(w)
  return m


def _log_model(data, lam):
  """The law's log (averaged over each kept record's window) and its Jacobian in p = (L0, ln A, alpha, C)."""
  parts = []
  for eta, steps, _, keep in data:
    s1, s2 = areas(eta, lam)
    finite = np.isfinite(s1)   # inside the warmup the law is undefined; no kept window reaches there
    parts.append((np.where(finite, s1, 1.0), np.where(finite, s2, 0.0), _window_matrix(steps, keep, len(eta))))

  def fn(p_KxP):
    l0, log_a, alpha, c = (p_KxP[:, i, None] for i in range(4))
    loss, jac = [], []
    for s1, s2, m in parts:
      pw = np.exp(log_a) * np.power(s1, -alpha)                            # (K, steps)
      loss.append((l0 + pw - c * s2) @ m.T)
      jac.append(np.stack([np.broadcast_to(m.sum(axis=1), loss[-1].shape), pw @ m.T,
                           (-pw * np.log(s1)) @ m.T, np.broadcast_to(-(s2 @ m.T), loss[-1].shape)], axis=-1))
    loss_KxN, jac_KxNxP = np.concatenate(loss, axis=1), np.concatenate(jac, axis=1)
    return np.log(loss_KxN), jac_KxNxP / loss_KxN[..., None]
  return fn


def fit(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *, lam: float = LAMBDA,
        skip_steps: int = -1, delta: float = 1e-3) -> CurveLaw:
  """Fit on runs given as (per-step eta, logged steps, logged train losses) with the one engine of every law
  (sktlm.scaling.lbfgs: summed Huber loss of log residuals from a grid of starts). Records at or before
  `skip_steps` (the early transient, where the law does not hold; -1: each run's warmup end) are left out,
  and always those inside the warmup."""
  data = []
  for eta, steps, loss in runs:
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=np.float64)
    w = warmup_end(eta)
    prev = np.concatenate([[0], steps[:-1]])
    # A record averages the steps since the previous one: keep only windows wholly after the warmup.
    keep = (steps > max(skip_steps, w)) & (prev >= w) & np.isfinite(loss) & (steps <= len(eta))
    data.append((np.asarray(eta, dtype=np.float64), steps, loss, keep))
  n_points = int(sum(k.sum() for *_, k in data))
  if n_points < 6:
    raise FitError(f'loss-curve law has 4 parameters and needs >= 6 logged losses, got {n_points}')
  y = np.concatenate([loss[k] for _, _, loss, k in data])
  form = forms.LogModel(_log_model(data, lam))
  starts = np.array([[float(y.min()) * 0.8, np.log(max(float(y.max() - y.min()), 1e-3)), alpha0, c0]
                     for alpha0 in (0.3, 0.5, 1.0) for c0 in (0.0, 10.0)])
  try:
    m = lbfgs.minimize_grid(starts, form, np.log(y), delta=delta)
  except FloatingPointError:
    raise FitError('loss-curve law: no fit converged') from None
  l0, log_a, alpha, c = m.p
  pred = np.exp(form.fn(m.p[None])[0][0])
  return CurveLaw(L0=float(l0), A=float(np.exp(log_a)), alpha=float(alpha), C=float(c), lam=lam,
                  n_points=n_points, rmse=float(np.sqrt(np.mean((pred - y) ** 2))))


# ------------------------------------------------------------------------------------- in the report

def _run_curve(rows_by_name: dict, name: str):
  """(per-step eta, logged steps, logged train losses, N) of a run from its metrics.jsonl."""
  row = rows_by_name.get(name)
  if row is None:
    raise UserError(f"--curve_fit/--curve_predict: no run named '{name}' in the sweeps "
                    f"(runs: {', '.join(sorted(rows_by_name)[:8])}{' ...' if len(rows_by_name) > 8 else ''})")
  c = io.read_curves(row['workdir'])
  if c is None:
    raise UserError(f"--curve_fit/--curve_predict: run '{name}' has no metrics.jsonl ({row['workdir']})")
  tr = c['train']
  ok = np.isfinite(tr['loss']) & np.isfinite(tr['step'])
  steps, loss = tr['step'][ok].astype(int), tr['loss'][ok]
  return per_step_lr(tr['step'], tr['lr'], int(steps.max()) if steps.size else None), steps, loss, row


def analyse(rows_by_name: dict, fit_names: list[str], predict_names: list[str], skip_steps: int = -1) -> dict:
  """Fit the law on `fit_names` (runs of one model size), predict the final logged train loss of each of
  `predict_names` from its own LR schedule. skip_steps: see `fit` (-1: the warmup end).
  -> JSON-ready dict (law, predictions, warnings)."""
  fitted = [_run_curve(rows_by_name, n) for n in fit_names]
  sizes = {r['n_params_total'] for *_, r in fitted}
  law = fit([(eta, steps, loss) for eta, steps, loss, _ in fitted], skip_steps=skip_steps)
  out = dict(fit_runs=list(fit_names), law=law.to_json(), predictions=[], warnings=[],
             skip_steps=[max(skip_steps, warmup_end(eta)) for eta, *_ in fitted])
  for name in predict_names:
    eta, steps, loss, row = _run_curve(rows_by_name, name)
    if row['n_params_total'] not in sizes:
      out['warnings'].append(f"loss-curve law: '{name}' is another model size than the fitted runs: the law "
                             'holds per size, its prediction means little')
    window = slice(int(steps[-2]) if len(steps) > 1 else 0, int(steps[-1]))
    pred = float(np.nanmean(law.curve(eta)[window]))
    out['predictions'].append(dict(run=name, step=int(steps[-1]), predicted=pred, actual=float(loss[-1]),
                                   rel_error=pred / float(loss[-1]) - 1))
  return out


def report_lines(res: dict) -> list[str]:
  law = res['law']
  lines = [f"Fitted on {', '.join(res['fit_runs'])} ({law['n_points']} logged train losses after step "
           f"{', '.join(map(str, res.get('skip_steps', [])))} (the warmup end or --curve_skip_steps), RMSE "
           f"{law['rmse']:.3g}): L(s) = {law['L0']:.4g} + {law['A']:.4g} S1^-{law['alpha']:.4g} - "
           f"{law['C']:.4g} S2 (lambda = {law['lam']}).", '']
  if res['predictions']:
    lines += ['| run | step | predicted train loss | actual | error |', '|---|---|---|---|---|']
    lines += [f"| {p['run']} | {p['step']} | {p['predicted']:.4g} | {p['actual']:.4g} | "
              f"{100 * p['rel_error']:+.2f}% |" for p in res['predictions']]
  return lines


def analyse_section(analyses, opts) -> dict | None:
  """--curve_fit / --curve_predict over the runs of every sweep; a fit the runs cannot support is a warning."""
  if not opts.curve_fit:
    return None
  rows = {r['name']: r for a in analyses for r in a.sweep.rows}
  try:
    return analyse(rows, list(opts.curve_fit), list(opts.curve_predict), opts.curve_skip_steps)
  except FitError as e:
    for a in analyses[:1]:
      a.warnings.append(f'loss-curve law not fitted: {e}')
    return None


def render_section(res: dict, out: str) -> list[str]:
  return ['## Loss-curve law (Tissue et al. 2024)', ''] + report_lines(res) + ['']

"""Predictors that know nothing about scale, beside which every backtest and --predict row is judged.

- copy: the loss of the largest fitted configuration (the largest N fitted) at the token budget nearest, in
  log D, to the predicted point's. What a team would guess without any law.
- C-trend: a pure power law in compute, L = K / C^a (no asymptote), fitted on the fitted runs' compute frontier
  by the one engine (sktlm.scaling.lbfgs), extrapolated to the point's C.

A law earns its keep where it beats these by a wide margin: on a ladder whose held-out points the copy already
predicts to within the law's error, the ladder is not testing scaling (the loss is set by D and noise, not N).
`verdict` states the worst law and copy errors and their ratio, and says so when the law does not beat the copy
by BEAT.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.scaling import forms, lbfgs, points

BEAT = 3.0  # the law's worst error must be this many times smaller than the copy's


@dataclasses.dataclass
class Naive:
  top_n: float                 # the largest N fitted
  top_d: np.ndarray            # its configurations' token budgets ...
  top_loss: np.ndarray         # ... losses
  top_name: list               # ... and names
  k: float = math.nan          # C-trend: L = k / C^a
  a: float = math.nan

  def copy(self, d: float) -> tuple[float, str]:
    """(the copied loss, the configuration copied) for a point trained on d tokens."""
    if not len(self.top_d):
      return math.nan, ''
    i = int(np.argmin(np.abs(np.log(self.top_d) - np.log(d)))) if d > 0 else int(np.argmax(self.top_d))
    return float(self.top_loss[i]), self.top_name[i]

  def ctrend(self, c: float) -> float:
    return self.k / c ** self.a if c > 0 and math.isfinite(self.k) else math.nan

  def columns(self, d: float, c: float, actual: float) -> dict:
    """The naive predictions of one point and their relative errors (predicted / actual - 1)."""
    copied, name = self.copy(d)
    trend = self.ctrend(c)
    return dict(copy=copied, copy_run=name, copy_error=copied / actual - 1, ctrend=trend,
                ctrend_error=trend / actual - 1)


def fit_ctrend(c: np.ndarray, loss: np.ndarray, delta: float = 1e-3) -> tuple[float, float]:
  """(k, a) of L = k / C^a on the compute frontier of (c, loss) (Huber on log residuals); nan with < 2 points."""
  ok = c > 0
  keep = points.frontier_index(c[ok], loss[ok])
  c, loss = c[ok][keep], loss[ok][keep]
  if len(np.unique(c)) < 2:
    return math.nan, math.nan
  form = forms.LinearLSE((np.stack([np.ones_like(c), -np.log(c)], axis=1),))
  starts = np.array([(lk, a) for lk in (0.0, 1.0, 3.0) for a in (0.0, 0.05, 0.1, 0.3)])
  m = lbfgs.minimize_grid(starts, form, np.log(loss), delta=delta)
  return float(np.exp(m.p[0])), float(m.p[1])


def fit(agg: dict, idx: np.ndarray, delta: float = 1e-3) -> Naive:
  """The naive predictors from the fitted configurations `idx` of `agg` (sktlm.scaling.points)."""
  idx = np.asarray(idx)
  top = idx[agg['N'][idx] == agg['N'][idx].max()] if len(idx) else idx
  top = top[agg['D'][top] > 0] if (agg['D'][top] > 0).any() else top
  k, a = fit_ctrend(agg['C'][idx], agg['loss'][idx], delta) if len(idx) else (math.nan, math.nan)
  return Naive(top_n=float(agg['N'][top[0]]) if len(top) else math.nan, top_d=agg['D'][top],
               top_loss=agg['loss'][top], top_name=[str(agg['name'][i]) for i in top], k=k, a=a)


def worst(rows: list[dict], key: str) -> dict | None:
  ok = [r for r in rows if math.isfinite(r.get(key, math.nan))]
  return max(ok, key=lambda r: abs(r[key])) if ok else None


def verdict(rows: list[dict]) -> tuple[str, bool] | None:
  """A law's rows against the naive predictors: (the sentence, whether the law beats the copy by BEAT)."""
  law, copy, trend = worst(rows, 'rel_error'), worst(rows, 'copy_error'), worst(rows, 'ctrend_error')
  if law is None or copy is None:
    return None
  c, e = abs(copy['copy_error']), abs(law['rel_error'])
  ratio = c / e if e else (math.inf if c else math.nan)   # an exact copy cannot be beaten
  text = (f"worst law error {100 * law['rel_error']:+.2f}% ({law['run']}); worst copy error "
          f"{100 * copy['copy_error']:+.2f}% ({copy['run']}, copying {copy['copy_run']}, the largest fitted size at "
          f"the nearest token budget): the law beats the copy by {ratio:.3g}x")
  if trend is not None:
    text += f"; C-trend (a pure power law in C) worst error {100 * trend['ctrend_error']:+.2f}% ({trend['run']})"
  beats = bool(ratio >= BEAT)   # False for nan
  if not beats:
    text += (f'. The ladder is not testing scaling: the law does not beat copying the largest fitted size by '
             f'{BEAT:g}x')
  return text, beats

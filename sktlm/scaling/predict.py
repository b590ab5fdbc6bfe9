"""Predicted versus actual across sweeps: laws fitted on sweep A predict every configuration of sweep B.

This is what a team does when the big run finishes: `sktlm scaling RUNS_A --predict=RUNS_B`. Per
configuration of B (seed means, sktlm.scaling.points) and per law fitted on A: the prediction with its
bootstrap interval, the actual loss, the relative error predicted / actual - 1, whether the interval covers
the actual loss, and how far it extrapolates: N / (largest N of A) and C / (largest C of A).
  L(N,D) every configuration at its (N, D); L(C) the configurations on B's compute frontier, at their C;
  L(N) the best configuration of each size of B, at its N.

`sensitivity`: with E fixed, the law refitted at E x (1 - r) and E x (1 + r): how the prediction and the
lack of fit (the Huber objective) move with the assumed asymptote.
"""

from __future__ import annotations

import math

import numpy as np

from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import fit as fitlib
from sktlm.scaling import io, points

LAWS = ('L(N,D)', 'L(C)', 'L(N)')


def target_points(sweep: io.Sweep, n_key: str, loss_key: str, flops_key: str) -> tuple[dict | None, list[str]]:
  data, warnings = io.select(sweep, n_key, loss_key, flops_key)
  if not len(data['loss']):
    return None, warnings + [f'{sweep.label}: no done runs with usable values to compare predictions with']
  return points.aggregate(data, sweep.rows), warnings


def row(law: str, f: fitlib.Fit, name: str, n: float, d: float, c: float, actual: float, seed_std: float,
        n_seeds: int, n_max: float, c_max: float) -> dict | None:
  """One predicted-vs-actual row, or None where the law has no input (no C)."""
  if law == 'L(N,D)':
    x = (n, d)
  elif law == 'L(C)':
    if not c > 0:
      return None
    x = (c,)
  else:
    x = (n,)
  pred = float(f.predict(*x))
  exact_fit = f.n_points <= len(f.names) - (f.fixed_E is not None)
  lo, hi = fitlib.interval(f.predict_boot(*x)) if len(f.boot) and not exact_fit else (math.nan, math.nan)
  covered = bool(lo <= actual <= hi) if math.isfinite(lo) else None
  return dict(law=law, run=name, N=float(n), D=float(d), C=float(c), predicted=pred, ci=(lo, hi),
              actual=float(actual), seed_std=float(seed_std), n_seeds=int(n_seeds), rel_error=pred / actual - 1,
              covered=covered, n_factor=float(n / n_max), c_factor=float(c / c_max) if c > 0 else math.nan)


def compare(fits: dict, fit_agg: dict, target: dict) -> list[dict]:
  """Rows for every configuration of `target` (points.aggregate) and every law in `fits` (fitted on the
  points `fit_agg`)."""
  n_max = float(np.nanmax(fit_agg['N']))
  c_ok = fit_agg['C'][fit_agg['C'] > 0]
  c_max = float(c_ok.max()) if c_ok.size else math.nan
  out = []
  for law in LAWS:
    f = fits.get(law)
    if f is None:
      continue
    # Each law predicts what it describes: L(N,D) every configuration, L(C) the target's compute frontier,
    # L(N) the best configuration of each size.
    if law == 'L(N,D)':
      idx = range(len(target['loss']))
    elif law == 'L(C)':
      ok = np.flatnonzero(target['C'] > 0)
      idx = ok[points.frontier_index(target['C'][ok], target['loss'][ok])]
    else:
      idx = points.best_index_per_x(target['N'], target['loss'])
    for i in idx:
      r = row(law, f, target['name'][i], target['N'][i], target['D'][i], target['C'][i], target['loss'][i],
              target['loss_std'][i], target['n_seeds'][i], n_max, c_max)
      if r is not None:
        out.append(r)
  return out


def sensitivity(refit, fix_e: float, at: tuple, ratio: float = 0.25) -> list[dict]:
  """refit(E) -> Fit with E held there (no bootstrap). The prediction at `at` and the objective for E x
  (1 - ratio), E, E x (1 + ratio); a fit the data cannot support at some E is left out."""
  out = []
  for e in (fix_e * (1 - ratio), fix_e, fix_e * (1 + ratio)):
    try:
      f = refit(e)
    except fitlib.FitError:
      continue
    out.append(dict(E=float(e), predicted=float(f.predict(*at)), objective=float(f.objective)))
  return out


def summary_lines(label: str, target_label: str, rows: list[dict]) -> list[str]:
  """Per law: the worst |error| and interval coverage over the target's configurations."""
  out = []
  for law in LAWS:
    rs = [r for r in rows if r['law'] == law]
    if not rs:
      continue
    worst, cov = backtestlib.worst_and_coverage(rs)
    cov_txt = f'; {cov}' if cov else ''
    out.append(f"predict {target_label} from {label}: {law} worst error {100 * worst['rel_error']:+.2f}% "
               f"({worst['run']}, N x{worst['n_factor']:.3g}){cov_txt}")
  return out

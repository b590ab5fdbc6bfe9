"""Predicted versus actual across sweeps: laws fitted on sweep A predict every configuration of sweep B.

This is what a team does when the big run finishes: `sktlm scaling RUNS_A --predict=RUNS_B`. Per
configuration of B (seed means, sktlm.scaling.points) and per law fitted on A: the prediction with its
bootstrap interval, the actual loss, the relative error predicted / actual - 1, whether the interval covers
the actual loss, and how far it extrapolates: N / (largest N of A) and C / (largest C of A).
  each law of the registry (sktlm.scaling.laws) the configurations of B it describes (L(N,D) every
  configuration at its (N, D); L(C) the configurations on B's compute frontier, at their C; L(N) the best
  configuration of each size of B, at its N).

`sensitivity`: with E fixed, the law refitted at E x (1 - r) and E x (1 + r): how every prediction (the largest
move over the predicted points) and the lack of fit (the Huber objective) move with the assumed asymptote.
"""

from __future__ import annotations

import math

import numpy as np

from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import fit as fitlib
from sktlm.scaling import io, laws, naive, points


def target_points(sweep: io.Sweep, n_key: str, loss_key: str, flops_key: str) -> tuple[dict | None, list[str]]:
  data, warnings = io.select(sweep, n_key, loss_key, flops_key)
  if not len(data['loss']):
    return None, warnings + [f'{sweep.label}: no done runs with usable values to compare predictions with']
  return points.aggregate(points.with_row_columns(data, sweep.rows, laws.ROW_COLUMNS), sweep.rows), warnings


def row(law, f: fitlib.Fit, target: dict, i: int, n_max: float, c_max: float, nv: naive.Naive) -> dict:
  """One predicted-vs-actual row: law `law` (fitted as `f`) at configuration i of `target`, beside the naive
  predictors `nv`."""
  n, c, actual = float(target['N'][i]), float(target['C'][i]), float(target['loss'][i])
  cols = law.cols(target, i)
  pred = float(f.predict(cols))
  lo, hi = backtestlib.interval_at(f, cols)
  covered = bool(lo <= actual <= hi) if math.isfinite(lo) else None
  return dict(law=law.kind, run=target['name'][i], N=n, D=float(target['D'][i]), C=c, predicted=pred, ci=(lo, hi),
              actual=actual, seed_std=float(target['loss_std'][i]), n_seeds=int(target['n_seeds'][i]),
              rel_error=pred / actual - 1, covered=covered, n_factor=float(n / n_max),
              c_factor=float(c / c_max) if c > 0 else math.nan, interval_note=backtestlib.no_interval(f),
              **nv.columns(target['D'][i], c, actual))


def compare(fits: dict, fit_agg: dict, target: dict, delta: float = 1e-3) -> list[dict]:
  """Rows for every configuration of `target` (points.aggregate) that a law in `fits` (fitted on the points
  `fit_agg`) describes: each law predicts the points it would be fitted on (its `select`: L(N,D) every
  configuration, L(C) the target's compute frontier, L(N) the best configuration of each size)."""
  n_max = float(np.nanmax(fit_agg['N']))
  c_ok = fit_agg['C'][fit_agg['C'] > 0]
  c_max = float(c_ok.max()) if c_ok.size else math.nan
  nv = naive.fit(fit_agg, np.arange(len(fit_agg['loss'])), delta)
  out = []
  for law in laws.LAWS:
    f = fits.get(law.kind)
    if f is None or not law.applies(target):
      continue
    for i in law.select(target, np.arange(len(target['loss']))):
      out.append(row(law, f, target, i, n_max, c_max, nv))
  return out


def sensitivity(refit, fix_e: float, points: list[tuple[str, dict]], ratio: float = 0.25) -> list[dict]:
  """refit(E) -> Fit with E held there (no bootstrap). For E x (1 - ratio), E, E x (1 + ratio): the objective,
  the prediction at every point (name, columns), and the largest move of any of them from its prediction at E,
  relative, with the point it moved most; a fit the data cannot support at some E is left out."""
  out = []
  for e in (fix_e * (1 - ratio), fix_e, fix_e * (1 + ratio)):
    try:
      f = refit(e)
    except fitlib.FitError:
      continue
    out.append(dict(E=float(e), objective=float(f.objective), predicted=[float(f.predict(c)) for _, c in points]))
  base = next((r['predicted'] for r in out if r['E'] == fix_e), None)
  for r in out:
    moves = [p / b - 1 for p, b in zip(r['predicted'], base, strict=True)] if base else []
    i = int(np.argmax(np.abs(moves))) if moves else 0
    r['max_move'] = float(moves[i]) if moves else math.nan
    r['max_move_run'] = points[i][0] if moves else ''
  return out


def summary_lines(label: str, target_label: str, rows: list[dict]) -> list[str]:
  """Per law: the worst |error| and interval coverage over the target's configurations."""
  out = []
  for law in (law.kind for law in laws.LAWS):
    rs = [r for r in rows if r['law'] == law]
    if not rs:
      continue
    worst, cov = backtestlib.worst_and_coverage(rs)
    cov_txt = f'; {cov}' if cov else ''
    out.append(f"predict {target_label} from {label}: {law} worst error {100 * worst['rel_error']:+.2f}% "
               f"({worst['run']}, N x{worst['n_factor']:.3g}){cov_txt}")
    judged = naive.verdict(rs)
    if judged:
      out.append(f'predict {target_label} from {label}: {law} against knowing nothing: {judged[0]}')
  return out

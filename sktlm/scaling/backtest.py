"""Backtests: fit each law on all but the K largest sizes (or compute budgets) and predict the held-out runs.

A scaling law is for predicting the next, larger run; a backtest measures how well it does that on the runs
at hand. Sizes are the distinct N of a size ladder; budgets are the compute groups of an IsoFLOP sweep (then
the held-out unit is a budget, and the K largest budgets are left out). Points are per-configuration seed
means (sktlm.scaling.points), and bootstrap intervals resample the fitted points (sizes, not seeds).

Every law of the registry (sktlm.scaling.laws) that was fitted on all points is refitted on the remaining
ones (its own point selection and asymptote policy) and asked for the held-out points it describes (its
`targets`: e.g. L(N) the best configuration of each held-out size, L(N,D) every held-out configuration). Per
held-out point and law: the prediction with its bootstrap interval, the actual loss (seed mean, and the seed
spread when there are several) and the relative error predicted / actual - 1, beside the predictors that know
nothing about scale (sktlm.scaling.naive: copy the largest fitted size, a pure power law in C), fitted on the
same runs. A law may mark its rows as a diagnostic rather than a prediction target, with the reason
(`Law.backtest_note`: L(C) on a fixed-budget grid).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.scaling import fit as fitlib
from sktlm.scaling import isoflop, laws, naive

MIN_TRAIN_UNITS = 3  # a 3-parameter law needs >= 3 distinct sizes (or budgets) to fit on


@dataclasses.dataclass
class Backtest:
  k: int
  unit: str                          # 'size' or 'budget'
  held_out: list[float]              # the held-out N (sizes) or C (budgets)
  train: np.ndarray                  # bool per aggregated point: used for the backtest fits
  fits: dict                         # kind -> Fit or None
  rows: list[dict]                   # per law and held-out point, with the naive predictors' columns (naive.py)
  warnings: list[str] = dataclasses.field(default_factory=list)
  naive: naive.Naive | None = None

  def to_json(self) -> dict:
    nv = self.naive
    return dict(k=self.k, unit=self.unit, held_out=self.held_out,
                fits={k: (f.to_json() if f is not None else None) for k, f in self.fits.items()},
                rows=self.rows, warnings=self.warnings,
                naive=None if nv is None else dict(copy_N=nv.top_n, ctrend=dict(k=nv.k, a=nv.a)))


def units(agg: dict, by_budget: bool, gap: float) -> tuple[np.ndarray, np.ndarray]:
  """(unit value per aggregated point, distinct unit values sorted): N per size, or the budget C."""
  if not by_budget:
    return agg['N'], np.unique(agg['N'])
  ids, budgets = isoflop.group_budgets(agg['C'], agg['budget'], gap)
  per_point = budgets[ids]
  return per_point, np.unique(budgets)


def choose_k(requested: int, n_units: int) -> int:
  """-1 (auto): 1 when there are >= MIN_TRAIN_UNITS + 1 units, else 0 (no backtest)."""
  if requested >= 0:
    return requested
  return 1 if n_units >= MIN_TRAIN_UNITS + 1 else 0


def no_interval(f: fitlib.Fit) -> str:
  """Why a fit gives no prediction interval ('' when it does). With n_params + 1 points or fewer, most bootstrap
  resamples hold at most n_params distinct points (4 of 4 all distinct: 4!/4^4 = 9%), so the refits interpolate
  their resample and the percentile interval measures which points were drawn, not the fit's uncertainty."""
  if f.n_points < f.n_free + 2:
    return f'no interval: {f.n_points} points for {f.n_free} parameters'
  return ''


def interval_at(f: fitlib.Fit, cols: dict) -> tuple[float, float]:
  """The bootstrap interval of a prediction; (nan, nan) without a bootstrap or where `no_interval` says why."""
  return (math.nan, math.nan) if no_interval(f) or not len(f.boot) else fitlib.interval(f.predict_boot(cols))


def run(agg: dict, k: int, *, by_budget: bool, gap: float, n_boot: int, seed: int, delta: float,
        kinds=None, fix_E: float | None = None) -> Backtest | None:
  """The backtest of one sweep (the laws in `kinds`, those fitted on all points; None: every law), or None for
  k = 0. fix_E: the laws whose policy takes it hold E at this value. Raises fitlib.FitError when too few units
  remain."""
  if k <= 0:
    return None
  unit_of, distinct = units(agg, by_budget, gap)
  unit = 'budget' if by_budget else 'size'
  if len(distinct) - k < MIN_TRAIN_UNITS:
    raise fitlib.FitError(f'backtest holding out {k} {unit}(s) leaves {len(distinct) - k} of {len(distinct)}; '
                          f'it needs >= {MIN_TRAIN_UNITS} to fit on')
  held = distinct[-k:]
  held_mask = np.isin(unit_of, held)
  train = ~held_mask
  d = agg['D']
  bt = Backtest(k=k, unit=unit, held_out=[float(v) for v in held], train=train, fits={}, rows=[])
  train_idx, held_idx = np.flatnonzero(train), np.flatnonzero(held_mask)
  for law in laws.LAWS:
    if (kinds is not None and law.kind not in kinds) or (by_budget and law.per_size):
      continue
    idx = law.select(agg, train_idx)
    fix = fix_E if law.takes_fixed_e(agg, train_idx) else None
    fitlib.try_fit(bt.fits, bt.warnings, law.kind,
                   lambda law=law, idx=idx, fix=fix: law.fit(law.cols(agg, idx), agg['loss'][idx], n_boot=n_boot,
                                                             seed=seed, delta=delta, fix_E=fix), 'backtest ')
  bt.naive = naive.fit(agg, train_idx, delta)
  for law in laws.LAWS:
    f = bt.fits.get(law.kind)
    if f is None:
      continue
    note = None if by_budget else law.backtest_note(d[train], d[held_mask])
    for i in law.targets(agg, held_idx, unit_of):
      cols = law.cols(agg, i)
      pred = float(f.predict(cols))
      lo, hi = interval_at(f, cols)
      actual = float(agg['loss'][i])
      bt.rows.append(dict(law=law.kind, run=agg['name'][i], N=float(agg['N'][i]), D=float(d[i]),
                          C=float(agg['C'][i]), predicted=pred, ci=(lo, hi), actual=actual,
                          seed_std=float(agg['loss_std'][i]), n_seeds=int(agg['n_seeds'][i]),
                          rel_error=pred / actual - 1, covered=bool(lo <= actual <= hi) if math.isfinite(lo) else None,
                          target=note is None, note=note, interval_note=no_interval(f),
                          **bt.naive.columns(d[i], agg['C'][i], actual)))
  return bt


def headline(label: str, bt: Backtest) -> list[str]:
  """One line per law for the largest held-out point, then, where a law predicted several held-out points,
  its worst error and how many of its intervals cover the actual loss: what a user reads first."""
  out = []
  what = (f'without the {bt.k} largest size(s)' if bt.unit == 'size'
          else f'without the {bt.k} largest compute budget(s)')
  for law in laws.LAWS:
    kind = law.kind
    rows = [r for r in bt.rows if r['law'] == kind]
    if not rows:
      continue
    if not all(r.get('target', True) for r in rows):
      r = max(rows, key=lambda r: r['N'])
      out.append(f"backtest {label}: {kind} {rows[0]['note']}. The grid-frontier law extrapolated anyway: "
                 f"{r['predicted']:.4g} for {r['run']}, actual {r['actual']:.4g} ({100 * r['rel_error']:+.2f}%)")
      continue
    r = max(rows, key=lambda r: (r['C'] if bt.unit == 'budget' else r['N'], -r['actual']))
    ci = (f" [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}]" if all(math.isfinite(v) for v in r['ci'])
          else f" ({r['interval_note']})" if r.get('interval_note') else '')
    spread = f" +- {r['seed_std']:.2g} over {r['n_seeds']} seeds" if r['n_seeds'] > 1 else ''
    out.append(f"backtest {label}: {kind} fitted {what} predicts {r['run']} (N={r['N']:.3g}) at "
               f"{r['predicted']:.4g}{ci}; actual {r['actual']:.4g}{spread}: error {100 * r['rel_error']:+.2f}%")
    if len(rows) > 1:
      worst, cov = worst_and_coverage(rows)
      cov_txt = f', {cov}' if cov else ''
      out.append(f"backtest {label}: {kind} on all {len(rows)} held-out points: worst error "
                 f"{100 * worst['rel_error']:+.2f}% ({worst['run']}){cov_txt}")
    judged = naive.verdict(rows)
    if judged:
      out.append(f'backtest {label}: {kind} against knowing nothing: {judged[0]}')
  return out


def worst_and_coverage(rows: list[dict]) -> tuple[dict, str]:
  """The row of the largest |rel_error| and 'interval covers k of n' over the rows that have an interval."""
  worst = max(rows, key=lambda r: abs(r['rel_error']))
  cov = [r['covered'] for r in rows if r['covered'] is not None]
  return worst, (f'interval covers {sum(cov)} of {len(cov)}' if cov else '')

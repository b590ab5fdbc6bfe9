"""Backtests: fit each law on all but the K largest sizes (or compute budgets) and predict the held-out runs.

A scaling law is for predicting the next, larger run; a backtest measures how well it does that on the runs
at hand. Sizes are the distinct N of a size ladder; budgets are the compute groups of an IsoFLOP sweep (then
the held-out unit is a budget, and the K largest budgets are left out). Points are per-configuration seed
means (sktlm.scaling.points), and bootstrap intervals resample the fitted points (sizes, not seeds).

Per held-out point and law: the prediction with its bootstrap interval, the actual loss (seed mean, and the
seed spread when there are several) and the relative error predicted / actual - 1.
  L(N): the best configuration of each held-out size, at its N (size ladders only);
  L(C): the same points (or, for budgets, the best run of each held-out budget), at their C;
  L(N,D): every held-out configuration, at its (N, D).

L(C) is a law of the compute-optimal frontier. On a ladder whose held-out size trains only token budgets
the fitted sizes trained too (fixed budgets, WSD branches), the held-out size adds compute through N alone:
the frontier it extends is D-limited (it tends to E + B / D_max^beta as N grows, not to E), so L(C) has
nothing of its own to predict there. Its rows are kept, marked `target=False` with the reason, and reported as
a diagnostic; L(N,D) is the law such a ladder tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.scaling import fit as fitlib
from sktlm.scaling import points

MIN_TRAIN_UNITS = 3  # a 3-parameter law needs >= 3 distinct sizes (or budgets) to fit on


@dataclasses.dataclass
class Backtest:
  k: int
  unit: str                          # 'size' or 'budget'
  held_out: list[float]              # the held-out N (sizes) or C (budgets)
  train: np.ndarray                  # bool per aggregated point: used for the backtest fits
  fits: dict                         # kind -> Fit or None
  rows: list[dict]
  warnings: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dict(k=self.k, unit=self.unit, held_out=self.held_out,
                fits={k: (f.to_json() if f is not None else None) for k, f in self.fits.items()},
                rows=self.rows, warnings=self.warnings)


def units(agg: dict, by_budget: bool, gap: float) -> tuple[np.ndarray, np.ndarray]:
  """(unit value per aggregated point, distinct unit values sorted): N per size, or the budget C."""
  if not by_budget:
    return agg['N'], np.unique(agg['N'])
  ids, budgets = fitlib.group_budgets(agg['C'], agg['budget'], gap)
  per_point = budgets[ids]
  return per_point, np.unique(budgets)


def choose_k(requested: int, n_units: int) -> int:
  """-1 (auto): 1 when there are >= MIN_TRAIN_UNITS + 1 units, else 0 (no backtest)."""
  if requested >= 0:
    return requested
  return 1 if n_units >= MIN_TRAIN_UNITS + 1 else 0


def run(agg: dict, k: int, *, by_budget: bool, gap: float, n_boot: int, seed: int, delta: float,
        kinds=('L(N)', 'L(C)', 'L(N,D)'), fix_E: float | None = None) -> Backtest | None:
  """The backtest of one sweep (the laws in `kinds`: those fitted on all points), or None for k = 0.
  fix_E: the laws hold E at this value. Raises fitlib.FitError when too few units remain."""
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
  n, d, c, loss = agg['N'], agg['D'], agg['C'], agg['loss']
  common = dict(n_boot=n_boot, seed=seed, delta=delta, fix_E=fix_E)
  bt = Backtest(k=k, unit=unit, held_out=[float(v) for v in held], train=train, fits={}, rows=[])
  lc_note = d_limited_note(d[train], d[held_mask]) if not by_budget else None

  def attempt(kind, fn):
    if kind in kinds:
      fitlib.try_fit(bt.fits, bt.warnings, kind, fn, 'backtest ')

  tn, tl = n[train], loss[train]
  if not by_budget:
    attempt('L(N)', lambda: fitlib.fit_power_law(*points.best_per_x(tn, tl), kind='L(N)',
                                                  **{**common, 'fix_E': None}))  # its asymptote is not E
  c_ok = train & (c > 0)
  if c_ok.any():
    # A D-limited frontier's asymptote is not E: a fixed E does not apply to it.
    lc_common = {**common, 'fix_E': None} if lc_note else common
    attempt('L(C)', lambda: fitlib.fit_power_law(*points.frontier_points(c[c_ok], loss[c_ok]), kind='L(C)',
                                                  **lc_common))
  d_ok = train & (d > 0)
  attempt('L(N,D)', lambda: fitlib.fit_parametric(n[d_ok], d[d_ok], loss[d_ok], **common))

  # The reference points of L(N) and L(C): the best held-out configuration of each held-out unit.
  held_idx = np.flatnonzero(held_mask)
  best = held_idx[points.best_index_per_x(unit_of[held_idx], loss[held_idx])]
  for kind, idx in (('L(N)', best), ('L(C)', best), ('L(N,D)', held_idx)):
    f = bt.fits.get(kind)
    if f is None:
      continue
    for i in idx:
      if kind == 'L(N)':
        x = (n[i],)
      elif kind == 'L(C)':
        if not c[i] > 0:
          continue
        x = (c[i],)
      else:
        x = (n[i], d[i])
      pred = float(f.predict(*x))
      # A law with as many parameters as points interpolates them: its bootstrap spread means nothing.
      exact_fit = f.n_points <= len(f.names) - (f.fixed_E is not None)
      lo, hi = fitlib.interval(f.predict_boot(*x)) if len(f.boot) and not exact_fit else (math.nan, math.nan)
      actual = float(loss[i])
      bt.rows.append(dict(law=kind, run=agg['name'][i], N=float(n[i]), D=float(d[i]), C=float(c[i]),
                          predicted=pred, ci=(lo, hi), actual=actual, seed_std=float(agg['loss_std'][i]),
                          n_seeds=int(agg['n_seeds'][i]), rel_error=pred / actual - 1,
                          covered=bool(lo <= actual <= hi) if math.isfinite(lo) else None,
                          target=not (kind == 'L(C)' and lc_note), note=lc_note if kind == 'L(C)' else None))
  return bt


def shared_largest_budget(n: np.ndarray, d: np.ndarray) -> bool:
  """Whether >= 3 sizes train the sweep's largest D (a fixed-budget grid, whose compute frontier ends
  D-limited at E + B/D_max^beta; a fixed E does not apply to its L(C))."""
  ok = d > 0
  if not ok.any():
    return False
  top = d[ok] >= d[ok].max() / 1.01
  return len(np.unique(n[ok][top])) >= MIN_TRAIN_UNITS


def d_limited_note(d_train: np.ndarray, d_held: np.ndarray) -> str | None:
  """Why L(C) is no prediction target, when the held-out sizes train no token budget beyond the fitted ones."""
  d_train, d_held = d_train[d_train > 0], d_held[d_held > 0]
  if not len(d_train) or not len(d_held) or d_held.max() > d_train.max() * 1.01:
    return None
  return (f'diagnostic, not a prediction target: the held-out size trains the fitted sizes\' token budgets '
          f'(D <= {d_train.max():.3g}), so its compute comes from N alone and the frontier it extends is '
          f'D-limited (-> E + B/D_max^beta, not E); L(N,D) predicts these runs')


def headline(label: str, bt: Backtest) -> list[str]:
  """One line per law for the largest held-out point, then, where a law predicted several held-out points,
  its worst error and how many of its intervals cover the actual loss: what a user reads first."""
  out = []
  what = (f'without the {bt.k} largest size(s)' if bt.unit == 'size'
          else f'without the {bt.k} largest compute budget(s)')
  for kind in ('L(N)', 'L(C)', 'L(N,D)'):
    rows = [r for r in bt.rows if r['law'] == kind]
    if not rows:
      continue
    if not all(r.get('target', True) for r in rows):
      r = max(rows, key=lambda r: r['N'])
      out.append(f"backtest {label}: {kind} {rows[0]['note']}. The grid-frontier law extrapolated anyway: "
                 f"{r['predicted']:.4g} for {r['run']}, actual {r['actual']:.4g} ({100 * r['rel_error']:+.2f}%)")
      continue
    r = max(rows, key=lambda r: (r['C'] if bt.unit == 'budget' else r['N'], -r['actual']))
    ci = '' if not all(math.isfinite(v) for v in r['ci']) else f" [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}]"
    spread = f" +- {r['seed_std']:.2g} over {r['n_seeds']} seeds" if r['n_seeds'] > 1 else ''
    out.append(f"backtest {label}: {kind} fitted {what} predicts {r['run']} (N={r['N']:.3g}) at "
               f"{r['predicted']:.4g}{ci}; actual {r['actual']:.4g}{spread}: error {100 * r['rel_error']:+.2f}%")
    if len(rows) > 1:
      worst, cov = worst_and_coverage(rows)
      cov_txt = f', {cov}' if cov else ''
      out.append(f"backtest {label}: {kind} on all {len(rows)} held-out points: worst error "
                 f"{100 * worst['rel_error']:+.2f}% ({worst['run']}){cov_txt}")
  return out


def worst_and_coverage(rows: list[dict]) -> tuple[dict, str]:
  """The row of the largest |rel_error| and 'interval covers k of n' over the rows that have an interval."""
  worst = max(rows, key=lambda r: abs(r['rel_error']))
  cov = [r['covered'] for r in rows if r['covered'] is not None]
  return worst, (f'interval covers {sum(cov)} of {len(cov)}' if cov else '')

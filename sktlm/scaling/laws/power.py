"""One-variable laws L(X) = E + A / X^alpha (Kaplan et al. 2020): L(N) on the best run of each size, L(C) on the
compute frontier (runs with a lower loss than every one using less compute).

L(C) is a law of compute-optimal points. On a grid whose sizes share their largest token budget (fixed budgets,
WSD branches) the frontier's top is D-limited: it tends to E + B / D_max^beta as N grows, not to E, so a fixed E
does not apply to it; and a held-out size that trains only the fitted sizes' budgets adds compute through N
alone, so L(C) has nothing of its own to predict there (its backtest rows are a diagnostic). L(N) is fitted at
the sweep's token budgets: its asymptote is E + B / D^beta, never E.
"""

from __future__ import annotations

import itertools

import numpy as np

from sktlm.scaling import fit as fitlib
from sktlm.scaling import lbfgs, points
from sktlm.scaling.laws import base

MIN_SIZES = 3  # a grid shares its largest budget when >= this many sizes train it


def grid_1d() -> np.ndarray:
  """Starts (a, e, alpha) for one-variable laws; finer in small alpha (L(C) exponents are ~0.05-0.2)."""
  a = np.arange(0.0, 25.1, 5.0)
  e = np.arange(-1.0, 1.01, 0.5)
  alpha = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 1.5, 2.0])
  return np.array([(ai, ei, al) for ai, ei, al in itertools.product(a, e, alpha)])


class PowerLaw(base.Law):
  formula = 'E + A / X^alpha'
  names = ('E', 'A', 'alpha')
  e_index = 1                      # engine parameters (a, e, alpha): log A, log E, alpha

  def check(self, cols, loss):
    n_distinct = len(np.unique(cols[self.columns[0]]))
    if n_distinct < self.min_distinct:
      raise fitlib.FitError(f'{self.kind} needs at least {self.min_distinct} distinct values of the variable, '
                            f'got {n_distinct}')

  def form(self, cols):
    return lbfgs.PowerSum(np.log(cols[self.columns[0]])[:, None])

  def starts(self, cols, loss):
    return grid_1d()

  def to_named(self, p):
    return np.stack([np.exp(p[..., 1]), np.exp(p[..., 0]), p[..., 2]], axis=-1)

  def predict(self, get, cols):
    return get('E') + get('A') / np.power(cols[self.columns[0]], get('alpha'))

  def warnings(self, values, cols, loss, e_fixed):
    return fitlib.exponent_warnings(self.kind, values, loss, ('alpha',), e_fixed)

  def label(self, values):
    return f"L = {values['E']:.3g} + {values['A']:.3g} / {self.columns[0]}^{values['alpha']:.3f}"


class SizeLaw(PowerLaw):
  kind = 'L(N)'
  columns = ('N',)
  points_doc = 'best run per N'
  e_policy = 'own'
  asymptote_doc = "L(N) keeps its own asymptote (at the sweep's token budgets it is E + B/D^beta)."
  per_size = True
  target_note = 'at the token budgets of the sweep'

  def select(self, pts, idx):
    idx = super().select(pts, idx)
    return idx[points.best_index_per_x(pts['N'][idx], pts['loss'][idx])]

  def targets(self, pts, idx, unit_of):
    return base.best_per_size(pts, idx, unit_of)


class ComputeLaw(PowerLaw):
  kind = 'L(C)'
  columns = ('C',)
  points_doc = 'compute-frontier runs'
  e_policy = 'grid'
  asymptote_doc = ('L(C) keeps it free on a grid whose sizes share their largest token budget, where its frontier '
                   'ends D-limited')

  def applies(self, pts):
    return bool((pts['C'] > 0).any())

  def select(self, pts, idx):
    idx = super().select(pts, idx)
    return idx[points.frontier_index(pts['C'][idx], pts['loss'][idx])]

  def targets(self, pts, idx, unit_of):
    best = base.best_per_size(pts, idx, unit_of)
    return best[pts['C'][best] > 0]

  def takes_fixed_e(self, pts, idx):
    return not shared_largest_budget(pts['N'][idx], pts['D'][idx])

  def backtest_note(self, d_train, d_held):
    return d_limited_note(d_train, d_held)


def shared_largest_budget(n: np.ndarray, d: np.ndarray) -> bool:
  """Whether >= 3 sizes train the points' largest D (a fixed-budget grid, whose compute frontier ends
  D-limited at E + B/D_max^beta)."""
  ok = d > 0
  if not ok.any():
    return False
  top = d[ok] >= d[ok].max() / 1.01
  return len(np.unique(n[ok][top])) >= MIN_SIZES


def d_limited_note(d_train: np.ndarray, d_held: np.ndarray) -> str | None:
  """Why L(C) is no prediction target, when the held-out sizes train no token budget beyond the fitted ones."""
  d_train, d_held = d_train[d_train > 0], d_held[d_held > 0]
  if not len(d_train) or not len(d_held) or d_held.max() > d_train.max() * 1.01:
    return None
  return (f'diagnostic, not a prediction target: the held-out size trains the fitted sizes\' token budgets '
          f'(D <= {d_train.max():.3g}), so its compute comes from N alone and the frontier it extends is '
          f'D-limited (-> E + B/D_max^beta, not E); L(N,D) predicts these runs')


SIZE = SizeLaw()
COMPUTE = ComputeLaw()
LAWS = (SIZE, COMPUTE)

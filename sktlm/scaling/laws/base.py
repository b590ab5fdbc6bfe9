"""What a scaling law of the registry declares (sktlm.scaling.laws): its columns, which points it is fitted on
and predicts, what a fixed asymptote (--fix_E) does to it, its form for the one fitting engine
(sktlm.scaling.fit.fit_law) and its prediction. Analysis, backtest, --predict, the report and the plots only
ever ask a law these questions.

Points are per-configuration dicts of arrays (sktlm.scaling.points.aggregate): N, D, C, loss, and any column a
law reads from the results rows (`row_columns`).
"""

from __future__ import annotations

import numpy as np

from sktlm.scaling import fit as fitlib
from sktlm.scaling import points


class Law:
  kind: str = ''                   # its name in every table, plot and fits.json: 'L(N)'
  formula: str = ''                # the report's fit section: laws with the same formula share a sentence
  points_doc: str = ''             # which points it is fitted on, in the report's words ('best run per N')
  columns: tuple[str, ...] = ()    # point columns it reads, in predict()'s positional order
  row_columns: dict = {}           # point column -> results column, for columns beyond N, D, C
  names: tuple[str, ...] = ()      # parameters, in report order; 'E' is the asymptote
  e_index: int = 0                 # position of log E among the engine's parameters (held with --fix_E)
  min_distinct: int = 3            # a bootstrap resample with fewer distinct points is dropped
  # --fix_E: 'fixed' holds E at the given value; 'own' never (the law's asymptote is not E); 'grid' holds it
  # unless the fitted points form a grid that shares its largest token budget (sktlm.scaling.laws.power).
  e_policy: str = 'fixed'
  asymptote_doc: str = ''          # the report's sentence on why an 'own' / 'grid' law treats E so
  per_size: bool = False           # a law of model sizes: not backtested by held-out compute budgets
  target_note: str = ''            # what a --target_* prediction of it means, when not the obvious
  allocates: bool = False          # gives the compute-optimal N and D at a budget (optimal(), allocation_defined())

  # ------------------------------------------------------------------------------------- which points

  def applies(self, pts: dict) -> bool:
    """Whether the sweep records what the law reads beyond N, D and C (a law without its columns is not
    attempted, so a sweep that never records them gets no warning about it)."""
    return all(c in pts and np.isfinite(pts[c]).any() for c in self.row_columns)

  def select(self, pts: dict, idx: np.ndarray) -> np.ndarray:
    """The points (among `idx`) it is fitted on, and that it predicts in another sweep: every one whose
    columns are positive."""
    ok = np.all([pts[c][idx] > 0 for c in self.columns], axis=0)
    return idx[ok]

  def targets(self, pts: dict, idx: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
    """The held-out points (among `idx`) a backtest asks it for."""
    return self.select(pts, idx)

  def takes_fixed_e(self, pts: dict, idx: np.ndarray) -> bool:
    return self.e_policy == 'fixed'

  def backtest_note(self, d_train: np.ndarray, d_held: np.ndarray) -> str | None:
    """Why its backtest rows are a diagnostic rather than a prediction target (None: they are targets)."""
    return None

  def cols(self, pts: dict, idx) -> dict:
    return {c: pts[c][idx] for c in self.columns}

  # ------------------------------------------------------------------------------------------- the fit

  def check(self, cols: dict, loss: np.ndarray) -> None:
    """Raise fitlib.FitError when the points cannot support the fit."""

  def form(self, cols: dict):
    raise NotImplementedError

  def starts(self, cols: dict, loss: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def to_named(self, p: np.ndarray) -> np.ndarray:
    """Engine parameters (..., P) -> values in `names` order (..., len(names))."""
    raise NotImplementedError

  def predict(self, get, cols: dict):
    """The loss at `cols`; get(name) gives a parameter (a float, or an array of bootstrap values)."""
    raise NotImplementedError

  def warnings(self, values: dict, cols: dict, loss: np.ndarray, e_fixed: bool) -> list[str]:
    return []

  def fit(self, cols: dict, loss, **kw) -> fitlib.Fit:
    return fitlib.fit_law(self, cols, loss, **kw)

  def label(self, values: dict) -> str:
    """The fitted law in a plot legend."""
    return self.kind


def best_per_size(pts: dict, idx: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
  """The lowest-loss point of each distinct unit (size or budget) among `idx`, in increasing unit."""
  return idx[points.best_index_per_x(unit_of[idx], pts['loss'][idx])]

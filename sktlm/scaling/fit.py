"""Fitting any law of the registry (sktlm.scaling.laws) with the one engine, and what a fit carries.

`fit_law(law, cols, loss)`: the law's checks, then the summed Huber loss (delta=1e-3, Hoffmann et al. 2022) of
log-space residuals minimised from the law's start grid (sktlm.scaling.lbfgs: batched L-BFGS, the best end
points polished by scipy L-BFGS-B, best kept), then seeded bootstrap refits that resample the fitted points.
With `fix_E` the asymptote is held at that value (the law's log E parameter is frozen at it).

Too few points, constant losses and bad data raise FitError (a UserError); fits that ran but are suspect
(not converged, exponent at a degenerate value, E collapsed to 0) carry `warnings` for the report.
Intervals are 95% percentile intervals over the bootstrap refits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import lbfgs

CI_LEVEL = 0.95


class FitError(UserError):
  """The data cannot support the requested fit."""


def interval(samples: np.ndarray) -> tuple[float, float]:
  samples = np.asarray(samples, dtype=np.float64)
  samples = samples[np.isfinite(samples)]
  if samples.size < 2:
    return (float('nan'), float('nan'))
  q = 100 * (1 - CI_LEVEL) / 2
  lo, hi = np.percentile(samples, [q, 100 - q])
  return float(lo), float(hi)


# A parameter is not identified by the runs when its 95% interval spans more than this factor (upper / lower, for a
# positive parameter; lower / upper for a negative one) or crosses 0: the runs do not pin it, and its fitted value is
# not a measurement (e.g. A of L(N) on the default ladder: [2.2, 4.8e167]).
MAX_SPAN = 1e2


def identified(lo: float, hi: float) -> bool:
  """Whether an interval pins its parameter (MAX_SPAN); True without an interval (nothing to judge)."""
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return True
  if lo > 0:
    return hi / lo <= MAX_SPAN
  if hi < 0:
    return lo / hi <= MAX_SPAN
  return lo == hi


@dataclasses.dataclass
class Fit:
  """A fitted law; `values` and `boot` (bootstrap refits) are in `names` order (the law's parameters)."""
  kind: str                    # the law's name: 'L(N)', 'L(C)', 'L(N,D)', ...
  names: tuple[str, ...]       # e.g. ('E', 'A', 'alpha') or ('E', 'A', 'B', 'alpha', 'beta')
  values: dict[str, float]
  boot: np.ndarray             # (B, len(names))
  n_points: int
  objective: float             # summed Huber loss at the optimum
  converged: bool
  n_starts: int
  warnings: list[str] = dataclasses.field(default_factory=list)
  n_boot_dropped: int = 0
  fixed_E: float | None = None   # the asymptote was held at this value (not fitted)
  law: object = None             # the registry entry (sktlm.scaling.laws.base.Law): its prediction

  def ci(self, name: str) -> tuple[float, float]:
    return interval(self.boot[:, self.names.index(name)])

  def not_identified(self) -> list[str]:
    return [n for n in self.names if not identified(*self.ci(n))]

  @property
  def n_free(self) -> int:
    """Parameters fitted (a fixed E is not)."""
    return len(self.names) - (self.fixed_E is not None)

  def _cols(self, args, cast) -> dict:
    """predict({'N': n, 'D': d}) or predict(n, d): positional values are the law's columns in order."""
    if len(args) == 1 and isinstance(args[0], dict):
      return {k: cast(v) for k, v in args[0].items()}
    return {k: cast(v) for k, v in zip(self.law.columns, args, strict=False) if v is not None}

  def _eval(self, v: dict | np.ndarray, cols: dict):
    get = (lambda n: v[n]) if isinstance(v, dict) else (lambda n: v[..., self.names.index(n)])
    with np.errstate(over='ignore', invalid='ignore'):  # a wild bootstrap refit: inf/nan, dropped by interval()
      return self.law.predict(get, cols)

  def predict(self, *args):
    """Point prediction (floats or arrays) at the law's columns."""
    return self._eval(self.values, self._cols(args, lambda x: np.asarray(x, dtype=np.float64)))

  def predict_boot(self, *args) -> np.ndarray:
    """Bootstrap predictions at one point: (B,)."""
    return self._eval(self.boot, self._cols(args, float))

  def to_json(self) -> dict:
    return dict(kind=self.kind, values=self.values, ci={n: self.ci(n) for n in self.names},
                ci_level=CI_LEVEL, n_points=self.n_points, objective=self.objective, converged=self.converged,
                n_starts=self.n_starts, n_boot=int(len(self.boot)), n_boot_dropped=self.n_boot_dropped,
                fixed_E=self.fixed_E, not_identified=self.not_identified(), warnings=self.warnings)


def check_points(kind: str, cols: dict[str, np.ndarray], loss: np.ndarray):
  for name, v in list(cols.items()) + [('loss', loss)]:
    bad = ~(np.isfinite(v) & (v > 0))
    if bad.any():
      raise FitError(f'{kind}: {int(bad.sum())} point(s) with non-positive or non-finite {name}; '
                     'the loader should have dropped them')
  if len(loss) and np.ptp(np.log(loss)) < 1e-12:
    raise FitError(f'{kind}: all {len(loss)} losses are equal ({loss[0]:.6g}); nothing to fit')


def exponent_warnings(kind: str, values: dict[str, float], loss: np.ndarray, exps: tuple[str, ...],
                      e_fixed: bool = False):
  out = []
  for name in exps:
    v = values[name]
    if v < 0:
      out.append(f'{kind}: {name} = {v:.3g} < 0: loss grows with the variable; check the runs')
    elif v < 0.02:
      out.append(f'{kind}: {name} = {v:.3g} is ~0: the term is flat and trades off against E (boundary fit)')
    elif v > 3:
      out.append(f'{kind}: {name} = {v:.3g} is implausibly large (boundary fit); more spread in the data?')
  if not e_fixed and values['E'] < 1e-3 * float(loss.min()):
    out.append(f"{kind}: E = {values['E']:.3g} collapsed to ~0: no irreducible loss resolved (pure power law)")
  return out


def _finish_warnings(kind: str, m: lbfgs.Minimum, n_boot: int, n_dropped: int, n_points: int, n_params: int):
  out = []
  if not m.converged:
    out.append(f'{kind}: the optimiser did not converge ({m.message.strip()})')
  if n_points == n_params:
    out.append(f'{kind}: {n_points} points for {n_params} parameters: the law interpolates them; '
               'intervals are not meaningful')
  if n_boot and n_dropped > 0.1 * n_boot:
    out.append(f'{kind}: {n_dropped} of {n_boot} bootstrap resamples were unusable (too few distinct points)')
  return out


def _fixed_e_starts(starts: np.ndarray, e_col: int, fix_e: float | None) -> np.ndarray:
  """The start grid with log E pinned to log(fix_e) (duplicates removed), or unchanged when E is free."""
  if fix_e is None:
    return starts
  out = starts.copy()
  out[:, e_col] = np.log(fix_e)
  return np.unique(out, axis=0)


def _check_fix_e(kind: str, fix_e: float | None, loss: np.ndarray):
  if fix_e is None:
    return
  if not 0 < fix_e < float(loss.min()):
    raise FitError(f'{kind}: a fixed E must lie in (0, the lowest loss {float(loss.min()):.4g}), got {fix_e}')


def fit_law(law, cols: dict[str, np.ndarray], loss: np.ndarray, *, n_boot: int = 200, seed: int = 0,
            delta: float = 1e-3, fix_E: float | None = None, starts: np.ndarray | None = None) -> Fit:
  """Fit `law` (sktlm.scaling.laws.base.Law) on points given as its columns and their losses.
  fix_E: hold the asymptote at this value (fit the other parameters)."""
  kind = law.kind
  cols = {k: np.asarray(cols[k], dtype=np.float64) for k in law.columns}
  loss = np.asarray(loss, dtype=np.float64)
  check_points(kind, cols, loss)
  _check_fix_e(kind, fix_E, loss)
  law.check(cols, loss)
  form, ly = law.form(cols), np.log(loss)
  frozen = (law.e_index,) if fix_E is not None else ()
  grid = _fixed_e_starts(law.starts(cols, loss) if starts is None else starts, law.e_index, fix_E)
  m = lbfgs.minimize_grid(grid, form, ly, delta=delta, frozen=frozen)
  boot_p, dropped = (lbfgs.bootstrap(m.candidates, form, ly, n_boot, np.random.default_rng(seed), delta=delta,
                                     min_distinct=law.min_distinct, frozen=frozen)
                     if n_boot else (np.zeros((0, len(m.p))), 0))
  values = dict(zip(law.names, map(float, law.to_named(m.p)), strict=True))
  fit = Fit(kind=kind, names=law.names, values=values, boot=law.to_named(boot_p), n_points=len(loss),
            objective=m.fun, converged=m.converged, n_starts=m.n_starts, n_boot_dropped=dropped, law=law)
  fit.fixed_E = fix_E
  fit.warnings = (_finish_warnings(kind, m, n_boot, dropped, len(loss), len(law.names) - (fix_E is not None))
                  + law.warnings(values, cols, loss, fix_E is not None))
  return fit


def try_fit(fits: dict, warnings: list, kind: str, fn, prefix: str = '') -> None:
  """Runs fn(): records the fit in fits[kind] and its warnings (prefixed), or None and why it failed."""
  try:
    fits[kind] = fn()
    warnings += [f'{prefix}{w}' for w in fits[kind].warnings]
  except FitError as e:
    fits[kind] = None
    warnings.append(f'{prefix}{kind} not fitted: {e}')

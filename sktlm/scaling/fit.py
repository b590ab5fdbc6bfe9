"""Scaling-law fits with seeded bootstrap intervals.

- `fit_power_law`: L(X) = E + A / X^alpha (X = N or C), Huber in log space, multi-start (`lbfgs`).
- `fit_parametric`: Chinchilla L(N, D) = E + A/N^alpha + B/D^beta, exactly Hoffmann et al. 2022 (Approach 3):
  summed Huber(delta=1e-3) of LSE(a - alpha log N, b - beta log D, e) - log L, L-BFGS-B from the
  4500-point grid, best kept.
- `fit_isoflop`: Approach 2: a parabola of loss in log N per compute budget, its vertex, N_opt = k C^a.
- `compute_optimal`: N_opt(C), D_opt(C) from the parametric fit with D = C / f(N) in the report's FLOP
  convention (sktlm.scaling.compute: closed form when f = k N, numerical otherwise).

Too few points, constant losses and bad data raise FitError (a UserError); fits that ran but are suspect
(not converged, exponent at a degenerate value, E collapsed to 0) carry `warnings` for the report.
Intervals are 95% percentile intervals over bootstrap refits that resample the fitted points.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import compute, lbfgs

CI_LEVEL = 0.95


class FitError(UserError):
  """The data cannot support the requested fit."""


def chinchilla_grid() -> np.ndarray:
  """Hoffmann et al. start grid in lbfgs parameter order (a, b, e, alpha, beta): 6*6*5*5*5 = 4500."""
  ab = np.arange(0.0, 25.1, 5.0)
  e = np.arange(-1.0, 1.01, 0.5)
  ex = np.arange(0.0, 2.01, 0.5)
  return np.array(list(itertools.product(ab, ab, e, ex, ex)))


def grid_1d() -> np.ndarray:
  """Starts (a, e, alpha) for one-variable laws; finer in small alpha (L(C) exponents are ~0.05-0.2)."""
  a = np.arange(0.0, 25.1, 5.0)
  e = np.arange(-1.0, 1.01, 0.5)
  alpha = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 1.5, 2.0])
  return np.array([(ai, ei, al) for ai, ei, al in itertools.product(a, e, alpha)])


def interval(samples: np.ndarray) -> tuple[float, float]:
  samples = np.asarray(samples, dtype=np.float64)
  samples = samples[np.isfinite(samples)]
  if samples.size < 2:
    return (float('nan'), float('nan'))
  q = 100 * (1 - CI_LEVEL) / 2
  lo, hi = np.percentile(samples, [q, 100 - q])
  return float(lo), float(hi)


@dataclasses.dataclass
class Fit:
  """A fitted law L = E + A/X^alpha [+ B/D^beta]; `boot` holds bootstrap refits in `names` order."""
  kind: str                    # 'L(N)', 'L(C)' or 'L(N,D)'
  names: tuple[str, ...]       # ('E', 'A', 'alpha') or ('E', 'A', 'B', 'alpha', 'beta')
  values: dict[str, float]
  boot: np.ndarray             # (B, len(names))
  n_points: int
  objective: float             # summed Huber loss at the optimum
  converged: bool
  n_starts: int
  warnings: list[str] = dataclasses.field(default_factory=list)
  n_boot_dropped: int = 0
  fixed_E: float | None = None   # the asymptote was held at this value (not fitted)

  def ci(self, name: str) -> tuple[float, float]:
    return interval(self.boot[:, self.names.index(name)])

  def _eval(self, v: dict | np.ndarray, x, d=None):
    get = (lambda n: v[n]) if isinstance(v, dict) else (lambda n: v[..., self.names.index(n)])
    with np.errstate(over='ignore', invalid='ignore'):  # a wild bootstrap refit: inf/nan, dropped by interval()
      out = get('E') + get('A') / np.power(x, get('alpha'))
      if 'B' in self.names:
        out = out + get('B') / np.power(d, get('beta'))
    return out

  def predict(self, x, d=None):
    """Point prediction (floats or arrays)."""
    return self._eval(self.values, np.asarray(x, dtype=np.float64), None if d is None else np.asarray(d, float))

  def predict_boot(self, x: float, d: float | None = None) -> np.ndarray:
    """Bootstrap predictions at one point: (B,)."""
    return self._eval(self.boot, float(x), None if d is None else float(d))

  def to_json(self) -> dict:
    return dict(kind=self.kind, values=self.values, ci={n: self.ci(n) for n in self.names},
                ci_level=CI_LEVEL, n_points=self.n_points, objective=self.objective, converged=self.converged,
                n_starts=self.n_starts, n_boot=int(len(self.boot)), n_boot_dropped=self.n_boot_dropped,
                fixed_E=self.fixed_E, warnings=self.warnings)


def _check_points(kind: str, cols: dict[str, np.ndarray], loss: np.ndarray):
  for name, v in list(cols.items()) + [('loss', loss)]:
    bad = ~(np.isfinite(v) & (v > 0))
    if bad.any():
      raise FitError(f'{kind}: {int(bad.sum())} point(s) with non-positive or non-finite {name}; '
                     'the loader should have dropped them')
  if len(loss) and np.ptp(np.log(loss)) < 1e-12:
    raise FitError(f'{kind}: all {len(loss)} losses are equal ({loss[0]:.6g}); nothing to fit')


def _exponent_warnings(kind: str, values: dict[str, float], loss: np.ndarray, exps: tuple[str, ...],
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


def fit_power_law(x: np.ndarray, loss: np.ndarray, *, kind: str = 'L(N)', n_boot: int = 200,
                  seed: int = 0, delta: float = 1e-3, min_distinct: int = 3, fix_E: float | None = None) -> Fit:
  """L(X) = E + A / X^alpha on one point per X (the caller reduces repeated X, e.g. to the lowest loss).
  fix_E: hold the asymptote at this value (fit A and alpha only)."""
  x = np.asarray(x, dtype=np.float64)
  loss = np.asarray(loss, dtype=np.float64)
  _check_points(kind, {'x': x}, loss)
  _check_fix_e(kind, fix_E, loss)
  n_distinct = len(np.unique(x))
  if n_distinct < min_distinct:
    raise FitError(f'{kind} needs at least {min_distinct} distinct values of the variable, got {n_distinct}')
  lx = np.log(x)[:, None]
  ly = np.log(loss)
  frozen = fix_E is not None
  m = lbfgs.minimize_grid(_fixed_e_starts(grid_1d(), 1, fix_E), lx, ly, delta=delta, freeze_e=frozen)
  to_named = lambda p: np.stack([np.exp(p[..., 1]), np.exp(p[..., 0]), p[..., 2]], axis=-1)
  boot_p, dropped = (lbfgs.bootstrap(m.candidates, lx, ly, n_boot, np.random.default_rng(seed), delta=delta,
                                     min_distinct=min_distinct, freeze_e=frozen)
                     if n_boot else (np.zeros((0, 3)), 0))
  names = ('E', 'A', 'alpha')
  values = dict(zip(names, map(float, to_named(m.p)), strict=True))
  fit = Fit(kind=kind, names=names, values=values, boot=to_named(boot_p), n_points=len(x), objective=m.fun,
            converged=m.converged, n_starts=m.n_starts, n_boot_dropped=dropped)
  fit.fixed_E = fix_E
  fit.warnings = (_finish_warnings(kind, m, n_boot, dropped, len(x), 3 - frozen)
                  + _exponent_warnings(kind, values, loss, ('alpha',), frozen))
  return fit


# Above this |correlation| of log N and log D (e.g. a ladder with D = k N), A/N^alpha and B/D^beta trade off
# freely along the line the runs lie on: the fit is not identifiable and its exponents are meaningless.
MAX_ND_CORRELATION = 0.98


def allocation_defined(values: dict) -> bool:
  """The closed-form compute-optimal allocation needs both exponents positive."""
  return values['alpha'] > 0 and values['beta'] > 0


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, n_boot: int = 200, seed: int = 0,
                   delta: float = 1e-3, starts: np.ndarray | None = None, fix_E: float | None = None) -> Fit:
  """Chinchilla Approach 3: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Huber in log space).
  fix_E: hold the asymptote at this value (fit the other four)."""
  kind = 'L(N,D)'
  n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
  _check_points(kind, {'N': n, 'D': d}, loss)
  _check_fix_e(kind, fix_E, loss)
  if len(loss) < 5:
    raise FitError(f'{kind} has 5 parameters and needs at least 5 runs, got {len(loss)}')
  n_n, n_d = len(np.unique(n)), len(np.unique(d))
  if n_n < 2 or n_d < 2:
    raise FitError(f'{kind} needs runs that vary both N and D (distinct N: {n_n}, distinct D: {n_d})')
  corr = float(np.corrcoef(np.log(n), np.log(d))[0, 1])
  if abs(corr) > MAX_ND_CORRELATION:
    raise FitError(f'{kind} cannot separate N from D: in these runs D moves with N (correlation of log N and '
                   f'log D = {corr:.4f}); it needs runs that vary D at fixed N (an IsoFLOP or WSD sweep)')
  x = np.stack([np.log(n), np.log(d)], axis=1)
  ly = np.log(loss)
  frozen = fix_E is not None
  grid = _fixed_e_starts(chinchilla_grid() if starts is None else starts, 2, fix_E)
  m = lbfgs.minimize_grid(grid, x, ly, delta=delta, freeze_e=frozen)
  def to_named(p):
    with np.errstate(over='ignore'):  # a wild bootstrap refit overflows to inf, dropped by interval()
      return np.stack([np.exp(p[..., 2]), np.exp(p[..., 0]), np.exp(p[..., 1]), p[..., 3], p[..., 4]], axis=-1)
  boot_p, dropped = (lbfgs.bootstrap(m.candidates, x, ly, n_boot, np.random.default_rng(seed), delta=delta,
                                     min_distinct=5, freeze_e=frozen) if n_boot else (np.zeros((0, 5)), 0))
  names = ('E', 'A', 'B', 'alpha', 'beta')
  values = dict(zip(names, map(float, to_named(m.p)), strict=True))
  fit = Fit(kind=kind, names=names, values=values, boot=to_named(boot_p), n_points=len(loss), objective=m.fun,
            converged=m.converged, n_starts=m.n_starts, n_boot_dropped=dropped)
  fit.fixed_E = fix_E
  fit.warnings = _finish_warnings(kind, m, n_boot, dropped, len(loss), 5 - frozen)
  if n_n < 3 or n_d < 3:
    fit.warnings.append(f'{kind}: only {n_n} distinct N and {n_d} distinct D: exponents are poorly constrained')
  fit.warnings += _exponent_warnings(kind, values, loss, ('alpha', 'beta'), frozen)
  return fit


def compute_optimal(values, c, f=None):
  """Compute-optimal (N_opt, D_opt, L_opt) at budget C for L = E + A/N^alpha + B/D^beta, along
  D = C / f(N) (sktlm.scaling.compute.FlopsPerToken in the report's convention; None: C = 6 N D, closed form).

  `values` is a dict or an array (..., 5) in Fit.names order ('E', 'A', 'B', 'alpha', 'beta').
  """
  return compute.optimal(values, c, f)


# ------------------------------------------------------------------------------------------------ IsoFLOP

def group_budgets(c: np.ndarray, declared: np.ndarray | None = None, gap: float = 1.25):
  """Group runs into compute budgets: by the declared budget where given (finite), else by runs whose
  sorted compute is within a factor `gap` of its neighbour. Returns (group id per run, C per group: the
  geometric mean of its runs' compute, so it is in the caller's FLOP convention whatever the declaration's).
  """
  c = np.asarray(c, dtype=np.float64)
  ids = np.full(len(c), -1)
  budgets: list[float] = []
  if declared is not None:
    declared = np.asarray(declared, dtype=np.float64)
    for v in np.unique(declared[np.isfinite(declared)]):
      ids[declared == v] = len(budgets)
      budgets.append(float(np.exp(np.mean(np.log(c[declared == v])))))
  rest = np.flatnonzero(ids < 0)
  if rest.size:
    order = rest[np.argsort(c[rest])]
    start = 0
    for i in range(1, len(order) + 1):
      if i == len(order) or c[order[i]] > gap * c[order[i - 1]]:
        members = order[start:i]
        ids[members] = len(budgets)
        budgets.append(float(np.exp(np.mean(np.log(c[members])))))
        start = i
  return ids, np.array(budgets)


@dataclasses.dataclass
class IsoFlop:
  budgets: list[dict]          # per usable budget: C, N_opt, L_opt, coeffs (in ln N), n_runs, N range
  k: float                     # N_opt = k C^a
  a: float
  boot: np.ndarray             # (B, 2): k, a
  warnings: list[str]
  n_boot_dropped: int = 0
  f: compute.FlopsPerToken | None = None  # FLOPs per token of N in the runs' convention (None: 6 N)

  def n_opt(self, c):
    return self.k * np.power(c, self.a)

  def fpt(self, n):
    return 6.0 * np.asarray(n) if self.f is None else self.f(n)

  def d_opt(self, c):
    return c / self.fpt(self.n_opt(c))

  def ci(self, name: str) -> tuple[float, float]:
    return interval(self.boot[:, ('k', 'a').index(name)])

  def n_opt_boot(self, c: float) -> np.ndarray:
    return self.boot[:, 0] * np.power(c, self.boot[:, 1])

  def to_json(self) -> dict:
    linear = self.f is None or self.f.k is not None  # D_opt = C / (k N_opt) is a power law of C
    return dict(kind='isoflop', k=self.k, a=self.a, d_exponent=(1 - self.a) if linear else None,
                ci=dict(k=self.ci('k'), a=self.ci('a')),
                ci_level=CI_LEVEL, budgets=self.budgets, n_boot=int(len(self.boot)),
                n_boot_dropped=self.n_boot_dropped, warnings=self.warnings)


def _vertex(ln_n: np.ndarray, loss: np.ndarray):
  """(ln N at the parabola's minimum, loss there, coeffs) or None if not convex / underdetermined."""
  if len(np.unique(ln_n)) < 3:
    return None
  coeffs = np.polyfit(ln_n, loss, 2)
  if not coeffs[0] > 0:
    return None
  v = -coeffs[1] / (2 * coeffs[0])
  return v, float(np.polyval(coeffs, v)), coeffs


def fit_isoflop(n: np.ndarray, c: np.ndarray, loss: np.ndarray, *, declared_budgets=None, gap: float = 1.25,
                n_boot: int = 200, seed: int = 0, f: compute.FlopsPerToken | None = None) -> IsoFlop:
  """Chinchilla Approach 2 on runs grouped into compute budgets; D_opt = C / f(N_opt) (f None: 6 N)."""
  n, c, loss = (np.asarray(v, dtype=np.float64) for v in (n, c, loss))
  _check_points('IsoFLOP', {'N': n, 'C': c}, loss)
  ids, budget_c = group_budgets(c, declared_budgets, gap)
  warnings: list[str] = []
  groups, rows = [], []
  ln_n = np.log(n)
  for g, cb in enumerate(budget_c):
    idx = np.flatnonzero(ids == g)
    vx = _vertex(ln_n[idx], loss[idx])
    if vx is None:
      if len(np.unique(n[idx])) >= 3:
        warnings.append(f'IsoFLOP: budget C={cb:.3g} skipped: loss against log N is not convex (no minimum)')
      continue
    v, l_min, coeffs = vx
    lo, hi = ln_n[idx].min(), ln_n[idx].max()
    if not lo <= v <= hi:
      warnings.append(f'IsoFLOP: budget C={cb:.3g}: the minimum N={np.exp(v):.3g} lies outside the sizes run '
                      f'({np.exp(lo):.3g}..{np.exp(hi):.3g}); extend the sweep')
    groups.append(idx)
    rows.append(dict(C=float(cb), N_opt=float(np.exp(v)), L_opt=l_min, coeffs_lnN=[float(x) for x in coeffs],
                     n_runs=int(idx.size), N_min=float(np.exp(lo)), N_max=float(np.exp(hi))))
  if len(rows) < 2:
    raise FitError(f'IsoFLOP needs at least 2 compute budgets with >= 3 distinct sizes and a convex loss '
                   f'profile, got {len(rows)} (of {len(budget_c)} budgets)')
  if len(rows) == 2:
    warnings.append('IsoFLOP: only 2 budgets: N_opt = k C^a passes exactly through them')
  lc = np.log([r['C'] for r in rows])
  slope, icpt = np.polyfit(lc, np.log([r['N_opt'] for r in rows]), 1)
  rng = np.random.default_rng(seed)
  boot, dropped = [], 0
  for _ in range(n_boot):
    vs, cs = [], []
    for idx, row in zip(groups, rows, strict=True):
      pick = rng.choice(idx, size=idx.size, replace=True)
      vx = _vertex(ln_n[pick], loss[pick])
      if vx is not None:
        vs.append(vx[0])
        cs.append(np.log(row['C']))
    if len(vs) < 2 or np.ptp(cs) == 0:
      dropped += 1
      continue
    s_b, i_b = np.polyfit(cs, vs, 1)
    boot.append((np.exp(i_b), s_b))
  if n_boot and dropped > 0.1 * n_boot:
    warnings.append(f'IsoFLOP: {dropped} of {n_boot} bootstrap resamples had < 2 usable budgets')
  return IsoFlop(budgets=rows, k=float(np.exp(icpt)), a=float(slope), boot=np.array(boot).reshape(-1, 2),
                 warnings=warnings, n_boot_dropped=dropped, f=f)


def try_fit(fits: dict, warnings: list, kind: str, fn, prefix: str = '') -> None:
  """Runs fn(): records the fit in fits[kind] and its warnings (prefixed), or None and why it failed."""
  try:
    fits[kind] = fn()
    warnings += [f'{prefix}{w}' for w in fits[kind].warnings]
  except FitError as e:
    fits[kind] = None
    warnings.append(f'{prefix}{kind} not fitted: {e}')

"""Chinchilla Approach 2 (IsoFLOP profiles): a parabola of loss in log N per compute budget, its vertex, and
N_opt = k C^a over the budgets, with bootstrap intervals (runs resampled within each budget).

Not a law of the registry (sktlm.scaling.laws): it predicts an allocation, not a loss, and is fitted only where
a sweep declares budgets shared by several sizes (sktlm.scaling.analysis).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sktlm.scaling import compute
from sktlm.scaling.fit import CI_LEVEL, FitError, check_points, interval


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
  check_points('IsoFLOP', {'N': n, 'C': c}, loss)
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



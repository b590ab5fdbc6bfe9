"""Compute under one FLOP convention: FLOPs per token as a function of N, and compute-optimal allocation.

A report uses one convention (`--flops=exact|6n`, sktlm/config/accounting.py) for every compute quantity. Its runs
record C in that convention, so each run gives the FLOPs per token f = C / D of its shape. `FlopsPerToken`
interpolates f(N) between the sweep's shapes (piecewise linear in log N, log f) and extends it beyond them
at the nearest shape's f / N. Allocations solve L(N, D) = E + A/N^alpha + B/D^beta at a budget C with
D = C / f(N): in closed form when f = k N (pure 6ND, e.g. Chinchilla's C = 6ND), numerically otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sktlm.errors import UserError

CONVENTIONS = ('exact', '6n')
DESCRIPTION = {
    'exact': 'exact = model FLOPs (PaLM): 6N + the attention matmuls over the full T x T scores, as MFU counts '
             'them (sktlm/config/accounting.py)',
    '6n': '6n = 6 x the matmul weights a token passes through (sktlm/config/accounting.py)',
}
LINEAR_RTOL = 1e-9
GRID = np.linspace(0.0, np.log(1e18), 4001)  # ln N searched by the numerical allocation (1 .. 1e18)


def convention(name: str) -> str:
  """'exact', '6n' (also '6N')."""
  key = str(name).strip().lower()
  if key not in CONVENTIONS:
    raise UserError(f"--flops must be one of {', '.join(CONVENTIONS)}, got '{name}'")
  return key


@dataclasses.dataclass
class FlopsPerToken:
  """f(N): training FLOPs per token of a model with N parameters (the report's N), in `convention`."""
  n: np.ndarray          # distinct N of the shapes, sorted
  fpt: np.ndarray        # FLOPs per token at each
  convention: str

  @classmethod
  def from_runs(cls, n, d, c, convention_: str) -> FlopsPerToken | None:
    """From runs' N, tokens and C (same convention); None if no run has all three."""
    n, d, c = (np.asarray(v, dtype=np.float64) for v in (n, d, c))
    ok = (n > 0) & (d > 0) & (c > 0)
    if not ok.any():
      return None
    n, f = n[ok], c[ok] / d[ok]
    ns = np.unique(n)
    return cls(ns, np.array([np.median(f[n == v]) for v in ns]), convention_)

  @classmethod
  def linear_in_n(cls, k: float = 6.0, convention_: str = '6n') -> FlopsPerToken:
    return cls(np.array([1.0]), np.array([k]), convention_)

  @property
  def k(self) -> float | None:
    """f / N when it is the same for every shape (f = k N: the closed form applies), else None."""
    r = self.fpt / self.n
    return float(r[0]) if np.allclose(r, r[0], rtol=LINEAR_RTOL, atol=0) else None

  def in_range(self, n) -> bool:
    n = np.asarray(n, dtype=np.float64)
    return bool(np.all((n >= self.n[0] * (1 - 1e-12)) & (n <= self.n[-1] * (1 + 1e-12))))

  def log_f(self, u):
    """ln f at ln N = u (array)."""
    u = np.asarray(u, dtype=np.float64)
    ln_n, ln_f = np.log(self.n), np.log(self.fpt)
    out = np.interp(u, ln_n, ln_f)
    out = np.where(u < ln_n[0], ln_f[0] + (u - ln_n[0]), out)
    return np.where(u > ln_n[-1], ln_f[-1] + (u - ln_n[-1]), out)

  def __call__(self, n):
    return np.exp(self.log_f(np.log(np.asarray(n, dtype=np.float64))))

  def to_json(self) -> dict:
    return dict(convention=self.convention, N=self.n.tolist(), flops_per_token=self.fpt.tolist(), k=self.k)


def _params(values):
  if isinstance(values, dict):
    return tuple(np.asarray(values[k], dtype=np.float64) for k in ('E', 'A', 'B', 'alpha', 'beta'))
  values = np.asarray(values, dtype=np.float64)
  return tuple(values[..., i] for i in range(5))


def optimal_closed_form(values, c, k: float = 6.0):
  """N_opt, D_opt, L_opt for L = E + A/N^alpha + B/D^beta under C = k N D (Hoffmann et al. with k = 6)."""
  e, a, b, alpha, beta = _params(values)
  with np.errstate(all='ignore'):
    g = np.power(alpha * a / (beta * b), 1.0 / (alpha + beta))
    n_opt = g * np.power(c / k, beta / (alpha + beta))
    d_opt = (c / k) / n_opt
    l_opt = e + a / np.power(n_opt, alpha) + b / np.power(d_opt, beta)
  return n_opt, d_opt, l_opt


def optimal_numeric(values, c: float, f: FlopsPerToken):
  """The same minimum along D = C / f(N), for any f: a grid over ln N, then golden-section refinement.

  Vectorised over parameter rows (bootstrap). N_opt is nan where the minimum sits on the searched range's
  edge (1 .. 1e18 parameters) or the law has no minimum along the constraint.
  """
  e, a, b, alpha, beta = (np.atleast_1d(p)[:, None] for p in _params(values))
  ln_c = np.log(c)

  def h(u):  # the reducible loss along the constraint, ln D = ln C - ln f(N)
    with np.errstate(all='ignore'):
      return a * np.exp(-alpha * u) + b * np.exp(-beta * (ln_c - f.log_f(u)))

  vals = h(GRID[None, :])
  vals = np.where(np.isfinite(vals), vals, np.inf)
  i = np.argmin(vals, axis=1)
  step = GRID[1] - GRID[0]
  lo, hi = GRID[i] - step, GRID[i] + step
  inv_phi = (np.sqrt(5.0) - 1) / 2
  for _ in range(90):  # bracket shrinks by 0.618 per step: 90 steps reach float64 resolution
    x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    left = h(x1[:, None])[:, 0] <= h(x2[:, None])[:, 0]
    hi, lo = np.where(left, x2, hi), np.where(left, lo, x1)
  u = (lo + hi) / 2
  edge = (i == 0) | (i == len(GRID) - 1) | ~np.isfinite(vals.min(axis=1))
  u = np.where(edge, np.nan, u)
  n_opt = np.exp(u)
  d_opt = c / f(n_opt)
  with np.errstate(all='ignore'):
    l_opt = e[:, 0] + a[:, 0] / np.power(n_opt, alpha[:, 0]) + b[:, 0] / np.power(d_opt, beta[:, 0])
  if isinstance(values, dict) or np.ndim(values) == 1:
    return float(n_opt[0]), float(d_opt[0]), float(l_opt[0])
  return n_opt, d_opt, l_opt


def optimal(values, c: float, f: FlopsPerToken | None = None):
  """Compute-optimal (N, D, L) at budget C under f (None: C = 6 N D): closed form when f = k N."""
  if f is None:
    return optimal_closed_form(values, c)
  k = f.k
  return optimal_closed_form(values, c, k) if k is not None else optimal_numeric(values, c, f)

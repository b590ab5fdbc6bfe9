"""The data-repetition law of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"): Chinchilla's
form in effective parameters N' and effective tokens D',

  L = E + A / N'^alpha + B / D'^beta
  D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)),   R_D = D / U_D - 1  (epochs beyond the first)
  N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N)),   R_N = N / U_N - 1,  U_N = min(N, N_opt(U_D))

with U_D the unique tokens and N_opt(U_D) the size whose compute-optimal token count (of the law itself) is U_D:
ln N_opt = (ln(alpha A / (beta B)) + beta ln U_D) / alpha. A repeated token is worth less the more often it is
seen (half-life ~ R*_D epochs), and parameters beyond what the unique data can feed are worth less too. With one
epoch (D <= U_D) and N <= N_opt it is Chinchilla's law.

The published constants are the authors' (PUBLISHED: github.com/huggingface/datablations, README "Parametric
Fit"; the paper rounds them to R*_D ~ 15.4, R*_N ~ 5.3). Attempted on sweeps whose results record the unique
tokens each run saw (column `unique_tokens`); fitted by the one engine with its analytic Jacobian.
"""

from __future__ import annotations

import itertools

import numpy as np

from sktlm.scaling import fit as fitlib
from sktlm.scaling import forms
from sktlm.scaling.laws import base

# [ln A, ln B, ln E, alpha, beta, R*_D, R*_N] as the authors publish them (their fit on C4; alpha = beta).
PUBLISHED = dict(A=float(np.exp(6.255414)), B=float(np.exp(7.3049974)), E=float(np.exp(0.6254804)),
                 alpha=0.3526596, beta=0.3526596, RD=15.387756, RN=5.309743)
NAMES = ('E', 'A', 'B', 'alpha', 'beta', 'R*_N', 'R*_D')


def _effective(u, r, ln_s):
  """(ln(U + U R* (1 - exp(-R / R*))), its derivative in ln U at fixed N or D, its derivative in ln R*)."""
  s = np.exp(ln_s)
  decay = np.exp(-r / s)
  q = 1.0 + s * (1.0 - decay)
  return np.log(u) + np.log(q), 1.0 - (r + 1.0) * decay / q, (s * (1.0 - decay) - r * decay) / q


def loss(e, a, b, alpha, beta, rn_star, rd_star, n, d, u):
  """The law at (N, D, U) (broadcasting: points, or one point for many parameter sets)."""
  u_n = np.minimum(n, np.exp((np.log(alpha * a / (beta * b)) + beta * np.log(u)) / alpha))
  n_eff = u_n + u_n * rn_star * (1 - np.exp(-(n / u_n - 1) / rn_star))
  d_eff = u + u * rd_star * (1 - np.exp(-np.maximum(d / u - 1, 0) / rd_star))
  return e + a / n_eff ** alpha + b / d_eff ** beta


def log_loss(p_KxP: np.ndarray, n, d, u):
  """ln L and d ln L / dp (K x N x 7) at engine parameters p = (ln A, ln B, ln E, alpha, beta, ln R*_N, ln R*_D)."""
  a, b, e, alpha, beta, ln_sn, ln_sd = (p_KxP[:, i, None] for i in range(7))
  ln_n, ln_u = np.log(n)[None], np.log(u)[None]
  num = np.log(alpha) - np.log(beta) + a - b
  ln_opt = (num + beta * ln_u) / alpha
  active = ln_opt < ln_n                        # the unique data cannot feed N: U_N = N_opt(U_D)
  ln_un = np.where(active, ln_opt, ln_n)
  ln_np, dn_du, dn_ds = _effective(np.exp(ln_un), np.exp(ln_n - ln_un) - 1.0, ln_sn)
  ln_dp, _, dd_ds = _effective(u[None], np.maximum(d / u - 1.0, 0.0)[None], ln_sd)
  t_n, t_d, t_e = np.exp(a - alpha * ln_np), np.exp(b - beta * ln_dp), np.exp(e)
  total = t_e + t_n + t_d
  # d ln U_N / d(a, b, alpha, beta) where U_N = N_opt, else 0
  du = [np.where(active, v, 0.0) for v in (1 / alpha, -1 / alpha, (1 - num - beta * ln_u) / alpha ** 2,
                                           (ln_u - 1 / beta) / alpha)]
  via_un = -alpha * t_n * dn_du                 # d t_N / d ln U_N
  jac = np.stack(np.broadcast_arrays(t_n + via_un * du[0], t_d + via_un * du[1], t_e, -t_n * ln_np + via_un * du[2],
                                     -t_d * ln_dp + via_un * du[3], -alpha * t_n * dn_ds, -beta * t_d * dd_ds),
                 axis=-1)
  return np.log(total), jac / total[..., None]


class Muennighoff(base.Law):
  kind = 'L(N,D,U)'
  formula = "E + A/N'^alpha + B/D'^beta, N' and D' discounted for repeated data (Muennighoff et al. 2023)"
  points_doc = 'all runs that record their unique tokens U'
  columns = ('N', 'D', 'U')
  row_columns = {'U': 'unique_tokens'}
  names = NAMES
  e_index = 2
  min_distinct = 8

  def check(self, cols, loss):
    if len(loss) < 8:
      raise fitlib.FitError(f'{self.kind} has 7 parameters and needs at least 8 runs, got {len(loss)}')
    if not (cols['D'] > cols['U'] * 1.01).any():
      raise fitlib.FitError(f'{self.kind}: no run repeats its data (D > U): R*_D cannot be fitted')

  def form(self, cols):
    n, d, u = cols['N'], cols['D'], cols['U']
    return forms.LogModel(lambda p: log_loss(p, n, d, u))

  def starts(self, cols, loss):
    ab = np.arange(0.0, 25.1, 10.0)   # a coarser Chinchilla grid: 972 starts with the two R* values each
    return np.array(list(itertools.product(ab, ab, [-1.0, 0.0, 1.0], [0.25, 0.5, 1.0], [0.25, 0.5, 1.0],
                                           np.log([2.0, 15.0]), np.log([2.0, 15.0]))))

  def to_named(self, p):
    with np.errstate(over='ignore'):  # a wild bootstrap refit overflows to inf, dropped by interval()
      return np.stack([np.exp(p[..., 2]), np.exp(p[..., 0]), np.exp(p[..., 1]), p[..., 3], p[..., 4],
                       np.exp(p[..., 5]), np.exp(p[..., 6])], axis=-1)

  def predict(self, get, cols):
    return loss(*(get(k) for k in ('E', 'A', 'B', 'alpha', 'beta', 'R*_N', 'R*_D')), cols['N'], cols['D'], cols['U'])

  def warnings(self, values, cols, loss, e_fixed):
    return fitlib.exponent_warnings(self.kind, values, loss, ('alpha', 'beta'), e_fixed)


LAW = Muennighoff()
LAWS = (LAW,)

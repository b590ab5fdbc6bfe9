"""Chinchilla Approach 3 (Hoffmann et al. 2022): L(N, D) = E + A/N^alpha + B/D^beta on every run, exactly as
published: summed Huber(delta=1e-3) of LSE(a - alpha log N, b - beta log D, e) - log L, L-BFGS-B from their
4500-point grid, best kept. Its compute-optimal allocation at a budget C solves it along D = C / f(N) in the
report's FLOP convention (sktlm.scaling.compute: closed form when f = k N, numerical otherwise).
"""

from __future__ import annotations

import itertools

import numpy as np

from sktlm.scaling import compute, lbfgs
from sktlm.scaling import fit as fitlib
from sktlm.scaling.laws import base

# Above this |correlation| of log N and log D (e.g. a ladder with D = k N), A/N^alpha and B/D^beta trade off
# freely along the line the runs lie on: the fit is not identifiable and its exponents are meaningless.
MAX_ND_CORRELATION = 0.98


def chinchilla_grid() -> np.ndarray:
  """Hoffmann et al. start grid in engine parameter order (a, b, e, alpha, beta): 6*6*5*5*5 = 4500."""
  ab = np.arange(0.0, 25.1, 5.0)
  e = np.arange(-1.0, 1.01, 0.5)
  ex = np.arange(0.0, 2.01, 0.5)
  return np.array(list(itertools.product(ab, ab, e, ex, ex)))


class Chinchilla(base.Law):
  kind = 'L(N,D)'
  formula = 'E + A/N^alpha + B/D^beta'
  points_doc = 'all runs'
  columns = ('N', 'D')
  names = ('E', 'A', 'B', 'alpha', 'beta')
  e_index = 2
  min_distinct = 5
  allocates = True

  def check(self, cols, loss):
    n, d = cols['N'], cols['D']
    if len(loss) < 5:
      raise fitlib.FitError(f'{self.kind} has 5 parameters and needs at least 5 runs, got {len(loss)}')
    n_n, n_d = len(np.unique(n)), len(np.unique(d))
    if n_n < 2 or n_d < 2:
      raise fitlib.FitError(f'{self.kind} needs runs that vary both N and D (distinct N: {n_n}, distinct D: '
                            f'{n_d})')
    corr = float(np.corrcoef(np.log(n), np.log(d))[0, 1])
    if abs(corr) > MAX_ND_CORRELATION:
      raise fitlib.FitError(f'{self.kind} cannot separate N from D: in these runs D moves with N (correlation of '
                            f'log N and log D = {corr:.4f}); it needs runs that vary D at fixed N (an IsoFLOP or '
                            'WSD sweep)')

  def form(self, cols):
    return lbfgs.PowerSum(np.stack([np.log(cols['N']), np.log(cols['D'])], axis=1))

  def starts(self, cols, loss):
    return chinchilla_grid()

  def to_named(self, p):
    with np.errstate(over='ignore'):  # a wild bootstrap refit overflows to inf, dropped by interval()
      return np.stack([np.exp(p[..., 2]), np.exp(p[..., 0]), np.exp(p[..., 1]), p[..., 3], p[..., 4]], axis=-1)

  def predict(self, get, cols):
    return get('E') + get('A') / np.power(cols['N'], get('alpha')) + get('B') / np.power(cols['D'], get('beta'))

  def warnings(self, values, cols, loss, e_fixed):
    n_n, n_d = len(np.unique(cols['N'])), len(np.unique(cols['D']))
    out = []
    if n_n < 3 or n_d < 3:
      out.append(f'{self.kind}: only {n_n} distinct N and {n_d} distinct D: exponents are poorly constrained')
    return out + fitlib.exponent_warnings(self.kind, values, loss, ('alpha', 'beta'), e_fixed)

  def allocation_defined(self, values: dict) -> bool:
    """The closed-form compute-optimal allocation needs both exponents positive."""
    return values['alpha'] > 0 and values['beta'] > 0

  def optimal(self, values, c, f=None):
    """Compute-optimal (N_opt, D_opt, L_opt) at budget C along D = C / f(N) (f None: C = 6 N D, closed form).
    `values` is a dict or an array (..., 5) in `names` order."""
    return compute.optimal(values, c, f)


LAW = Chinchilla()
LAWS = (LAW,)

"""The one fitting engine of every scaling law: multi-start minimisation of the summed Huber loss of log-space
residuals (the Hoffmann et al. 2022 fit), and bootstrap refits.

objective(p) = sum_i w_i Huber_delta(log L_hat_i(p) - log L_i)   (summed, not averaged; w_i are bootstrap counts).

What a law contributes is its form: an object with `huber(p_KxP, y_N, w_KxN, delta, frozen) -> (f_K, g_KxP)`
for K parameter vectors at once (`frozen`: indices whose gradient is 0, held at their start values).
`PowerSum` here is Hoffmann et al.'s form with k variables x_j = log X_j and p = (c_1..c_k, e, alpha_1..alpha_k):

  log L_hat = LSE(c_1 - alpha_1 x_1, ..., c_k - alpha_k x_k, e),  i.e.  L_hat = E + sum_j C_j / X_j^alpha_j

(its analytic objective is `objective`); sktlm.scaling.forms has the others (log-sum-exp of linear features,
any log-prediction with its Jacobian). Wherever an x array is given instead of a form, it is the PowerSum's.

Thousands of starts (the Chinchilla grid has 4500) are run at once by a batched L-BFGS in numpy (one
memory and one backtracking line search per start, all evaluated in one vectorised pass); the best few
distinct end points are then polished by scipy's L-BFGS-B with the analytic gradient, and the best kept.
Running scipy per start gives the same optimum but takes ~40 s instead of ~2 s (see `minimize_scipy`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize


def n_params(k: int) -> int:
  return 2 * k + 1


def objective(p_KxP: np.ndarray, x_Nxk: np.ndarray, y_N: np.ndarray, w_KxN: np.ndarray | None,
              delta: float, freeze_e: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Summed Huber objective and its gradient for K parameter vectors at once: (f_K, g_KxP).

  freeze_e: the gradient of e is 0, so L-BFGS (whose steps lie in the span of past gradients) keeps e at its
  start value exactly: the fit with a fixed asymptote E."""
  k = x_Nxk.shape[1]
  c, e, alpha = p_KxP[:, :k], p_KxP[:, k], p_KxP[:, k + 1:]
  # One (K, N) array per log-sum-exp term (a loop over k <= 2 beats a 3-d array: fewer passes).
  t = [c[:, j, None] - alpha[:, j, None] * x_Nxk[None, :, j] for j in range(k)]
  m = np.broadcast_to(e[:, None], t[0].shape)
  for tj in t:
    m = np.maximum(m, tj)
  z = [np.exp(tj - m) for tj in t]
  ze = np.exp(e[:, None] - m)
  s = ze.copy()
  for zj in z:
    s += zj
  r = m + np.log(s) - y_N                       # (K, N) log-space residuals
  ar = np.abs(r)
  h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
  psi = np.clip(r, -delta, delta) / s           # Huber'(r) / sum(exp): times z_j gives d/d t_j
  if w_KxN is not None:
    h *= w_KxN
    psi *= w_KxN
  f = h.sum(axis=1)
  pz = [psi * zj for zj in z]
  g_e = np.zeros_like(f) if freeze_e else (psi * ze).sum(axis=1)
  g = [pzj.sum(axis=1) for pzj in pz] + [g_e] + [-(pzj @ x_Nxk[:, j]) for j, pzj in enumerate(pz)]
  return f, np.stack(g, axis=1)


@dataclasses.dataclass(frozen=True)
class PowerSum:
  """Hoffmann et al.'s form on x_Nxk = log X: its analytic `objective`. e (log E) is parameter k."""
  x_Nxk: np.ndarray

  def huber(self, p_KxP, y_N, w_KxN, delta, frozen=()):
    if frozen and tuple(frozen) != (self.x_Nxk.shape[1],):
      raise ValueError(f'PowerSum can hold only e (parameter {self.x_Nxk.shape[1]}) fixed, not {frozen}')
    return objective(p_KxP, self.x_Nxk, y_N, w_KxN, delta, freeze_e=bool(frozen))


def _form(form_or_x):
  return PowerSum(np.asarray(form_or_x)) if isinstance(form_or_x, np.ndarray) else form_or_x


def lbfgs_batched(*args, **kwargs):
  """See _lbfgs_batched. Far-off grid starts overflow harmlessly (they are masked out): keep stderr quiet."""
  with np.errstate(all='ignore'):
    return _lbfgs_batched(*args, **kwargs)


def _lbfgs_batched(fg, x0_KxP: np.ndarray, *, memory: int = 10, max_iter: int = 2000, ftol: float = 1e-13,
                  gtol: float = 1e-14) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Minimise K independent problems with L-BFGS (Armijo backtracking), vectorised over K.

  fg(x_RxP, rows_R) -> (f_R, g_RxP) evaluates the problems `rows` at x. Returns (x, f, done) where done
  says the start met a stopping test (relative decrease < ftol, max |g| < gtol, or no further decrease
  possible at float64 precision) rather than running out of iterations.
  """
  x = np.array(x0_KxP, dtype=np.float64)
  K, P = x.shape
  rows = np.arange(K)
  f, g = fg(x, rows)
  S = np.zeros((K, memory, P))
  Y = np.zeros((K, memory, P))
  rho = np.zeros((K, memory))      # 0 marks an empty / rejected pair: a no-op in the two-loop recursion
  gamma = np.ones(K)               # initial inverse-Hessian scale
  fresh = np.ones(K, dtype=bool)   # no curvature information yet: first step of unit length
  active = np.isfinite(f)
  done = ~active
  for it in range(max_iter):
    a = np.flatnonzero(active)
    if a.size == 0:
      break
    ga = g[a]
    q = ga.copy()
    order = [(it - 1 - j) % memory for j in range(memory)]  # newest first
    alphas = []
    for i in order:
      ai = rho[a, i] * np.einsum('kp,kp->k', S[a, i], q)
      q -= ai[:, None] * Y[a, i]
      alphas.append(ai)
    d = gamma[a, None] * q
    for i, ai in zip(reversed(order), reversed(alphas), strict=True):
      bi = rho[a, i] * np.einsum('kp,kp->k', Y[a, i], d)
      d += S[a, i] * (ai - bi)[:, None]
    d = -d
    gnorm = np.abs(ga).max(axis=1)
    first = fresh[a]
    d[first] = -ga[first] / np.maximum(gnorm[first], 1e-300)[:, None]
    slope = np.einsum('kp,kp->k', ga, d)
    bad = ~(slope < 0)   # not a descent direction: restart from steepest descent
    if bad.any():
      d[bad] = -ga[bad] / np.maximum(gnorm[bad], 1e-300)[:, None]
      slope[bad] = np.einsum('kp,kp->k', ga[bad], d[bad])
      rho[a[bad]] = 0.0
    # Backtracking line search, all starts in lockstep.
    t = np.ones(a.size)
    x_new = np.empty((a.size, P))
    f_new = np.full(a.size, np.inf)
    g_new = np.empty((a.size, P))
    pending = np.arange(a.size)
    for _ in range(60):
      xt = x[a[pending]] + t[pending, None] * d[pending]
      ft, gt = fg(xt, a[pending])
      ok = np.isfinite(ft) & (ft <= f[a[pending]] + 1e-4 * t[pending] * slope[pending])
      idx = pending[ok]
      x_new[idx], f_new[idx], g_new[idx] = xt[ok], ft[ok], gt[ok]
      pending = pending[~ok]
      if pending.size == 0:
        break
      t[pending] *= 0.5
    stuck = np.zeros(a.size, dtype=bool)
    stuck[pending] = True           # no decrease found: at the precision limit
    moved = ~stuck
    am = a[moved]
    s_vec = x_new[moved] - x[am]
    y_vec = g_new[moved] - g[am]
    sy = np.einsum('kp,kp->k', s_vec, y_vec)
    yy = np.einsum('kp,kp->k', y_vec, y_vec)
    good = sy > 1e-12 * np.sqrt(yy * np.einsum('kp,kp->k', s_vec, s_vec))
    slot = it % memory
    S[am, slot] = s_vec
    Y[am, slot] = y_vec
    rho[am, slot] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
    gamma[am[good]] = sy[good] / yy[good]
    fresh[am[good]] = False
    decrease = f[am] - f_new[moved]
    x[am], g[am] = x_new[moved], g_new[moved]
    f_old = f[am]
    f[am] = f_new[moved]
    conv = (decrease <= ftol * np.maximum(np.abs(f_old), 1e-300)) | (np.abs(g[am]).max(axis=1) <= gtol)
    fin = np.zeros(a.size, dtype=bool)
    fin[moved] = conv
    fin |= stuck
    done[a[fin]] = True
    active[a[fin]] = False
  return x, f, done


@dataclasses.dataclass
class Minimum:
  p: np.ndarray          # best parameters (c_1..c_k, e, alpha_1..alpha_k)
  fun: float             # summed Huber objective there
  converged: bool
  message: str
  candidates: np.ndarray  # distinct good end points (best first), used to start bootstrap refits
  n_starts: int


def _unit(y_N, w_N, delta) -> float:
  """The objective's value when every residual is delta: the natural scale of "fitted"."""
  return 0.5 * delta ** 2 * (len(y_N) if w_N is None else float(w_N.sum()))


def _polish(p0: np.ndarray, form, y_N, w_N, delta, maxiter: int, frozen=()) -> optimize.OptimizeResult:
  """scipy L-BFGS-B from p0. Its ftol is relative to max(|f|, 1), so the objective is measured in `_unit`s:
  a fit at that level (f ~ 1e-3 for 240 points) is polished to ~1e-14 relative, and a near-exact fit
  (noise-free data) is not chased into subnormal numbers."""
  w = None if w_N is None else w_N[None]
  scale = 1.0 / _unit(y_N, w_N, delta)

  def fg(p):
    f, g = form.huber(p[None], y_N, w, delta, frozen)
    return float(f[0]) * scale, g[0] * scale

  return optimize.minimize(fg, p0, jac=True, method='L-BFGS-B',
                           options=dict(maxiter=maxiter, maxfun=2 * maxiter, ftol=1e-14, gtol=1e-10))


def minimize_grid(starts_SxP: np.ndarray, form, y_N: np.ndarray, *, delta: float = 1e-3,
                  w_N: np.ndarray | None = None, n_polish: int = 5, frozen=()) -> Minimum:
  """Minimise from every start, polish the best distinct end points with scipy L-BFGS-B, keep the best.
  form: the law's form (or x_Nxk of a PowerSum). frozen: parameters kept at each start's value (e.g. log E,
  which the caller sets to a fixed asymptote)."""
  form = _form(form)
  w = None if w_N is None else w_N[None]
  f_of = lambda p: float(form.huber(p[None], y_N, w, delta)[0][0])
  unit = _unit(y_N, w_N, delta)
  fg = lambda p, rows: form.huber(p, y_N, w, delta, frozen)
  # A loose batched phase only has to find the basins; scipy polishes the best few to full precision.
  xs, fs, _ = lbfgs_batched(fg, starts_SxP, ftol=1e-7, max_iter=500)
  fs = np.where(np.isfinite(fs), fs, np.inf)
  distinct: list[tuple[float, np.ndarray]] = []
  for i in np.argsort(fs, kind='stable'):
    if not np.isfinite(fs[i]) or len(distinct) >= n_polish:
      break
    if all(np.abs(xs[i] - c).max() > 1e-3 for _, c in distinct):
      distinct.append((float(fs[i]), xs[i]))
  if not distinct:
    raise FloatingPointError('every start gave a non-finite objective')
  polished = []
  f_top = distinct[0][0]
  for f_start, c in distinct:
    # Polish only end points that could still become the best: scipy crawling along a degenerate valley
    # (E -> 0, an exponent -> 0) costs seconds and cannot change the answer.
    if f_start <= 1e-16 * unit or f_start > 1.05 * f_top + 1e-3 * unit:
      exact = f_start <= 1e-16 * unit
      polished.append((f_start, c, optimize.OptimizeResult(x=c, success=exact, message='exact fit' if exact
                                                           else 'not polished')))
      continue
    res = _polish(c, form, y_N, w_N, delta, maxiter=1000, frozen=frozen)
    f = f_of(res.x)
    polished.append((f, res.x, res) if f <= f_start else (f_start, c, res))  # never worse than the start
  polished.sort(key=lambda t: t[0])
  f, p, res = polished[0]
  if not res.success and 'ITERATIONS' in str(res.message).upper():
    res = _polish(p, form, y_N, w_N, delta, maxiter=5000, frozen=frozen)
    if f_of(res.x) <= f:
      f, p = f_of(res.x), res.x
  _, gbest = form.huber(p[None], y_N, w, delta, frozen)
  # scipy reports ABNORMAL when its line search cannot improve at float64 precision; accept that at a
  # stationary point (gradient tiny in objective units) or an exact fit.
  converged = bool(res.success) or f <= 1e-16 * unit or float(np.abs(gbest[0]).max()) / unit < 1e-3
  # Start points for bootstrap refits: the optimum and any other end point nearly as good (multimodality).
  cands = [q for fq, q, _ in polished if fq <= 2 * f + 1e-6 * unit]
  return Minimum(p=p, fun=f, converged=converged, message=str(res.message), candidates=np.array(cands),
                 n_starts=len(starts_SxP))


def minimize_scipy(starts_SxP: np.ndarray, form, y_N: np.ndarray, *,
                   delta: float = 1e-3) -> tuple[np.ndarray, float]:
  """Reference path: scipy L-BFGS-B (analytic gradient) separately from every start; the best."""
  form = _form(form)
  best = (np.inf, None)
  for p0 in starts_SxP:
    def fg(p):
      f, g = form.huber(p[None], y_N, None, delta)
      return float(f[0]), g[0]
    res = optimize.minimize(fg, p0, jac=True, method='L-BFGS-B', options=dict(maxiter=10000, ftol=1e-12,
                                                                               gtol=1e-9))
    if res.fun < best[0]:
      best = (float(res.fun), res.x)
  return best[1], best[0]


def bootstrap(candidates_SxP: np.ndarray, form, y_N: np.ndarray, n_boot: int,
              rng: np.random.Generator, *, delta: float = 1e-3, min_distinct: int = 3, frozen=()):
  """Refits on n_boot resamples (with replacement) of the points, from the given start points.

  All resamples x starts run in one batched L-BFGS. Returns (params_BxP of the usable resamples,
  number of resamples dropped for having fewer than `min_distinct` distinct points, or a non-finite fit).
  """
  n = len(y_N)
  counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, N)
  usable = (counts > 0).sum(axis=1) >= min_distinct
  counts = counts[usable]
  B, S = len(counts), len(candidates_SxP)
  if B == 0:
    return np.zeros((0, candidates_SxP.shape[1])), n_boot
  w_RxN = np.repeat(counts, S, axis=0)
  x0 = np.tile(candidates_SxP, (B, 1))
  form = _form(form)
  fg = lambda p, rows: form.huber(p, y_N, w_RxN[rows], delta, frozen)
  xs, fs, _ = lbfgs_batched(fg, x0, ftol=1e-10, max_iter=1000)
  fs = np.where(np.isfinite(fs), fs, np.inf).reshape(B, S)
  best = fs.argmin(axis=1)
  out = xs.reshape(B, S, -1)[np.arange(B), best]
  ok = np.isfinite(fs[np.arange(B), best]) & np.all(np.isfinite(out), axis=1)
  return out[ok], n_boot - int(ok.sum())

"""MoE scaling laws: the published forms, their published constants, and Huber fits with bootstrap intervals.

- Krajewski et al. 2024 (fine-grained MoE), N = non-embedding parameters, D tokens, G granularity:
    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta
  `krajewski_compute_optimal`: their compute-optimal (N, D, G) at a FLOP budget under their FLOP model with
  routing cost (`krajewski_flops`, Eq. 10), as in their Section 6.2 / Table 2.
- Ludziejewski et al. 2025 (joint MoE law), N_act = active parameters, E experts:
    L(N_act, D, E) = a Ê^delta N_act^(alpha + gamma ln Ê) + b Ê^omega D^(beta + zeta ln Ê) + c
  with Ê Clark et al. 2022's saturating expert count, 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max
  (Ê(1) = E_start, Ê -> E_max as E -> inf). Its exponents are signed as published (alpha, beta < 0).
- `joint_line`: the joint law along a ladder with D = r N_act (every sweep that sizes D by tokens per
  parameter): both terms are then powers of N_act, merged into one, L = a Ê^delta N_act^(alpha + gamma ln Ê) + c.

Every law is a log-sum-exp of terms whose logs are linear in the parameters (ln a, exponents, ln c), the
structure of Hoffmann et al.'s fit: `fit_law` hands it to the one fitting engine of every law
(sktlm.scaling.lbfgs: the summed Huber loss of log residuals, L-BFGS from a grid of starts, bootstrap refits of
resampled points; 95% percentile intervals, sktlm.scaling.fit.interval). E_start and E_max are held at their
published values by default: a sweep with a handful of expert counts cannot resolve the saturation.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize

from sktlm.scaling import fit as fitlib
from sktlm.scaling import forms, lbfgs

# Krajewski et al. 2024, Table 1.
KRAJEWSKI_MOE = dict(a=18.1, alpha=0.115, b=30.8, beta=0.147, g=2.1, gamma=0.58, c=0.47)
KRAJEWSKI_DENSE = dict(a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47)
# Ludziejewski et al. 2025, Table 3.
JOINT = dict(a=35.91, alpha=-0.1889, delta=-0.2285, gamma=0.0098, b=35.98, beta=-0.1775, omega=0.5529,
             zeta=-0.0259, e_start=2.0732, e_max=290.4521, c=1.3637)
# Ludziejewski et al. 2025's fitted optimal learning rate: ln LR = 8.39 - 0.81 ln N_act - 0.25 ln E.
JOINT_LR = dict(c0=8.39, n=-0.81, e=-0.25)


def effective_experts(e, e_start: float = JOINT['e_start'], e_max: float = JOINT['e_max']):
  """Clark et al. 2022's saturating expert count Ê(E)."""
  e = np.asarray(e, dtype=np.float64)
  return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def krajewski_loss(p: dict, n, d, g=1.0):
  """Krajewski et al. 2024; `p` without 'g'/'gamma' is their dense law c + a/N^alpha + b/D^beta."""
  n, d, g = (np.asarray(v, dtype=np.float64) for v in (n, d, g))
  expert = p['g'] / np.power(g, p['gamma']) if 'g' in p else 0.0
  return p['c'] + (expert + p['a']) / np.power(n, p['alpha']) + p['b'] / np.power(d, p['beta'])


def krajewski_flops(n_blocks, d, g, e: float = 64, c_f: float = 6.0, c_r: float = 14.0, aspect: float = 64.0):
  """Krajewski et al. 2024, Eq. 10: F = (12 d_model^2 c_f + d_model E G c_r) D n_blocks, d_model = aspect n_blocks.

  12 d_model^2 is a block's active parameters (c_f = 6 FLOPs per active parameter and token), d_model E G
  its router's (c_r = 14: their Appendix E's count of routing operations); embeddings are excluded."""
  d_model = aspect * np.asarray(n_blocks, dtype=np.float64)
  return (12.0 * d_model ** 2 * c_f + d_model * e * g * c_r) * d * n_blocks


def krajewski_compute_optimal(flops: float, p: dict = KRAJEWSKI_MOE, *, e: float = 64, c_f: float = 6.0,
                              c_r: float = 14.0, aspect: float = 64.0,
                              granularities=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
  """Krajewski et al. 2024, Section 6.2: minimise L(N, D, G) subject to F = Eq. 10, with
  N = d_model^2 (8E + 4) n_blocks (total non-embedding parameters: 8E d_model^2 in the experts, 4 d_model^2 in
  attention) and d_model = aspect n_blocks (64). For each G in `granularities` (powers of two, as in their Table 2) the
  one free variable, n_blocks (continuous), is found by bounded Brent on ln n_blocks; the best G wins.

  Returns dict(G, n_blocks, d_model, N, N_act = 12 d_model^2 n_blocks (the "100M" in their "64 x 100M"), D, loss)."""
  best = None
  for g in granularities:
    def loss_at(ln_n, g=float(g)):
      n = np.exp(ln_n)
      d_model = aspect * n
      d = flops / krajewski_flops(n, 1.0, g, e, c_f, c_r, aspect)
      return float(krajewski_loss(p, d_model ** 2 * (8 * e + 4) * n, d, g))
    res = optimize.minimize_scalar(loss_at, bounds=(0.0, np.log(1e5)), method='bounded',
                                   options=dict(xatol=1e-9))
    if best is None or res.fun < best[0]:
      best = (float(res.fun), float(g), float(np.exp(res.x)))
  loss, g, n = best
  d_model = aspect * n
  return dict(G=g, n_blocks=n, d_model=d_model, N=d_model ** 2 * (8 * e + 4) * n, N_act=12 * d_model ** 2 * n,
              D=flops / krajewski_flops(n, 1.0, g, e, c_f, c_r, aspect), loss=loss)


def joint_loss(p: dict, n_act, d, e):
  """Ludziejewski et al. 2025's joint law at active parameters n_act, tokens d, e experts (1: dense)."""
  le = np.log(effective_experts(e, p.get('e_start', JOINT['e_start']), p.get('e_max', JOINT['e_max'])))
  n_act, d = np.asarray(n_act, dtype=np.float64), np.asarray(d, dtype=np.float64)
  return (p['a'] * np.exp(p['delta'] * le) * np.power(n_act, p['alpha'] + p['gamma'] * le)
          + p['b'] * np.exp(p['omega'] * le) * np.power(d, p['beta'] + p['zeta'] * le) + p['c'])


def joint_line_loss(p: dict, n_act, e):
  """The joint law along D = r N_act, its two terms merged: a Ê^delta N_act^(alpha + gamma ln Ê) + c."""
  le = np.log(effective_experts(e, p.get('e_start', JOINT['e_start']), p.get('e_max', JOINT['e_max'])))
  return p['a'] * np.exp(p['delta'] * le) * np.power(np.asarray(n_act, float), p['alpha'] + p['gamma'] * le) + p['c']


def joint_lr(n_act, e):
  """Ludziejewski et al. 2025's optimal peak LR for n_act active parameters and e experts."""
  return np.exp(JOINT_LR['c0'] + JOINT_LR['n'] * np.log(n_act) + JOINT_LR['e'] * np.log(e))


# ------------------------------------------------------------------------------------------------- laws

@dataclasses.dataclass(frozen=True)
class Law:
  """ln L = LSE_j(F_j(x) @ theta): each term's features F_j (N, P) make its log linear in theta.

  `names` are theta's entries ('ln_a' for log coefficients); `to_values` maps theta to the published
  parametrisation, `features(cols)` builds the per-term feature matrices from the data columns.
  """
  kind: str
  names: tuple[str, ...]
  columns: tuple[str, ...]
  features: object   # cols dict -> list of (N, P) arrays
  grid: dict         # start values per theta entry (few: the whitened problem is well-conditioned)

  def starts(self) -> np.ndarray:
    return np.array(list(itertools.product(*[self.grid[n] for n in self.names])), dtype=np.float64)

  def values(self, theta) -> dict:
    out = {}
    for i, n in enumerate(self.names):
      out[n[3:] if n.startswith('ln_') else n] = float(np.exp(theta[i]) if n.startswith('ln_') else theta[i])
    return out

  def theta(self, values: dict) -> np.ndarray:
    return np.array([np.log(values[n[3:]]) if n.startswith('ln_') else values[n] for n in self.names])

  def log_predict(self, theta, cols: dict) -> np.ndarray:
    t = np.stack([f @ theta for f in self.features(cols)])
    m = t.max(axis=0)
    return m + np.log(np.exp(t - m).sum(axis=0))


def _ln_e(cols, e_start, e_max):
  return np.log(effective_experts(cols['E'], e_start, e_max))


def joint_law(e_start: float = JOINT['e_start'], e_max: float = JOINT['e_max']) -> Law:
  def feats(cols):
    le, ln, ld = _ln_e(cols, e_start, e_max), np.log(cols['N']), np.log(cols['D'])
    one, z4 = np.ones_like(ln), np.zeros((len(ln), 4))
    t1 = np.concatenate([np.stack([one, le, ln, le * ln], 1), z4, np.zeros((len(ln), 1))], 1)
    t2 = np.concatenate([z4, np.stack([one, le, ld, le * ld], 1), np.zeros((len(ln), 1))], 1)
    t3 = np.concatenate([np.zeros((len(ln), 8)), one[:, None]], 1)
    return [t1, t2, t3]
  return Law('joint', ('ln_a', 'delta', 'alpha', 'gamma', 'ln_b', 'omega', 'beta', 'zeta', 'ln_c'),
             ('N', 'D', 'E'), feats,
             dict(ln_a=[3.0], delta=[-0.2], alpha=[-0.2], gamma=[0.0], ln_b=[3.0], omega=[0.0, 0.5],
                  beta=[-0.2], zeta=[0.0], ln_c=[0.0, 0.5]))


def joint_line_law(e_start: float = JOINT['e_start'], e_max: float = JOINT['e_max']) -> Law:
  def feats(cols):
    le, ln = _ln_e(cols, e_start, e_max), np.log(cols['N'])
    one, zero = np.ones_like(ln), np.zeros_like(ln)
    return [np.stack([one, le, ln, le * ln, zero], 1), np.stack([zero, zero, zero, zero, one], 1)]
  return Law('joint_line', ('ln_a', 'delta', 'alpha', 'gamma', 'ln_c'), ('N', 'E'), feats,
             dict(ln_a=[1.0, 3.0], delta=[0.0], alpha=[-0.3, -0.1], gamma=[0.0], ln_c=[-1.0, 0.5]))


def krajewski_law() -> Law:
  """theta = (ln g, gamma, ln a, alpha, ln b, beta, ln c); exponents enter with a minus sign."""
  def feats(cols):
    ln, ld, lg = np.log(cols['N']), np.log(cols['D']), np.log(cols['G'])
    one, zero = np.ones_like(ln), np.zeros_like(ln)
    return [np.stack([one, -lg, zero, -ln, zero, zero, zero], 1),
            np.stack([zero, zero, one, -ln, zero, zero, zero], 1),
            np.stack([zero, zero, zero, zero, one, -ld, zero], 1),
            np.stack([zero, zero, zero, zero, zero, zero, one], 1)]
  return Law('krajewski', ('ln_g', 'gamma', 'ln_a', 'alpha', 'ln_b', 'beta', 'ln_c'), ('N', 'D', 'G'), feats,
             dict(ln_g=[1.0], gamma=[0.5], ln_a=[2.5], alpha=[0.1], ln_b=[3.0], beta=[0.1, 0.2], ln_c=[-1.0, 0.0]))


# ------------------------------------------------------------------------------------------------- fits

@dataclasses.dataclass
class LawFit:
  law: Law
  theta: np.ndarray
  boot: np.ndarray            # (B, P) bootstrap thetas
  n_points: int
  objective: float
  converged: bool
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def values(self) -> dict:
    return self.law.values(self.theta)

  def predict(self, cols: dict) -> np.ndarray:
    return np.exp(self.law.log_predict(self.theta, _cols(cols)))

  def predict_boot(self, cols: dict) -> np.ndarray:
    """(B, N) bootstrap predictions."""
    c = _cols(cols)
    n = max(len(v) for v in c.values())
    return np.array([np.exp(self.law.log_predict(t, c)) for t in self.boot]).reshape(len(self.boot), n)

  def ci(self, name: str) -> tuple[float, float]:
    key = name if name in self.law.names else f'ln_{name}'
    i = self.law.names.index(key)
    col = np.exp(self.boot[:, i]) if key.startswith('ln_') else self.boot[:, i]
    return fitlib.interval(col)

  def to_json(self) -> dict:
    return dict(kind=self.law.kind, values=self.values, ci={k: self.ci(k) for k in self.values},
                ci_level=fitlib.CI_LEVEL, n_points=self.n_points, objective=self.objective,
                converged=self.converged, n_boot=int(len(self.boot)), warnings=self.warnings)


def _cols(cols: dict) -> dict:
  return {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}


def fit_law(law: Law, cols: dict, loss, *, n_boot: int = 200, seed: int = 0, delta: float = 1e-3,
            starts: np.ndarray | None = None) -> LawFit:
  """Huber fit of `law` (in log space, Hoffmann et al.'s objective) on the data columns `law.columns`."""
  cols = _cols(cols)
  loss = np.asarray(loss, dtype=np.float64)
  n_par = len(law.names)
  for k in law.columns:
    v = cols[k]
    if len(v) != len(loss) or not np.all(np.isfinite(v) & (v > 0)):
      raise fitlib.FitError(f'{law.kind}: column {k} must be positive and finite for every point')
  if not np.all(np.isfinite(loss) & (loss > 0)):
    raise fitlib.FitError(f'{law.kind}: losses must be positive and finite')
  if len(loss) <= n_par:
    raise fitlib.FitError(f'{law.kind} has {n_par} parameters and needs more than {n_par} points, got {len(loss)}')
  feats, y = law.features(cols), np.log(loss)
  # Precondition: theta = T phi with T whitening the stacked features (ln N ~ 20 makes the raw problem
  # ill-conditioned: L-BFGS then takes hundreds of iterations). A near-zero singular value means the data
  # cannot separate two parameters (e.g. a single expert count and an Ê exponent).
  _, sv, vt = np.linalg.svd(np.concatenate(feats), full_matrices=False)
  if sv[-1] < 1e-9 * sv[0]:
    raise fitlib.FitError(f'{law.kind}: the points do not vary enough to fit {", ".join(law.names)} '
                          f'(e.g. a single E, N or D)')
  t = vt.T / sv
  form = forms.LinearLSE(tuple(f @ t for f in feats))
  starts = law.starts() if starts is None else np.asarray(starts, dtype=np.float64)
  try:  # the one engine of every law (sktlm.scaling.lbfgs), on the whitened parameters phi
    best = lbfgs.minimize_grid((starts @ vt.T) * sv, form, y, delta=delta)
  except FloatingPointError:
    raise fitlib.FitError('no start of the MoE law fit reached a finite objective') from None
  boot_phi, _ = (lbfgs.bootstrap(best.candidates, form, y, n_boot, np.random.default_rng(seed), delta=delta,
                                 min_distinct=n_par + 1) if n_boot else (np.zeros((0, n_par)), 0))
  boot = list(boot_phi @ t.T)
  warnings = []
  if n_boot and len(boot) < max(min(10, n_boot), n_boot // 4):  # e.g. n_par + 1 points: most resamples degenerate
    warnings.append(f'{law.kind}: only {len(boot)} of {n_boot} bootstrap resamples had more than {n_par} distinct '
                    f'points: no intervals')
    boot = []
  out = LawFit(law, t @ best.p, np.array(boot).reshape(-1, n_par), len(loss), float(best.fun), bool(best.converged),
               warnings)
  if 'ln_c' in law.names and out.values['c'] < 1e-3 * float(loss.min()):
    out.warnings.append(f"{law.kind}: c = {out.values['c']:.3g} collapsed to ~0: no irreducible loss resolved")
  if not best.converged:
    out.warnings.append(f'{law.kind}: the optimiser did not converge ({best.message})')
  if boot and len(boot) < 0.9 * n_boot:
    out.warnings.append(f'{law.kind}: {n_boot - len(boot)} of {n_boot} bootstrap resamples had too few distinct points')
  return out

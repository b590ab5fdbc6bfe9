"""Forms the fitting engine (sktlm.scaling.lbfgs) minimises besides Hoffmann et al.'s power sum: what a law
gives it is `huber(p_KxP, y_N, w_KxN, delta, frozen) -> (f_K, g_KxP)`, the summed Huber loss of its log-space
residuals and the gradient, for K parameter vectors at once.

- `LinearLSE`: log L = LSE_j(F_j @ p), each term's log linear in the parameters (the MoE laws of
  sktlm.scaling.moe_laws, after their whitening).
- `LogModel`: any law given as a function p_KxP -> (log L_KxN, d log L / dp_KxNxP) (a law whose effective
  sizes depend on its own constants, e.g. sktlm.scaling.laws.muennighoff, or the loss-curve law).
"""

from __future__ import annotations

import dataclasses

import numpy as np


def huber_terms(r_KxN: np.ndarray, w_KxN: np.ndarray | None, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """(summed Huber loss per row, Huber'(r) weighted): the two things every form needs from its residuals."""
  ar = np.abs(r_KxN)
  h = np.where(ar <= delta, 0.5 * r_KxN * r_KxN, delta * (ar - 0.5 * delta))
  psi = np.clip(r_KxN, -delta, delta)
  if w_KxN is not None:
    h = h * w_KxN
    psi = psi * w_KxN
  return h.sum(axis=1), psi


def _finite(f_K: np.ndarray, g_KxP: np.ndarray, frozen) -> tuple[np.ndarray, np.ndarray]:
  """A row whose objective is not finite (a far-off start) is +inf, which the line search backs off from."""
  g_KxP[:, list(frozen)] = 0.0
  bad = ~np.isfinite(f_K) | ~np.all(np.isfinite(g_KxP), axis=1)
  f_K = np.where(bad, np.inf, f_K)
  g_KxP[bad] = 0.0
  return f_K, g_KxP


@dataclasses.dataclass(frozen=True)
class LinearLSE:
  """log L = LSE_j(F_j @ p) with feature matrices F_j (N, P), one per term."""
  feats: tuple

  def huber(self, p_KxP, y_N, w_KxN, delta, frozen=()):
    with np.errstate(all='ignore'):
      t = np.stack([p_KxP @ f.T for f in self.feats])        # (terms, K, N)
      m = t.max(axis=0)
      z = np.exp(t - m)
      s = z.sum(axis=0)
      f, psi = huber_terms(m + np.log(s) - y_N, w_KxN, delta)
      psi = psi / s
      g = sum((psi * zj) @ fj for zj, fj in zip(z, self.feats, strict=True))
    return _finite(f, np.array(g, dtype=np.float64), frozen)


@dataclasses.dataclass(frozen=True)
class LogModel:
  """A law given as fn(p_KxP) -> (log L_KxN, its Jacobian d log L / dp, K x N x P)."""
  fn: object

  def huber(self, p_KxP, y_N, w_KxN, delta, frozen=()):
    with np.errstate(all='ignore'):
      ll, jac = self.fn(p_KxP)
      f, psi = huber_terms(ll - y_N, w_KxN, delta)
      g = np.einsum('kn,knp->kp', psi, jac)
    return _finite(f, g, frozen)

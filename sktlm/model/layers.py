"""Building blocks shared by the dense model and the MoE block: dtypes, init, RMSNorm, SwiGLU MLP, RoPE.

Parameters carry logical axis names (nn.with_logical_partitioning); activations are constrained with
logical names too (sharding.constrain). The mapping to mesh axes lives in config.sharding_rules (see
sktlm/sharding.py); the matmuls come from the config's kernel set (sktlm/model/kernels).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sktlm.model import kernels, mup
from sktlm.sharding import constrain


def dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param_init(config, scale_by_depth: bool = False, kind: str = 'hidden'):
  """Normal(init_std); output projections of residual branches are scaled by 1/sqrt(2 L) (GPT-2); `kind` is the
  parameter's muP class (sktlm/model/mup.py), which sets the std under model.parametrization='mup'."""
  return nn.initializers.normal(stddev=mup.init_std(config, kind, scale_by_depth))


class RMSNorm(nn.Module):
  config: object
  eps: float = 0.0  # 0: config.norm_eps (MLA's latent norms pass model.mla.latent_norm_eps)

  @nn.compact
  def __call__(self, x):
    c = self.config
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), dtype(c.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + (self.eps or c.norm_eps))
    return (y * scale.astype(jnp.float32)).astype(dtype(c.dtype))


class Mlp(nn.Module):
  """SwiGLU feed-forward: (silu(x Wg) * (x Wu)) Wo."""
  config: object
  d_ff: int

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    D, F = x_BxTxD.shape[-1], self.d_ff
    cdt, pdt = dtype(c.dtype), dtype(c.param_dtype)
    wi_gate = self.param('wi_gate', nn.with_logical_partitioning(param_init(c), ('embed', 'mlp')), (D, F), pdt)
    wi_up = self.param('wi_up', nn.with_logical_partitioning(param_init(c), ('embed', 'mlp')), (D, F), pdt)
    wo = self.param('wo', nn.with_logical_partitioning(param_init(c, True), ('mlp', 'embed')), (F, D), pdt)
    B, T, _ = x_BxTxD.shape
    x_NxD = x_BxTxD.astype(cdt).reshape(B * T, D)
    out_NxD = kernels.ops(c).swiglu(x_NxD, wi_gate, wi_up, wo)
    return constrain(out_NxD.reshape(B, T, D), ('batch', 'length', 'act_embed'))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(mc, dim: int) -> tuple[np.ndarray, float]:
  """(inv_freq [dim/2] float32, factor on cos/sin) of the config's RoPE over `dim` rotated dims.

  model.rope_scaling.type 'yarn' is YaRN (Peng et al. 2023) in DeepSeek-V3's form, as transformers'
  `_compute_yarn_parameters`: per frequency a linear ramp between the original (extrapolated) and the
  factor-interpolated inverse frequency, over the dims whose wavelength fits beta_fast..beta_slow rotations in
  the original context; cos/sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
  theta = float(mc.rope_theta)
  pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  ys = rope_scaling(mc)
  if ys is None:
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  factor, orig = float(ys.factor), float(ys.original_max_position)

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(correction_dim(ys.beta_fast)), 0)
  high = min(math.ceil(correction_dim(ys.beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
  extrapolate = 1 - ramp
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
  if ys.mscale and ys.mscale_all_dim:
    cos_factor = _yarn_mscale(factor, ys.mscale) / _yarn_mscale(factor, ys.mscale_all_dim)
  else:
    cos_factor = _yarn_mscale(factor)
  return inv_freq.astype(np.float32), float(cos_factor)


def rope_scaling(mc):
  """model.rope_scaling when it is on ('yarn'; its type, factor >= 1 and original_max_position >= 1 are the
  schema's, checked by validate), else None."""
  ys = mc.get('rope_scaling') if hasattr(mc, 'get') else None
  if ys is None or ys.get('type', 'none') == 'none':
    return None
  return ys


def softmax_scale_factor(mc) -> float:
  """YaRN's extra factor on the softmax scale (DeepSeek-V3: mscale(factor, mscale_all_dim)^2), else 1."""
  ys = rope_scaling(mc)
  if ys is None or not ys.mscale_all_dim:
    return 1.0
  return _yarn_mscale(float(ys.factor), ys.mscale_all_dim) ** 2


def rope(x_BxTxHxK, positions_BxT, mc, out_dtype=None):
  """Rotary embedding (rotate-half form) at the given per-token positions, computed in float32; `mc` is
  config.model (rope_theta, rope_scaling)."""
  K = x_BxTxHxK.shape[-1]
  inv_freq, cos_factor = rope_frequencies(mc, K)
  angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
  if cos_factor != 1.0:
    sin, cos = sin * cos_factor, cos * cos_factor
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :K // 2], x[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(out_dtype or x_BxTxHxK.dtype)

"""Building blocks shared by the dense model and the MoE block: dtypes, init, RMSNorm, SwiGLU MLP, RoPE.

Parameters carry logical axis names (nn.with_logical_partitioning); activations are constrained with
logical names too (sharding.constrain). The mapping to mesh axes lives in config.sharding_rules (see
sktlm/sharding.py); the matmuls come from the config's kernel set (sktlm/model/kernels).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

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

  @nn.compact
  def __call__(self, x):
    c = self.config
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), dtype(c.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.norm_eps)
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


def rope(x_BxTxHxK, positions_BxT, theta: float, out_dtype=None):
  """Rotary embedding (rotate-half form) at the given per-token positions, computed in float32."""
  K = x_BxTxHxK.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
  angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :K // 2], x[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(out_dtype or x_BxTxHxK.dtype)

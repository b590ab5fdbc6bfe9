"""Building blocks shared by the dense model and the MoE block: dtypes, init, RMSNorm, SwiGLU MLP, RoPE.

Parameters carry logical axis names (nn.with_logical_partitioning); activations are constrained with
logical names too. The mapping to mesh axes lives in config.sharding_rules (see sktlm/sharding.py).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param_init(config, scale_by_depth: bool = False):
  """Normal(init_std); output projections of residual branches are scaled by 1/sqrt(2 L) (GPT-2)."""
  std = config.init_std
  if scale_by_depth:
    std = std / math.sqrt(2 * config.n_layers)
  return nn.initializers.normal(stddev=std)


_MESH: list = []  # the mesh activation constraints refer to, set while a step is traced


@contextlib.contextmanager
def activation_mesh(mesh):
  """Makes `constrain` bind to `mesh` (jax.set_mesh cannot be entered inside jit)."""
  _MESH.append(mesh)
  try:
    yield
  finally:
    _MESH.pop()


def current_mesh():
  """The mesh set by activation_mesh (None outside a traced step)."""
  return _MESH[-1] if _MESH else None


def constrain(x, names):
  """Logical sharding constraint on an activation; a no-op outside activation_mesh (e.g. plain init)."""
  return nn.with_logical_constraint(x, names, mesh=current_mesh())


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
    x = x_BxTxD.astype(cdt)
    gate_BxTxF = jnp.einsum('btd,df->btf', x, wi_gate.astype(cdt))
    up_BxTxF = jnp.einsum('btd,df->btf', x, wi_up.astype(cdt))
    h_BxTxF = constrain(nn.silu(gate_BxTxF) * up_BxTxF, ('batch', 'length', 'act_mlp'))
    out_BxTxD = jnp.einsum('btf,fd->btd', h_BxTxF, wo.astype(cdt))
    return constrain(out_BxTxD, ('batch', 'length', 'act_embed'))


def rope(x_BxTxHxK, positions_BxT, theta: float):
  """Rotary embedding (rotate-half form) at the given per-token positions, computed in float32."""
  K = x_BxTxHxK.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
  angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = x[..., :K // 2], x[..., K // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)

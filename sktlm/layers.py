"""Building blocks shared by the dense model and the MoE block: dtypes, init, RMSNorm, SwiGLU MLP, RoPE.

Parameters carry logical axis names (nn.with_logical_partitioning); activations are constrained with
logical names too. The mapping to mesh axes lives in config.sharding_rules (see sktlm/sharding.py).
"""

from __future__ import annotations

import contextlib
import functools
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


def current_platform() -> str:
  """Platform of the devices the traced step runs on (the activation mesh's), else JAX's default backend.
  Why not jax.default_backend() alone: `sktlm plan` traces on a CPU host for a TPU mesh."""
  mesh = current_mesh()
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


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


def transposed(x_AxB):
  """x.T, materialised row-major for 16-bit dtypes.

  Why: XLA:CPU runs a matmul on its fast library kernels (YNNPACK, which does bf16 x bf16 -> f32 natively) only
  when both operands are row-major with the contraction on the last lhs and the first rhs axis. A plain x.T is
  just a column-major layout to XLA, so a bf16 matmul on it is upcast to float32 and runs ~2x slower. The detour
  through a unit axis makes XLA copy the data into row-major order (a cheap, memory-bound transpose). float32
  matmuls do not need it, and there the plain x.T (which XLA can fold into the producer) is faster.
  """
  return permuted(x_AxB, (1, 0))


def permuted(x, perm):
  """x.transpose(perm), materialised row-major for 16-bit dtypes (the detour of `transposed`, any rank)."""
  if x.dtype.itemsize >= 4:
    return x.transpose(perm)
  y = x[None].transpose((perm[0] + 1, 0) + tuple(p + 1 for p in perm[1:]))
  return y.reshape(tuple(x.shape[p] for p in perm))


def matmul(a_MxK, b_KxN):
  """a @ b accumulated (and returned) in float32 whatever the operand dtype."""
  return jnp.matmul(a_MxK, b_KxN, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x_NxD, w_DxF, out_dtype=None):
  """x @ w.astype(x.dtype) with float32 accumulation, returned in out_dtype (default x.dtype).

  The backward pass accumulates in float32 too, uses only canonical row-major matmuls (see `transposed`), and
  gives w a gradient in w's own dtype (float32 params get an unrounded float32 gradient).
  """
  return matmul(x_NxD, w_DxF.astype(x_NxD.dtype)).astype(out_dtype or x_NxD.dtype)


def _dense_fwd(x, w, out_dtype):
  return dense(x, w, out_dtype), (x, w)


def _dense_bwd(out_dtype, res, dy_NxF):
  x, w = res
  dy = dy_NxF.astype(x.dtype)
  dx = matmul(dy, transposed(w.astype(x.dtype))).astype(x.dtype)
  return dx, matmul(transposed(x), dy).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_one_hot(tokens_N, table_VxD, dtype):
  """table[tokens] as a one-hot matmul in `dtype`: for small vocabularies its gradient is a matmul rather than a
  scatter-add. Hand-written backward: only the table gradient (float32 accumulation, in the table's dtype)."""
  onehot_NxV = jax.nn.one_hot(tokens_N, table_VxD.shape[0], dtype=dtype)
  return matmul(onehot_NxV, table_VxD.astype(dtype)).astype(dtype)


def _embed_one_hot_fwd(tokens, table, dtype):
  return embed_one_hot(tokens, table, dtype), (tokens, table)


def _embed_one_hot_bwd(dtype, res, dy_NxD):
  tokens, table = res
  onehot_VxN = transposed(jax.nn.one_hot(tokens, table.shape[0], dtype=dtype))
  return None, matmul(onehot_VxN, dy_NxD.astype(dtype)).astype(table.dtype)


embed_one_hot.defvjp(_embed_one_hot_fwd, _embed_one_hot_bwd)


@jax.custom_vjp
def swiglu(x_NxD, wi_gate_DxF, wi_up_DxF, wo_FxD):
  """(silu(x Wg) * (x Wu)) Wo on flattened tokens x_NxD, with a hand-written backward pass.

  Weights arrive in their param dtype and are cast to x's (compute) dtype; every matmul accumulates in float32
  and weight gradients come back in the param dtype (as in `dense`). Why hand-written: XLA:CPU autodiff of this
  block fuses the silu derivative into the transposes that feed the weight-gradient matmuls and recomputes it
  there element by element; materialising the gate/up gradients first (optimization_barrier), with plain
  row-major matmuls, makes the whole train step ~1.7x faster on CPU. Same math and residuals (the two matmul
  outputs) as autodiff; tests compare it with a float64 reference.
  """
  return _swiglu_fwd(x_NxD, wi_gate_DxF, wi_up_DxF, wo_FxD)[0]


def _swiglu_fwd(x, wg, wu, wo):
  cdt = x.dtype
  gate_NxF = constrain(matmul(x, wg.astype(cdt)).astype(cdt), ('batch', 'act_mlp'))
  up_NxF = constrain(matmul(x, wu.astype(cdt)).astype(cdt), ('batch', 'act_mlp'))
  h_NxF = (nn.silu(gate_NxF.astype(jnp.float32)) * up_NxF).astype(cdt)
  return matmul(h_NxF, wo.astype(cdt)).astype(cdt), (x, wg, wu, wo, gate_NxF, up_NxF)


def _swiglu_bwd(res, dy_NxD):
  x, wg, wu, wo, g, u = res
  cdt = x.dtype
  dy = dy_NxD.astype(cdt)
  g32, u32 = g.astype(jnp.float32), u.astype(jnp.float32)
  sig = jax.nn.sigmoid(g32)
  act = g32 * sig  # silu(g)
  dh = constrain(matmul(dy, transposed(wo.astype(cdt))), ('batch', 'act_mlp'))
  dg = (dh * u32 * (sig + act * (1 - sig))).astype(cdt)  # d silu(g)/dg = sig + g sig (1 - sig)
  du = (dh * act).astype(cdt)
  h = (act * u32).astype(cdt)
  h, dg, du = jax.lax.optimization_barrier((h, dg, du))
  dx = matmul(dg, transposed(wg.astype(cdt))) + matmul(du, transposed(wu.astype(cdt)))
  x_t = transposed(x)
  return (dx.astype(cdt), matmul(x_t, dg).astype(wg.dtype), matmul(x_t, du).astype(wu.dtype),
          matmul(transposed(h), dy).astype(wo.dtype))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
    out_NxD = swiglu(x_NxD, wi_gate, wi_up, wo)
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

"""CPU kernels: hand-written backward passes and row-major layouts that keep XLA:CPU on its fast matmuls.

The same functions as the plain path (sktlm/model/kernels/__init__.py, sktlm/model/attention.py), with the same
forward math, tested against it (tests/test_kernels.py). Why they exist: XLA:CPU runs a matmul on its fast
library kernels (YNNPACK, which does bf16 x bf16 -> f32 natively) only when both operands are row-major with
the contraction on the last lhs and the first rhs axis. Autodiff's backward passes take transposed operands, so
bf16 backward matmuls were upcast to float32 (~2x slower), and XLA:CPU fused derivative math into them.

- `dense`, `swiglu`, `embed`: custom VJPs whose backward matmuls are canonical row-major products (`transposed`
  materialises the transposes), accumulate in float32, and give float32 params unrounded float32 gradients.
- `blocked_vjp_attention`: blocked causal attention with a hand-written backward (all six matmuls per block
  row-major bf16 x bf16 -> f32, softmax work in float32, the saved probabilities reused).
Figures: README, Performance.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sktlm.model.attention import NEG_INF, mask, query_blocks
from sktlm.sharding import constrain

ONE_HOT_EMBED_MAX_VOCAB = 2048  # above this, a gather is cheaper than the one-hot matmul


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


@jax.custom_vjp
def transposed_param(w_AxB):
  """`transposed` for a parameter that feeds `dense` (the tied output head: embedding.T). Its gradient is
  transposed back behind an optimization barrier: folded into the bf16 weight-gradient matmul, that transpose
  gives XLA:CPU a dot its runtime cannot execute ("Unsupported element type for DotThunk::Execute: BF16 x BF16
  = F32"; bf16 models with tied embeddings failed on CPU before this)."""
  return transposed(w_AxB)


def _transposed_param_fwd(w):
  return transposed(w), None


def _transposed_param_bwd(_, g_BxA):
  return (transposed(jax.lax.optimization_barrier(g_BxA)),)


transposed_param.defvjp(_transposed_param_fwd, _transposed_param_bwd)


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


def embed(tokens_N, table_VxD, dtype):
  """table[tokens] in `dtype`; for small vocabularies a one-hot matmul (`embed_one_hot`)."""
  if table_VxD.shape[0] <= ONE_HOT_EMBED_MAX_VOCAB:
    return embed_one_hot(tokens_N, table_VxD, dtype)
  return jnp.take(table_VxD, tokens_N, axis=0).astype(dtype)


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
  outputs) as autodiff; tests compare it with a float64 reference and with the plain path.
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


# --- attention ---------------------------------------------------------------------------------------------

def causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int):
  """`model.attention_impl=blocked_vjp`: the blocked attention of sktlm/model/attention.py with a hand-written
  backward pass for 16-bit attention on CPU (the kernel interface of sktlm/model/kernels/__init__.py)."""
  return blocked_vjp_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block)


def _bmm(a, b):
  """Batched a @ b over the leading axes, accumulated in float32."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_vjp_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block: int):
  """The `blocked` attention with a hand-written backward pass; returns q's dtype.

  Heads go head-major once per call, every matmul is a row-major bf16 x bf16 -> f32 product, softmax work
  stays float32, and the backward pass reuses the saved probabilities with the usual softmax identity
  dS = P * (dP - rowsum(dO * O)). JAX's backward of the plain `blocked` form takes transposed operands and
  bf16 elementwise ops, which XLA:CPU upcasts or emulates: the bf16 step was then slower with bf16 attention
  than with float32 attention.
  """
  return _vjp_fwd(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block)[0]


def _vjp_fwd(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, block):
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxTxGxK.shape[2]
  R = H // G  # query heads per kv head: their rows are stacked, so each kv head does one larger matmul
  cdt = q_BxTxHxK.dtype
  q_BxGxRxTxK = permuted(q_BxTxHxK.reshape(B, T, G, R, K), (0, 2, 3, 1, 4))
  kT_BxGxKxT = permuted(k_BxTxGxK, (0, 2, 3, 1))
  v_BxGxTxK = permuted(v_BxTxGxK, (0, 2, 1, 3))
  outs, probs, inv_sums = [], [], []
  for s, e in query_blocks(T, block):
    Q = e - s
    q_BxGxRQxK = q_BxGxRxTxK[:, :, :, s:e].reshape(B, G, R * Q, K)
    att_BxGxRxQxS = _bmm(q_BxGxRQxK, kT_BxGxKxT[..., :e]).reshape(B, G, R, Q, e)
    att_BxGxRxQxS = jnp.where(mask(seg_BxT[:, s:e], seg_BxT[:, :e], s)[:, None, None], att_BxGxRxQxS, NEG_INF)
    p_BxGxRxQxS = jnp.exp(att_BxGxRxQxS - jnp.max(att_BxGxRxQxS, axis=-1, keepdims=True))
    inv_sum_BxGxRxQx1 = 1.0 / jnp.sum(p_BxGxRxQxS, axis=-1, keepdims=True)
    p_BxGxRxQxS = p_BxGxRxQxS.astype(cdt)  # unnormalised; rows are scaled after the (narrower) p @ v
    o_BxGxRxQxK = _bmm(p_BxGxRxQxS.reshape(B, G, R * Q, e), v_BxGxTxK[:, :, :e]).reshape(B, G, R, Q, K)
    outs.append((o_BxGxRxQxK * inv_sum_BxGxRxQx1).astype(cdt))
    probs.append(p_BxGxRxQxS)
    inv_sums.append(inv_sum_BxGxRxQx1)
  out_BxTxHxK = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)
  return out_BxTxHxK, (q_BxGxRxTxK, k_BxTxGxK, v_BxTxGxK, out_BxTxHxK, probs, inv_sums)


def _vjp_bwd(block, res, dout_BxTxHxK):
  q_BxGxRxTxK, k_BxTxGxK, v_BxTxGxK, out_BxTxHxK, probs, inv_sums = res
  B, G, R, T, K = q_BxGxRxTxK.shape
  cdt = q_BxGxRxTxK.dtype
  dout_BxTxHxK = dout_BxTxHxK.astype(jnp.float32)
  # rowsum(dP * P) = rowsum(dO * O): per query row and head, computed in the input layout (a cheap reduce)
  delta_BxTxH = jnp.sum(dout_BxTxHxK * out_BxTxHxK.astype(jnp.float32), axis=-1)
  delta_BxGxRxTx1 = delta_BxTxH.reshape(B, T, G, R).transpose(0, 2, 3, 1)[..., None]
  dout_BxGxRxTxK = dout_BxTxHxK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
  k_BxGxTxK = permuted(k_BxTxGxK, (0, 2, 1, 3))
  vT_BxGxKxT = permuted(v_BxTxGxK, (0, 2, 3, 1))
  dq_blocks = []
  # dk and dv come out transposed (K x keys) so that their matmuls need no transposed score-sized operand
  dkT_BxGxKxT = jnp.zeros((B, G, K, T), jnp.float32)
  dvT_BxGxKxT = jnp.zeros((B, G, K, T), jnp.float32)
  for (s, e), p_BxGxRxQxS, inv_sum_BxGxRxQx1 in zip(query_blocks(T, block), probs, inv_sums, strict=True):
    Q = e - s
    p_BxGxRQxS = p_BxGxRxQxS.reshape(B, G, R * Q, e)
    # P = p * inv_sum row-wise: fold the row scale into dO (Q x K) instead of into p (Q x S)
    do_BxGxRxQxK = (dout_BxGxRxTxK[:, :, :, s:e] * inv_sum_BxGxRxQx1).astype(cdt)
    doT_BxGxKxRQ = permuted(do_BxGxRxQxK, (0, 1, 4, 2, 3)).reshape(B, G, K, R * Q)
    dvT_BxGxKxT = dvT_BxGxKxT.at[..., :e].add(_bmm(doT_BxGxKxRQ, p_BxGxRQxS))
    dp_BxGxRxQxS = _bmm(do_BxGxRxQxK.reshape(B, G, R * Q, K), vT_BxGxKxT[..., :e]).reshape(B, G, R, Q, e)
    ds_BxGxRxQxS = p_BxGxRxQxS.astype(jnp.float32) * (
        dp_BxGxRxQxS - inv_sum_BxGxRxQx1 * delta_BxGxRxTx1[:, :, :, s:e])
    ds_BxGxRQxS = ds_BxGxRxQxS.astype(cdt).reshape(B, G, R * Q, e)
    dq_blocks.append(_bmm(ds_BxGxRQxS, k_BxGxTxK[:, :, :e]).reshape(B, G, R, Q, K))
    qT_BxGxKxRQ = permuted(q_BxGxRxTxK[:, :, :, s:e], (0, 1, 4, 2, 3)).reshape(B, G, K, R * Q)
    dkT_BxGxKxT = dkT_BxGxKxT.at[..., :e].add(_bmm(qT_BxGxKxRQ, ds_BxGxRQxS))
  dq_BxTxHxK = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, G * R, K)
  return (dq_BxTxHxK.astype(cdt), dkT_BxGxKxT.transpose(0, 3, 1, 2).astype(k_BxTxGxK.dtype),
          dvT_BxGxKxT.transpose(0, 3, 1, 2).astype(v_BxTxGxK.dtype), None)


blocked_vjp_attention.defvjp(_vjp_fwd, _vjp_bwd)

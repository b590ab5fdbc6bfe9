"""Causal, document-masked softmax attention: one function, three implementations (`model.attention_impl`).

- `dense`: one T x T score matrix, differentiated by JAX. The reference the others are tested against.
- `blocked`: queries in blocks of `model.attention_block` rows; a block sees only the keys up to its own end,
  so the fully masked upper triangle is never computed. Differentiated by JAX.
- `blocked_vjp`: the same blocks with a hand-written backward pass, for 16-bit attention on CPU. Heads go
  head-major once per call, every matmul is a row-major bf16 x bf16 -> f32 product, softmax work stays
  float32, and the backward pass reuses the saved probabilities with the usual softmax identity
  dS = P * (dP - rowsum(dO * O)).
- `auto` (the default): `blocked_vjp` for 16-bit attention on CPU devices, `blocked` otherwise.

Why a hand-written backward: XLA:CPU runs a bf16 matmul on its fast kernels only when both operands are
row-major with the contraction on the last lhs and the first rhs axis (see layers.transposed). JAX's backward of
the `blocked` form takes transposed operands and bf16 elementwise ops, which XLA:CPU upcasts or emulates; the
bf16 step was then slower with bf16 attention than with float32 attention. With `blocked_vjp` bf16 attention is
the faster one (docs in README, Performance). All variants are exact: a query row's whole softmax lies in one
block, so no online rescaling is needed. q arrives pre-scaled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sktlm import layers

IMPLS = ('auto', 'blocked', 'blocked_vjp', 'dense')
NEG_INF = -1e30  # finite: a fully masked row cannot occur (a token always sees itself), but stay NaN-safe


def resolve_impl(impl: str, attention_dtype) -> str:
  """The implementation `auto` stands for: blocked_vjp for 16-bit attention on CPU devices, else blocked."""
  if impl not in IMPLS:
    raise ValueError(f"model.attention_impl must be one of {', '.join(IMPLS)}; got {impl!r}")
  if impl != 'auto':
    return impl
  cpu = layers.current_platform() == 'cpu'
  return 'blocked_vjp' if cpu and jnp.dtype(attention_dtype).itemsize < 4 else 'blocked'


def causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, impl: str = 'blocked', block: int = 64):
  """softmax(q k^T + mask) v per head; H query heads share G kv heads (H % G == 0). impl is resolved (not auto).

  block > 0 sets the query block of `blocked` and `blocked_vjp`; block <= 0 or >= T is one dense block.
  """
  if impl == 'dense':
    block = 0
  if impl == 'blocked_vjp':
    return blocked_vjp_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block)
  outs = [_attend(q_BxTxHxK[:, s:e], k_BxTxGxK[:, :e], v_BxTxGxK[:, :e], segment_ids_BxT[:, s:e],
                  segment_ids_BxT[:, :e], s) for s, e in _blocks(q_BxTxHxK.shape[1], block)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _blocks(T: int, block: int) -> list[tuple[int, int]]:
  """(start, end) of each query block."""
  block = T if block <= 0 else min(block, T)
  return [(s, min(s + block, T)) for s in range(0, T, block)]


def _mask(seg_q_BxQ, seg_k_BxS, q_offset: int):
  """Causal and same-document mask of queries at rows q_offset.. against keys at rows 0..S-1: BxQxS."""
  Q, S = seg_q_BxQ.shape[1], seg_k_BxS.shape[1]
  causal_QxS = (jnp.arange(Q)[:, None] + q_offset) >= jnp.arange(S)[None, :]
  return causal_QxS[None] & (seg_q_BxQ[:, :, None] == seg_k_BxS[:, None, :])


def _attend(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, seg_q_BxQ, seg_k_BxS, q_offset: int):
  """Queries at rows q_offset.. of the sequence against keys at rows 0..S-1 (JAX-differentiated)."""
  B, Q, H, K = q_BxQxHxK.shape
  G = k_BxSxGxK.shape[2]
  mask_Bx1xQxS = _mask(seg_q_BxQ, seg_k_BxS, q_offset)[:, None]
  cdt = q_BxQxHxK.dtype
  if G == H:  # plain multi-head attention: the standard layout, no reshapes
    att_BxHxQxS = jnp.einsum('bqhd,bkhd->bhqk', q_BxQxHxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    att_BxHxQxS = jnp.where(mask_Bx1xQxS, att_BxHxQxS, NEG_INF)
    probs_BxHxQxS = jax.nn.softmax(att_BxHxQxS, axis=-1).astype(cdt)
    return jnp.einsum('bhqk,bkhd->bqhd', probs_BxHxQxS, v_BxSxGxK)
  # grouped-query: H // G query heads share each kv head
  q_BxQxGxRxK = q_BxQxHxK.reshape(B, Q, G, H // G, K)
  att = jnp.einsum('bqngd,bknd->bngqk', q_BxQxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
  att = jnp.where(mask_Bx1xQxS[:, :, None], att, NEG_INF)
  probs = jax.nn.softmax(att, axis=-1).astype(cdt)
  return jnp.einsum('bngqk,bknd->bqngd', probs, v_BxSxGxK).reshape(B, Q, H, K)


def _bmm(a, b):
  """Batched a @ b over the leading axes, accumulated in float32."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blocked_vjp_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block: int):
  """The `blocked` attention with a hand-written backward pass; returns q's dtype."""
  return _vjp_fwd(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block)[0]


def _vjp_fwd(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxT, block):
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxTxGxK.shape[2]
  R = H // G  # query heads per kv head: their rows are stacked, so each kv head does one larger matmul
  cdt = q_BxTxHxK.dtype
  q_BxGxRxTxK = layers.permuted(q_BxTxHxK.reshape(B, T, G, R, K), (0, 2, 3, 1, 4))
  kT_BxGxKxT = layers.permuted(k_BxTxGxK, (0, 2, 3, 1))
  v_BxGxTxK = layers.permuted(v_BxTxGxK, (0, 2, 1, 3))
  outs, probs, inv_sums = [], [], []
  for s, e in _blocks(T, block):
    Q = e - s
    q_BxGxRQxK = q_BxGxRxTxK[:, :, :, s:e].reshape(B, G, R * Q, K)
    att_BxGxRxQxS = _bmm(q_BxGxRQxK, kT_BxGxKxT[..., :e]).reshape(B, G, R, Q, e)
    att_BxGxRxQxS = jnp.where(_mask(seg_BxT[:, s:e], seg_BxT[:, :e], s)[:, None, None], att_BxGxRxQxS, NEG_INF)
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
  k_BxGxTxK = layers.permuted(k_BxTxGxK, (0, 2, 1, 3))
  vT_BxGxKxT = layers.permuted(v_BxTxGxK, (0, 2, 3, 1))
  dq_blocks = []
  # dk and dv come out transposed (K x keys) so that their matmuls need no transposed score-sized operand
  dkT_BxGxKxT = jnp.zeros((B, G, K, T), jnp.float32)
  dvT_BxGxKxT = jnp.zeros((B, G, K, T), jnp.float32)
  for (s, e), p_BxGxRxQxS, inv_sum_BxGxRxQx1 in zip(_blocks(T, block), probs, inv_sums, strict=True):
    Q = e - s
    p_BxGxRQxS = p_BxGxRxQxS.reshape(B, G, R * Q, e)
    # P = p * inv_sum row-wise: fold the row scale into dO (Q x K) instead of into p (Q x S)
    do_BxGxRxQxK = (dout_BxGxRxTxK[:, :, :, s:e] * inv_sum_BxGxRxQx1).astype(cdt)
    doT_BxGxKxRQ = layers.permuted(do_BxGxRxQxK, (0, 1, 4, 2, 3)).reshape(B, G, K, R * Q)
    dvT_BxGxKxT = dvT_BxGxKxT.at[..., :e].add(_bmm(doT_BxGxKxRQ, p_BxGxRQxS))
    dp_BxGxRxQxS = _bmm(do_BxGxRxQxK.reshape(B, G, R * Q, K), vT_BxGxKxT[..., :e]).reshape(B, G, R, Q, e)
    ds_BxGxRxQxS = p_BxGxRxQxS.astype(jnp.float32) * (
        dp_BxGxRxQxS - inv_sum_BxGxRxQx1 * delta_BxGxRxTx1[:, :, :, s:e])
    ds_BxGxRQxS = ds_BxGxRxQxS.astype(cdt).reshape(B, G, R * Q, e)
    dq_blocks.append(_bmm(ds_BxGxRQxS, k_BxGxTxK[:, :, :e]).reshape(B, G, R, Q, K))
    qT_BxGxKxRQ = layers.permuted(q_BxGxRxTxK[:, :, :, s:e], (0, 1, 4, 2, 3)).reshape(B, G, K, R * Q)
    dkT_BxGxKxT = dkT_BxGxKxT.at[..., :e].add(_bmm(qT_BxGxKxRQ, ds_BxGxRQxS))
  dq_BxTxHxK = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, G * R, K)
  return (dq_BxTxHxK.astype(cdt), dkT_BxGxKxT.transpose(0, 3, 1, 2).astype(k_BxTxGxK.dtype),
          dvT_BxGxKxT.transpose(0, 3, 1, 2).astype(v_BxTxGxK.dtype), None)


blocked_vjp_attention.defvjp(_vjp_fwd, _vjp_bwd)

"""Causal, document-masked softmax attention, plain jnp differentiated by JAX: the reference implementations.

- `dense`: one T x T score matrix. The reference every other implementation is tested against.
- `blocked`: queries in blocks of `block` rows; a block sees only the keys up to its own end, so the fully
  masked upper triangle is never computed. Exact: a query row's whole softmax lies in one block, so no online
  rescaling is needed.

Both share the kernel interface of sktlm/model/kernels (`fn(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *,
block) -> out_BxTxHxK`, q pre-scaled by 1/sqrt(K), H query heads sharing G kv heads, segment id 0 = padding);
the platform kernels (blocked_vjp on CPU, splash on TPU, flash on GPU) implement the same function.
`model.attention_impl` picks one; sktlm.train.resolve resolves `auto` (sktlm/model/kernels/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a fully masked row cannot occur (a token always sees itself), but stay NaN-safe


def dense(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int = 0):
  """softmax(q k^T + mask) v per head over the whole T x T matrix (`block` is ignored)."""
  del block
  return _attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, segment_ids_BxT, 0)


def blocked(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int):
  """`dense` in query blocks of `block` rows (block <= 0 or >= T: one dense block)."""
  outs = [_attend(q_BxTxHxK[:, s:e], k_BxTxGxK[:, :e], v_BxTxGxK[:, :e], segment_ids_BxT[:, s:e],
                  segment_ids_BxT[:, :e], s) for s, e in query_blocks(q_BxTxHxK.shape[1], block)]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def query_blocks(T: int, block: int) -> list[tuple[int, int]]:
  """(start, end) of each query block."""
  block = T if block <= 0 else min(block, T)
  return [(s, min(s + block, T)) for s in range(0, T, block)]


def mask(seg_q_BxQ, seg_k_BxS, q_offset: int):
  """Causal and same-document mask of queries at rows q_offset.. against keys at rows 0..S-1: BxQxS."""
  Q, S = seg_q_BxQ.shape[1], seg_k_BxS.shape[1]
  causal_QxS = (jnp.arange(Q)[:, None] + q_offset) >= jnp.arange(S)[None, :]
  return causal_QxS[None] & (seg_q_BxQ[:, :, None] == seg_k_BxS[:, None, :])


def _attend(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, seg_q_BxQ, seg_k_BxS, q_offset: int):
  """Queries at rows q_offset.. of the sequence against keys at rows 0..S-1."""
  B, Q, H, K = q_BxQxHxK.shape
  G = k_BxSxGxK.shape[2]
  mask_Bx1xQxS = mask(seg_q_BxQ, seg_k_BxS, q_offset)[:, None]
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


def cached_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, index):
  """Decoding against a KV cache: queries at slots index..index+T-1 attend to the cache slots <= their own
  (later slots are unwritten or stale). One document per row, so no segment mask. Float32 scores."""
  B, T, H, K = q_BxTxHxK.shape
  S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  mask_TxS = (index + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
  q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
  att = jnp.einsum('btgrk,bsgk->bgrts', q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.where(mask_TxS, att, NEG_INF), axis=-1).astype(q_BxTxHxK.dtype)
  return jnp.einsum('bgrts,bsgk->btgrk', probs, v_BxSxGxK).reshape(B, T, H, K)

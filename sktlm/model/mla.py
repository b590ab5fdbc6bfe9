"""Multi-head latent attention (MLA, DeepSeek-V2/V3), `model.attention = 'mla'` with `model.mla`.

Per token x (D wide), with H heads, nope/rope/v head dims N, R, V and latent ranks Lq, Lkv:
- queries: c_q = RMSNorm(x Wq_a) (Lq wide), q = c_q Wq_b (H x (N + R)); with q_lora_rank = 0, q = x Wq
  (DeepSeek-V2-Lite). The last R dims of every head get RoPE.
- keys/values: c_kv = RMSNorm(x Wkv_a) (Lkv wide, the latent an inference cache stores), k_nope = c_kv Wk_b
  (H x N), v = c_kv Wv_b (H x V); one decoupled rope key k_rope = RoPE(x Wk_rope) (R wide) is shared by all
  heads, so a head's key is [k_nope_h, k_rope].
- softmax scale 1/sqrt(N + R); out = concat_h(attn_h) Wo, Wo: H x V -> D.
DeepSeek fuses Wkv_a and Wk_rope into one D x (Lkv + R) matrix and Wk_b/Wv_b into one; they are separate here
(same function, same counts) so that every weight has its own logical axis names. RoPE is the codebase's
rotate-half form (DeepSeek's checkpoints rotate interleaved pairs: a fixed permutation of the R dims).

The attention core is the kernel set's (sktlm/model/kernels: `model.attention_impl`), or its context-parallel form
(sktlm/model/context.py) when the mesh has a `context` axis, used as multi-head attention (G = H). The core
takes one head dim for q, k and v, so when V != N + R the narrower side is zero-padded (zero value columns
give zero output columns, sliced off; zero query/key columns add nothing to the scores). For DeepSeek's dims
(N + R = 192, V = 128) that pads v: the AV matmul does 192/128 of its work, ~3% of the flagship's step
(sktlm.config.accounting counts the unpadded work).

Context parallelism (mesh `context` > 1): what crosses devices is the latent c_kv and the rope key (Lkv + R =
576 values per token), not the per-head keys and values (H x (N + R + V) = 20,480 for 64 heads): the latents
are all-gathered over the sequence and every context shard up-projects the full-length keys and values
itself. See sktlm/model/context.py.

Decoding (`decode=True`, sktlm/tools/decode.py): the cache holds only the latent c_kv and the roped shared key,
Lkv + R values per token and layer (576 for DeepSeek-V3's dims, against 2 x H x (N + R) expanded), and is never
expanded. The up-projections are absorbed as DeepSeek-V2 (sec. 2.1.3) describes: a head's nope score
q_h . (c Wk_b,h) = (q_h Wk_b,h^T) . c, so each query is mapped into the latent space once (H x Lkv) and scored
against the cached latents directly; the attention-weighted latent is mapped to values by Wv_b,h afterwards
(sum_s p_s c_s Wv_b,h), then Wo. Per new token that is O(H x Lkv) work per cached position instead of
re-projecting every cached latent to H x (N + V).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sktlm.model import context, kernels, mup
from sktlm.model.layers import RMSNorm, dtype, param_init, rope, softmax_scale_factor
from sktlm.sharding import constrain


def _pad_last(x, width: int):
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


NEG_INF = -1e30


class MLAttention(nn.Module):
  config: object
  decode: bool = False  # latent KV cache in the 'cache' collection, absorbed up-projections (module doc)

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c, a = self.config, self.config.mla
    D, H = c.d_model, c.n_heads
    N, R, V, Lq, Lkv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank, a.kv_lora_rank
    cdt, pdt = dtype(c.dtype), dtype(c.param_dtype)
    adt = dtype(c.attention_dtype or c.dtype)
    ops = kernels.ops(c)
    dense = ops.dense

    def w(name, shape, names, out=False):
      return self.param(name, nn.with_logical_partitioning(param_init(c, scale_by_depth=out), names), shape, pdt)

    B, T, _ = x_BxTxD.shape
    x_NxD = x_BxTxD.astype(cdt).reshape(B * T, D)
    eps = a.latent_norm_eps  # 0: model.norm_eps; DeepSeek-V3 uses 1e-6 for both latent norms
    if Lq > 0:
      wq_a = w('wq_a', (D, Lq), ('embed', 'q_lora'))
      wq_b = w('wq_b', (Lq, H, N + R), ('q_lora', 'heads', 'kv'))
      cq_NxL = RMSNorm(c, eps, name='q_norm')(dense(x_NxD, wq_a))
      q_NxHK = dense(cq_NxL, wq_b.reshape(Lq, H * (N + R)))
    else:
      wq = w('wq', (D, H, N + R), ('embed', 'heads', 'kv'))
      q_NxHK = dense(x_NxD, wq.reshape(D, H * (N + R)))
    wkv_a = w('wkv_a', (D, Lkv), ('embed', 'kv_lora'))
    wk_rope = w('wk_rope', (D, R), ('embed', 'kv'))
    wk_b = w('wk_b', (Lkv, H, N), ('kv_lora', 'heads', 'kv'))
    wv_b = w('wv_b', (Lkv, H, V), ('kv_lora', 'heads', 'kv'))
    wo = w('wo', (H, V, D), ('heads', 'kv', 'embed'), out=True)

    q_BxTxHxK = q_NxHK.reshape(B, T, H, N + R)
    q_rope = rope(q_BxTxHxK[..., N:], positions_BxT, c, jnp.float32)
    q_BxTxHxK = jnp.concatenate([q_BxTxHxK[..., :N].astype(jnp.float32), q_rope], axis=-1)
    scale = mup.attention_scale(c, N + R) * softmax_scale_factor(c)  # SP: 1/sqrt(N + R) (x YaRN's mscale^2)
    q_BxTxHxK = (q_BxTxHxK * scale).astype(adt)

    # The latents: what context parallelism all-gathers (length-replicated from here on when it is on).
    kv_len = context.kv_length_axis()
    ckv_BxTxL = RMSNorm(c, eps, name='kv_norm')(dense(x_NxD, wkv_a)).reshape(B, T, Lkv)
    krope_BxTx1xR = rope(dense(x_NxD, wk_rope).reshape(B, T, 1, R), positions_BxT, c, adt)
    if self.decode:
      out_BxTxHxV = self._cached(q_BxTxHxK, ckv_BxTxL.astype(adt), krope_BxTx1xR[:, :, 0], wk_b, wv_b)
      if out_BxTxHxV is not None:
        return self._out(out_BxTxHxV.astype(cdt), wo, dense)
    ckv_BxTxL = constrain(ckv_BxTxL, ('batch', kv_len, None))
    krope_BxTx1xR = constrain(krope_BxTx1xR, ('batch', kv_len, None, None))
    Tk = ckv_BxTxL.shape[1]
    ckv_MxL = ckv_BxTxL.reshape(B * Tk, Lkv)
    knope_BxTxHxN = dense(ckv_MxL, wk_b.reshape(Lkv, H * N)).reshape(B, Tk, H, N).astype(adt)
    v_BxTxHxV = dense(ckv_MxL, wv_b.reshape(Lkv, H * V)).reshape(B, Tk, H, V).astype(adt)
    k_BxTxHxK = jnp.concatenate([knope_BxTxHxN, jnp.broadcast_to(krope_BxTx1xR, (B, Tk, H, R))], axis=-1)

    K = max(N + R, V)  # the core's one head dim: zero-pad the narrower side (module doc)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (_pad_last(t, K) for t in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxV))
    q_BxTxHxK = constrain(q_BxTxHxK, ('batch', 'length', 'act_heads', 'kv'))
    k_BxTxHxK = constrain(k_BxTxHxK, ('batch', kv_len, 'act_heads', 'kv'))
    v_BxTxHxK = constrain(v_BxTxHxK, ('batch', kv_len, 'act_heads', 'kv'))
    out_BxTxHxK = context.causal_attention(ops.causal_attention, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_ids_BxT,
                                           block=c.attention_block, kv_full_length=kv_len is None,
                                           kv_heads='act_heads')
    return self._out(out_BxTxHxK.astype(cdt)[..., :V], wo, dense)

  def _out(self, out_BxTxHxV, wo_HxVxD, dense):
    B, T, H, V = out_BxTxHxV.shape
    D = wo_HxVxD.shape[-1]
    out_BxTxHxV = constrain(out_BxTxHxV, ('batch', 'length', 'act_heads', 'kv'))
    out_BxTxD = dense(out_BxTxHxV.reshape(B * T, H * V), wo_HxVxD.reshape(H * V, D)).reshape(B, T, D)
    return constrain(out_BxTxD, ('batch', 'length', 'act_embed'))

  def _cached(self, q_BxTxHxK, ckv_BxTxL, krope_BxTxR, wk_b_LxHxN, wv_b_LxHxV):
    """Latent KV cache: init (model.init on a B x S input) creates B x S x Lkv latents and B x S x R rope keys
    and returns None (plain attention); later calls write this chunk at slots index.. and attend, with the
    absorbed up-projections, to the slots <= each query's own. RoPE positions equal slots (tools/decode.py)."""
    c = self.config
    N = c.mla.qk_nope_head_dim
    ckv = self.variable('cache', 'ckv', jnp.zeros, ckv_BxTxL.shape, ckv_BxTxL.dtype)
    krope = self.variable('cache', 'krope', jnp.zeros, krope_BxTxR.shape, krope_BxTxR.dtype)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():
      return None
    ckv.value = jax.lax.dynamic_update_slice(ckv.value, ckv_BxTxL, (0, index.value, 0))
    krope.value = jax.lax.dynamic_update_slice(krope.value, krope_BxTxR, (0, index.value, 0))
    T, S = q_BxTxHxK.shape[1], ckv.value.shape[1]
    adt, f32 = q_BxTxHxK.dtype, jnp.float32
    # Queries into the latent space: q_nope Wk_b^T (H x Lkv per token); the rope part scores the shared key.
    qlat_BxTxHxL = jnp.einsum('bthn,lhn->bthl', q_BxTxHxK[..., :N], wk_b_LxHxN.astype(adt),
                              preferred_element_type=f32).astype(adt)
    att_BxHxTxS = (jnp.einsum('bthl,bsl->bhts', qlat_BxTxHxL, ckv.value, preferred_element_type=f32)
                   + jnp.einsum('bthr,bsr->bhts', q_BxTxHxK[..., N:], krope.value, preferred_element_type=f32))
    mask_TxS = (index.value + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
    probs = jax.nn.softmax(jnp.where(mask_TxS, att_BxHxTxS, NEG_INF), axis=-1).astype(adt)
    olat_BxTxHxL = jnp.einsum('bhts,bsl->bthl', probs, ckv.value, preferred_element_type=f32).astype(adt)
    index.value = index.value + T
    return jnp.einsum('bthl,lhv->bthv', olat_BxTxHxL, wv_b_LxHxV.astype(adt), preferred_element_type=f32)

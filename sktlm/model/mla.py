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
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sktlm.model import context, kernels, mup
from sktlm.model.layers import RMSNorm, dtype, param_init, rope
from sktlm.sharding import constrain


def _pad_last(x, width: int):
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class MLAttention(nn.Module):
  config: object

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
    if Lq > 0:
      wq_a = w('wq_a', (D, Lq), ('embed', 'q_lora'))
      wq_b = w('wq_b', (Lq, H, N + R), ('q_lora', 'heads', 'kv'))
      cq_NxL = RMSNorm(c, name='q_norm')(dense(x_NxD, wq_a))
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
    q_rope = rope(q_BxTxHxK[..., N:], positions_BxT, c.rope_theta, jnp.float32)
    q_BxTxHxK = jnp.concatenate([q_BxTxHxK[..., :N].astype(jnp.float32), q_rope], axis=-1)
    q_BxTxHxK = (q_BxTxHxK * mup.attention_scale(c, N + R)).astype(adt)  # SP: 1/sqrt(N + R)

    # The latents: what context parallelism all-gathers (length-replicated from here on when it is on).
    kv_len = context.kv_length_axis()
    ckv_BxTxL = RMSNorm(c, name='kv_norm')(dense(x_NxD, wkv_a)).reshape(B, T, Lkv)
    ckv_BxTxL = constrain(ckv_BxTxL, ('batch', kv_len, None))
    krope_BxTx1xR = rope(dense(x_NxD, wk_rope).reshape(B, T, 1, R), positions_BxT, c.rope_theta, adt)
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
    out_BxTxHxV = out_BxTxHxK.astype(cdt)[..., :V]
    out_BxTxHxV = constrain(out_BxTxHxV, ('batch', 'length', 'act_heads', 'kv'))
    out_BxTxD = dense(out_BxTxHxV.reshape(B * T, H * V), wo.reshape(H * V, D)).reshape(B, T, D)
    return constrain(out_BxTxD, ('batch', 'length', 'act_embed'))

"""Llama-style decoder-only LM in Flax linen: pure init/apply, logical axis names only.

Token embedding -> N x [pre-norm GQA attention with RoPE, pre-norm SwiGLU MLP or MoE] -> final RMSNorm ->
tied or untied output head. Packed rows: `segment_ids` (0 = padding) and `positions` keep attention inside
each document. Blocks are stacked with nn.scan (compile time independent of depth) or a Python loop, with an
optional remat policy; both give the same function (tests/test_model.py). The matmuls, the embedding and
attention come from the config's kernel set (`kernels.ops`: plain jnp unless sktlm.train.resolve chose a platform's).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sktlm.config import layout
from sktlm.model import attention, context, kernels, mup
from sktlm.model.layers import Mlp, RMSNorm, dtype, param_init, rope, softmax_scale_factor
from sktlm.model.mla import MLAttention
from sktlm.sharding import constrain


class Attention(nn.Module):
  config: object
  decode: bool = False  # KV cache in the 'cache' collection (sktlm/tools/decode.py)

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c = self.config
    D, H, KV, K = c.d_model, c.n_heads, c.n_kv_heads, layout.head_dim(c)
    cdt, pdt = dtype(c.dtype), dtype(c.param_dtype)
    ops = kernels.ops(c)

    def w(name, shape, names, out=False):
      init = param_init(c, scale_by_depth=out)
      return self.param(name, nn.with_logical_partitioning(init, names), shape, pdt)

    wq = w('wq', (D, H, K), ('embed', 'heads', 'kv'))
    wk = w('wk', (D, KV, K), ('embed', 'kv_heads', 'kv'))
    wv = w('wv', (D, KV, K), ('embed', 'kv_heads', 'kv'))
    wo = w('wo', (H, K, D), ('heads', 'kv', 'embed'), out=True)

    B, T, _ = x_BxTxD.shape
    x_NxD = x_BxTxD.astype(cdt).reshape(B * T, D)
    q_BxTxHxK = ops.dense(x_NxD, wq.reshape(D, H * K)).reshape(B, T, H, K)
    k_BxTxGxK = ops.dense(x_NxD, wk.reshape(D, KV * K)).reshape(B, T, KV, K)
    v_BxTxGxK = ops.dense(x_NxD, wv.reshape(D, KV * K)).reshape(B, T, KV, K)
    adt = dtype(c.attention_dtype or c.dtype)
    scale = mup.attention_scale(c, K) * softmax_scale_factor(c)  # SP: 1/sqrt(K) (x YaRN's mscale^2)
    q_BxTxHxK = (rope(q_BxTxHxK, positions_BxT, c, jnp.float32) * scale).astype(adt)
    k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, c, adt)
    v_BxTxGxK = v_BxTxGxK.astype(adt)
    q_BxTxHxK = constrain(q_BxTxHxK, ('batch', 'length', 'act_heads', 'kv'))
    k_BxTxGxK = constrain(k_BxTxGxK, ('batch', 'length', 'act_kv_heads', 'kv'))
    v_BxTxGxK = constrain(v_BxTxGxK, ('batch', 'length', 'act_kv_heads', 'kv'))

    out_BxTxHxK = self._cached(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK) if self.decode else None
    if out_BxTxHxK is None:
      out_BxTxHxK = context.causal_attention(ops.causal_attention, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT,
                                             block=c.attention_block)
    out_BxTxHxK = out_BxTxHxK.astype(cdt)
    out_BxTxHxK = constrain(out_BxTxHxK, ('batch', 'length', 'act_heads', 'kv'))
    out_BxTxD = ops.dense(out_BxTxHxK.reshape(B * T, H * K), wo.reshape(H * K, D)).reshape(B, T, D)
    return constrain(out_BxTxD, ('batch', 'length', 'act_embed'))

  def _cached(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK):
    """KV cache: init (model.init on a B x S input) creates B x S x G x K buffers and returns None (plain
    attention); later calls write this chunk's keys/values at slots index.. and attend to the slots <= each
    query's own. The caller keeps RoPE positions equal to slots (sktlm/tools/decode.py)."""
    ck = self.variable('cache', 'k', jnp.zeros, k_BxTxGxK.shape, k_BxTxGxK.dtype)
    cv = self.variable('cache', 'v', jnp.zeros, v_BxTxGxK.shape, v_BxTxGxK.dtype)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():
      return None
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxTxGxK, (0, index.value, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxTxGxK, (0, index.value, 0, 0))
    out = attention.cached_attention(q_BxTxHxK, ck.value, cv.value, index.value)
    index.value = index.value + q_BxTxHxK.shape[1]
    return out


class Block(nn.Module):
  """One pre-norm decoder layer. Returns (x, aux) so it can be the body of nn.scan."""
  config: object
  use_moe: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    c = self.config
    r = mup.residual_multiplier(c)  # CompleteP / depth-muP: m_L^-alpha on both branches (GQA or MLA, MLP or MoE)
    branch = (lambda y: y) if r == 1.0 else (lambda y: y * r)  # sp/mup: the graph as before
    attn = MLAttention(c, self.decode, name='attn') if c.attention == 'mla' else Attention(c, self.decode, name='attn')
    h = x_BxTxD + branch(attn(RMSNorm(c, name='attn_norm')(x_BxTxD), positions_BxT, segment_ids_BxT))
    if self.use_moe:
      from sktlm.model.moe import MoEFeedForward  # floor 3 sibling; imported lazily so dense models never need it
      ffn = MoEFeedForward(c, name='moe')
    else:
      mlp = Mlp(c, d_ff=c.d_ff, name='mlp')
      ffn = lambda x: (mlp(x), {})  # noqa: E731
    y, aux = context.in_token_groups(ffn, RMSNorm(c, name='mlp_norm')(h))
    out = constrain(h + branch(y), ('batch', 'length', 'act_embed'))
    return out, aux


REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_cls(config):
  if config.remat == 'none':
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)


def scan_unroll(config, n_layers: int) -> int:
  """Layers per iteration of a scanned stack of n_layers. sktlm.train.resolve resolves 0 (auto) for the platform
  (sktlm/model/kernels: all layers on CPU, 1 on TPU/GPU); unresolved it means a rolled loop. Parameters keep the
  scanned layout either way, so checkpoints do not depend on it."""
  return min(max(config.scan_unroll, 1), n_layers)


class Transformer(nn.Module):
  """`config` is config.model as a FrozenConfigDict (hashable), with a resolved vocab_size."""
  config: ml_collections.FrozenConfigDict
  decode: bool = False  # KV-cached attention (sktlm/tools/decode.py); the 'cache' collection is made by init

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    """Returns (logits_BxTxV float32, aux) where aux maps name -> per-layer stacked MoE statistics."""
    c = self.config
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    cdt, pdt = dtype(c.dtype), dtype(c.param_dtype)
    ops = kernels.ops(c)

    embed_init = nn.with_logical_partitioning(param_init(c, kind='embedding'), ('vocab', 'embed'))
    embedding = self.param('embedding', embed_init, (c.vocab_size, c.d_model), pdt)
    x_BxTxD = ops.embed(tokens_BxT.reshape(B * T), embedding, cdt).reshape(B, T, c.d_model)
    x_BxTxD = constrain(x_BxTxD, ('batch', 'length', 'act_embed'))

    block_cls = _block_cls(c)
    aux_all = {}
    for name, n, use_moe in layout.layer_groups(c):
      if c.scan_layers:
        # MoE routing biases and loads (model/moe.py), the decode KV cache (tools/decode.py) and captured
        # intermediates (tools/coord_check.py) are per layer too.
        stack = nn.scan(block_cls, variable_axes={'params': 0, 'moe_bias': 0, 'moe_load': 0, 'cache': 0,
                                                  'intermediates': 0},
                        split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast), length=n,
                        metadata_params={nn.PARTITION_NAME: 'layers'}, unroll=scan_unroll(c, n))
        x_BxTxD, aux = stack(c, use_moe, self.decode, name=name)(x_BxTxD, positions_BxT, segment_ids_BxT)
      else:
        auxes = []
        for i in range(n):
          x_BxTxD, a = block_cls(c, use_moe, self.decode, name=f'{name}_{i}')(x_BxTxD, positions_BxT,
                                                                             segment_ids_BxT)
          auxes.append(a)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else {}
      for k, v in aux.items():
        aux_all[k] = jnp.concatenate([aux_all[k], v]) if k in aux_all else v

    x_BxTxD = RMSNorm(c, name='final_norm')(x_BxTxD)
    if c.tie_embeddings:
      head_DxV = ops.transposed(embedding)
    else:
      head_init = nn.with_logical_partitioning(param_init(c, kind='head'), ('embed', 'vocab'))
      head_DxV = self.param('head', head_init, (c.d_model, c.vocab_size), pdt)
    logits_NxV = ops.dense(x_BxTxD.reshape(B * T, c.d_model), head_DxV, jnp.float32)
    if mup.is_mup(c):
      logits_NxV = logits_NxV * mup.logit_multiplier(c)
    logits_BxTxV = logits_NxV.reshape(B, T, c.vocab_size)
    return constrain(logits_BxTxV, ('batch', 'length', 'act_vocab')), aux_all


def make_model(model_cfg, decode: bool = False) -> Transformer:
  return Transformer(ml_collections.FrozenConfigDict(model_cfg), decode)

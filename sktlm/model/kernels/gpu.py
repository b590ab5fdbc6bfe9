"""Causal, document-masked attention on GPU: the Pallas (Triton) flash attention with segment ids.

`jax.experimental.pallas.ops.gpu.attention.mha` honours `segment_ids`, so packed rows never attend across
documents. Not cuDNN through `jax.nn.dot_product_attention`: on packed rows it silently attends across
documents on jax 0.10.2 (MaxText issue #4476). The kernel wants as many kv heads as query heads, so grouped
kv heads are repeated (autodiff sums their gradients back). q arrives scaled by 1/sqrt(K), hence sm_scale 1.
Rows and heads are split over the mesh as the model shards them (sktlm/model/kernels/sharded.py).

`block` (model.attention_block) sets the forward tile (a power of two in [16, 128]); the backward tiles are
the library's 32 (or the forward tile if smaller). Rows are padded to a multiple of the tile.
`interpret=True` runs the kernel in Pallas' interpreter, on any platform (the CPU tests).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from sktlm.model.kernels import sharded


def tile_size(block: int, T: int) -> int:
  """Forward tile: the power of two >= min(block, T), within [16, 128]."""
  n = max(16, min(block if block > 0 else 128, T, 128))
  return 1 << (n - 1).bit_length()


def causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int, interpret: bool = False):
  """softmax(q k^T + causal and same-document mask) v; H query heads share G kv heads; returns q's dtype."""
  kernel = functools.partial(_attention, block=block, interpret=interpret)
  return sharded.per_shard(kernel, sharded.context_mesh(), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)


def _attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block, interpret):
  """One device's rows and heads."""
  T, H, G = q_BxTxHxK.shape[1], q_BxTxHxK.shape[2], k_BxTxGxK.shape[2]
  k_BxTxHxK, v_BxTxHxK = (jnp.repeat(x, H // G, axis=2) for x in (k_BxTxGxK, v_BxTxGxK))
  tile = tile_size(block, T)
  q, k, v, seg_BxS = sharded.pad_rows(T, tile, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, segment_ids_BxT=segment_ids_BxT)
  bwd = min(32, tile)
  sizes = pallas_attention.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=bwd, block_kv_dkv=bwd,
                                      block_q_dq=bwd, block_kv_dq=bwd)
  out = pallas_attention.mha(q, k, v, seg_BxS, sm_scale=1.0, causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :T]

"""Causal, document-masked attention on TPU: the Pallas splash attention kernel (Mosaic).

`jax.experimental.pallas.ops.tpu.splash_attention`, as MaxText uses it: a static causal mask (fully masked
key tiles are skipped, not computed) and'ed with `segment_ids` for packed rows, so no query ever attends
across documents; grouped-query attention natively (H query heads over G kv heads); its own fused backward
kernels (dq and dkv). q arrives scaled by 1/sqrt(K). Rows and heads are split over the mesh as the model
shards them (sktlm/model/kernels/sharded.py); each device runs the kernel on its shard, vmapped over its rows.

`block` (model.attention_block) sets the square tile, rounded up to the 128 lanes the kernel needs and at
most the padded sequence; rows are padded to a multiple of it (sharded.pad_rows). `interpret=True` runs the
kernel in Pallas' interpreter, on any platform (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from sktlm.model.kernels import sharded

LANES = 128  # splash's key tiles must be multiples of the TPU lane width


def tile_size(block: int, T: int) -> int:
  """The square q/kv tile for `block` queries: a multiple of 128, at most T rounded up to 128."""
  def up(n):
    return -(-max(n, 1) // LANES) * LANES
  return min(up(block), up(T))


def causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int, interpret: bool = False):
  """softmax(q k^T + causal and same-document mask) v; H query heads share G kv heads; returns q's dtype."""
  kernel = functools.partial(_attention, block=block, interpret=interpret)
  return sharded.per_shard(kernel, sharded.context_mesh(), q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)


def _attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block, interpret):
  """One device's rows and heads."""
  B, T, H, K = q_BxTxHxK.shape
  tile = tile_size(block, T)
  q, k, v, seg_BxS = sharded.pad_rows(T, tile, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT=segment_ids_BxT)
  S = seg_BxS.shape[1]
  q_BxHxSxK, k_BxGxSxK, v_BxGxSxK = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  kernel = make_kernel(S, H, tile, interpret)
  ids = splash.SegmentIds(q=seg_BxS, kv=seg_BxS)
  out_BxHxSxK = jax.vmap(kernel)(q_BxHxSxK, k_BxGxSxK, v_BxGxSxK, segment_ids=ids)
  return out_BxHxSxK.transpose(0, 2, 1, 3)[:, :T]


def make_kernel(S: int, H: int, tile: int, interpret: bool = False):
  """The splash kernel for sequences of S (a multiple of tile) and H query heads, causal."""
  mask = splash.MultiHeadMask([splash.CausalMask((S, S)) for _ in range(H)])
  sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                            block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

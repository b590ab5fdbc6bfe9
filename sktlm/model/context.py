"""Context (sequence) parallelism: the `context` mesh axis splits every sequence; attention stays exact.

The logical 'length' axis maps to the `context` mesh axis (config.sharding_rules), so activations are
[batch, length/C, ...] per device and everything but attention is per-token work that needs no change. Attention
needs every earlier key of the sequence. Design: **all-gather the keys and values over the context axis once
per layer, then attend locally** (a shard_map over the mesh): shard c holds queries at global rows
[c S, (c + 1) S), S = T / C, and attends to the gathered T keys with the causal mask shifted by c S and the
documents' segment ids (also gathered). Autodiff turns the all-gather into a reduce-scatter of the key/value
gradients. Exact: the same softmax over the same keys as the unsharded path (tests/test_context.py).

Why all-gather and not ring attention, for the flagship's 131K context on v5p (C = 32, S = 4096, 64 heads):
- MLA makes the gathered tensor small: the per-token latent (512) and shared rope key (64) are gathered, not
  the 64-head keys and values (sktlm/model/mla.py): 131,072 x 576 bf16 = 151 MB per layer per device, ~1-2 ms on
  v5p's ICI against ~0.5 s of compute per layer. Ring attention's win - never holding all keys - is worth
  151 MB here; its price is C sequential steps with an online-softmax rescale, a hand-written backward pass
  that runs the ring again, and communication hidden only if each step's compute covers it.
- The full-length keys and values a shard up-projects are transient (5.4 GB bf16 for one layer, freed after
  it with remat); the score matrix is what needs bounding, and is bounded here by the query blocks below.
- The price: every shard up-projects all T keys/values (C x the Wk_b/Wv_b work on keys: ~10% of the flagship
  step at C = 32) and attends to all T keys, masked, while shard c needs only the first (c + 1) S: per shard
  the work of the full T x T convention (`exact` in sktlm.config.accounting), with shard C - 1 doing the useful maximum.
  A zigzag layout (shard c holding chunks c and 2C - 1 - c) would balance the causal work; not done.
For GQA the per-head keys and values themselves are gathered (8 kv heads x 256 = 2048 values per token).

Memory: per shard, queries go in blocks of `model.attention_block` rows, each against all T keys, under
jax.checkpoint, so the backward pass recomputes one block's scores at a time: the live score memory is
block x T x heads (float32), never S x T x heads (at 131K, 64 heads and block 64: 2.1 GB per block instead of
137 GB). With context = 1 (the default) attention is the kernel set's (sktlm/model/kernels), unchanged.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sktlm.errors import UserError
from sktlm.model import attention
from sktlm.sharding import constrain

AXIS = 'context'
NEG_INF = attention.NEG_INF


def context_size(mesh=None) -> int:
  """Devices along the context axis of `mesh` (default: the mesh of sharding.activation_context, i.e. of the step
  being traced); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if AXIS not in getattr(mesh, 'axis_names', ()):
    return 1
  return int(dict(mesh.shape)[AXIS])


def kv_length_axis() -> str | None:
  """Logical name for the length axis of gathered keys/values: None (replicated) under context parallelism."""
  return None if context_size() > 1 else 'length'


def causal_attention(attend, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block: int,
                     kv_full_length: bool = False, kv_heads: str = 'act_kv_heads'):
  """`attend` (the kernel set's causal attention, sktlm/model/kernels: q pre-scaled) when the mesh has no context axis
  (> 1), else its context-parallel form below. kv_full_length: k and v are already length-replicated (gathered
  by the caller, e.g. MLA's latents); otherwise they are sharded like q and gathered here. kv_heads: the logical
  name of k/v's head axis."""
  mesh = jax.sharding.get_abstract_mesh()
  n = context_size(mesh)
  if n == 1:
    return attend(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, block=block)
  B, T = segment_ids_BxT.shape
  if T % n:  # data.seq_len divides the axis (validate); a length traced by decode may not
    raise UserError(f'sequence length {T} does not divide the context mesh axis ({n} devices)')
  rules = nn.get_logical_axis_rules()  # 'length' -> the context axis (validate)
  kv_len = None if kv_full_length else 'length'
  q_spec = _spec(mesh, rules, ('batch', 'length', 'act_heads', 'kv'), q_BxTxHxK.shape)
  kv_spec = _spec(mesh, rules, ('batch', kv_len, kv_heads, 'kv'), k_BxTxGxK.shape)
  seg_spec = _spec(mesh, rules, ('batch', 'length'), segment_ids_BxT.shape)
  local = functools.partial(_local_attention, block=block, gather_kv=not kv_full_length)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec)(
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)


def _spec(mesh, rules, names, shape) -> P:
  """The mesh spec of logical `names`, leaving replicated any dimension its mesh axes do not divide (e.g. the
  batch of 1 that `init` traces with); the length axis always divides (checked above)."""
  spec = nn.logical_to_mesh_axes(names, rules)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    size = math.prod(dict(mesh.shape)[a] for a in ((axes,) if isinstance(axes, str) else (axes or ())))
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def _local_attention(q_BxSxHxK, k_BxTxGxK, v_BxTxGxK, seg_q_BxS, *, block: int, gather_kv: bool):
  """One context shard: its S queries (global rows c S ..) against all T keys of the sequence."""
  if gather_kv:
    k_BxTxGxK = jax.lax.all_gather(k_BxTxGxK, AXIS, axis=1, tiled=True)
    v_BxTxGxK = jax.lax.all_gather(v_BxTxGxK, AXIS, axis=1, tiled=True)
  seg_k_BxT = jax.lax.all_gather(seg_q_BxS, AXIS, axis=1, tiled=True)
  B, S, H, K = q_BxSxHxK.shape
  offset = jax.lax.axis_index(AXIS) * S
  Q = block if 0 < block < S and S % block == 0 else S
  n_blocks = S // Q
  q_NxBxQxHxK = q_BxSxHxK.reshape(B, n_blocks, Q, H, K).swapaxes(0, 1)
  seg_NxBxQ = seg_q_BxS.reshape(B, n_blocks, Q).swapaxes(0, 1)

  @jax.checkpoint  # the backward pass recomputes one block's scores at a time (module doc)
  def one_block(args):
    q_BxQxHxK, seg_BxQ, i = args
    rows_Q = offset + i * Q + jnp.arange(Q)
    return _attend(q_BxQxHxK, k_BxTxGxK, v_BxTxGxK, seg_BxQ, seg_k_BxT, rows_Q)

  out_NxBxQxHxK = jax.lax.map(one_block, (q_NxBxQxHxK, seg_NxBxQ, jnp.arange(n_blocks)))
  return out_NxBxQxHxK.swapaxes(0, 1).reshape(B, S, H, v_BxTxGxK.shape[-1])


def _attend(q_BxQxHxK, k_BxTxGxK, v_BxTxGxK, seg_q_BxQ, seg_k_BxT, rows_Q):
  """Queries at global rows `rows_Q` against keys at rows 0..T-1: causal, same document, float32 softmax."""
  B, Q, H, K = q_BxQxHxK.shape
  T, G = k_BxTxGxK.shape[1], k_BxTxGxK.shape[2]
  mask_BxQxT = (rows_Q[:, None] >= jnp.arange(T)[None, :])[None] & (seg_q_BxQ[:, :, None] == seg_k_BxT[:, None, :])
  q_BxQxGxRxK = q_BxQxHxK.reshape(B, Q, G, H // G, K)
  att = jnp.einsum('bqgrk,btgk->bgrqt', q_BxQxGxRxK, k_BxTxGxK, preferred_element_type=jnp.float32)
  att = jnp.where(mask_BxQxT[:, None, None], att, NEG_INF)
  probs = jax.nn.softmax(att, axis=-1).astype(q_BxQxHxK.dtype)
  out = jnp.einsum('bgrqt,btgv->bqgrv', probs, v_BxTxGxK, preferred_element_type=jnp.float32)
  return out.astype(q_BxQxHxK.dtype).reshape(B, Q, H, v_BxTxGxK.shape[-1])


def in_token_groups(ffn, x_BxTxD):
  """ffn(x) -> (y, aux), run on each context shard's own tokens: [B, T, D] -> [B C, T / C, D], with 'batch' taken
  as the batch mesh axes plus context and 'length' unsharded while ffn is traced (its constraints on flattened
  tokens, e.g. ('batch', 'act_mlp'), would otherwise gather every sequence onto all C devices). MoE routing
  groups (capacity per group) are then each shard's T / C tokens rather than whole rows. Identity for C = 1."""
  n = context_size()
  if n == 1:
    return ffn(x_BxTxD)
  B, T, D = x_BxTxD.shape
  rules = tuple(nn.get_logical_axis_rules())
  batch = dict(rules).get('batch')
  batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
  grouped = (('batch', batch + (AXIS,)), ('length', None)) + tuple(r for r in rules if r[0] not in ('batch', 'length'))
  names = ('batch', 'length', 'act_embed')
  with nn.logical_axis_rules(grouped):
    x_GxSxD = constrain(x_BxTxD.reshape(B * n, T // n, D), names)
    y_GxSxD, aux = ffn(x_GxSxD)
    y_GxSxD = constrain(y_GxSxD, names)
  return constrain(y_GxSxD.reshape(B, T, D), names), aux

"""Dropless expert-parallel dispatch: a sorted all-to-all over the 'expert' mesh axes, then ragged_dot.

Inside a shard_map over the mesh, each device holds its own tokens (batch split over the 'batch' mesh axes)
and E / X experts (X = size of the 'exp' mesh axes). Per device, with N local tokens and M = N * top_k
token-slots:
  1. slots are sorted by expert; expert e lives on shard e // (E / X), so the sort groups them by destination;
  2. each destination gets a static [S, D] chunk of a send buffer [X, S, D] (empty rows are zeros) plus the
     local expert id of every row; one tiled all_to_all exchanges the chunks (row blocks now by source);
  3. the receiver sorts its X * S rows by local expert and runs the SwiGLU experts with jax.lax.ragged_dot
     (empty rows form a tail past the group sizes, which ragged_dot leaves at zero);
  4. outputs go back by the inverse all_to_all and are combined with the gate weights at the source.

Buffer sizes. Top-k picks distinct experts, so one token sends at most min(top_k, E / X) slots to one shard:
W = N * min(top_k, E / X) rows per (source, destination) pair can never overflow. A dense all_to_all moves
whole buffers, and W is X * min(top_k, E / X) / top_k times the rows a balanced router sends (24x for the
flagship), so `ep_buffer_factor` = f > 0 sizes the buffer at S = ceil(f * M / X), f times the balanced load:
- ep_overflow = 'exchange' (dropless): slots past S in their pair go through a second exchange of W - S rows
  per pair, inside a lax.cond that runs only when some pair of the mesh overflowed in this layer (the predicate
  is a psum over the whole mesh, so every device takes the same branch). Typical steps move S rows per
  pair; memory is still reserved for the worst case, though the branch runs under jax.checkpoint, so the
  backward pass keeps only its inputs. Logged: `ep_overflow_frac`, the slots that needed it.
- ep_overflow = 'drop': overflow slots are dropped (the token keeps its residual and the shared expert), like
  a capacity factor per device pair; memory and traffic stay at S. Logged: `dropped_frac`.
f = 0 is one buffer of W rows, never overflowing. jax.lax.ragged_all_to_all would move only the real rows, but
XLA:CPU cannot run it (jax 0.10.2), so this path uses the dense collective everywhere.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def worst_rows(moe, n_tokens: int, n_shards: int) -> int:
  """W: rows per (source, destination) pair that no routing can overflow."""
  return n_tokens * min(moe.top_k, moe.num_experts // n_shards)


def buffer_rows(moe, n_tokens: int, n_shards: int) -> int:
  """S: rows each device reserves per destination shard in the first exchange (see the module docstring)."""
  worst = worst_rows(moe, n_tokens, n_shards)
  if moe.ep_buffer_factor <= 0:
    return worst
  return max(1, min(worst, math.ceil(moe.ep_buffer_factor * n_tokens * moe.top_k / n_shards)))


def _inverse(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _experts(xs_RxD, sizes, wg, wu, wo):
  h = nn.silu(jax.lax.ragged_dot(xs_RxD, wg, sizes)) * jax.lax.ragged_dot(xs_RxD, wu, sizes)
  return jax.lax.ragged_dot(h, wo, sizes)


def _exchange(x_pad, token_M, eid_M, row_M, X, S, El, exp_axes, weights):
  """One round trip: slot m (sorted order) goes to row row_M[m] of the [X * S] send buffer (X * S: not in this
  buffer), is computed by its expert on the destination and comes back. Returns [M, D], zeros for slots not
  in this buffer."""
  N, D = x_pad.shape[0] - 1, x_pad.shape[1]
  src_R = jnp.full((X * S + 1,), N, jnp.int32).at[row_M].set(token_M)[:X * S]  # token N: a zero row
  eid_R = jnp.full((X * S + 1,), El, jnp.int32).at[row_M].set(eid_M)[:X * S]   # El: empty row
  send_XxSxD = x_pad[src_R].reshape(X, S, D)
  a2a = dict(axis_name=exp_axes, split_axis=0, concat_axis=0, tiled=True)
  recv_XxSxD = jax.lax.all_to_all(send_XxSxD, **a2a)
  recv_eid_R = jax.lax.all_to_all(eid_R.reshape(X, S), **a2a).reshape(X * S)

  order_R = jnp.argsort(recv_eid_R, stable=True)
  sizes = jnp.bincount(recv_eid_R, length=El).astype(jnp.int32)  # empty rows (El) fall past the groups
  ys_RxD = _experts(recv_XxSxD.reshape(X * S, D)[order_R], sizes, *weights)
  y_recv_XxSxD = ys_RxD[_inverse(order_R)].reshape(X, S, D)
  y_back_RxD = jax.lax.all_to_all(y_recv_XxSxD, **a2a).reshape(X * S, D)
  return jnp.concatenate([y_back_RxD, jnp.zeros((1, D), y_back_RxD.dtype)])[row_M]


def dispatch(moe, mesh, batch_axes, exp_axes, x_BxTxD, w_BxTxK, e_BxTxK, weights):
  """Returns (y_BxTxD, dropped_frac, overflow_frac). batch_axes / exp_axes: mesh axis names of 'batch' and
  'exp'."""
  E, K = moe.num_experts, moe.top_k
  X = math.prod(mesh.shape[a] for a in exp_axes)
  assert E % X == 0, (E, X)  # sktlm.config.validate refuses it with the mesh
  El = E // X
  mode = moe.ep_overflow
  all_axes = tuple(mesh.axis_names)

  def local(x_BxTxD, w_BxTxK, e_BxTxK, wg, wu, wo):
    B, T, D = x_BxTxD.shape
    N, M = B * T, B * T * K
    S, W = buffer_rows(moe, N, X), worst_rows(moe, N, X)
    e_M = e_BxTxK.reshape(M)
    order_M = jnp.argsort(e_M, stable=True)
    e_sorted = e_M[order_M]
    dest_sorted = e_sorted // El
    per_shard_X = jnp.bincount(e_M // El, length=X).astype(jnp.int32)
    start_X = jnp.cumsum(per_shard_X) - per_shard_X
    pos_sorted = jnp.arange(M, dtype=jnp.int32) - start_X[dest_sorted]  # position within its destination
    token_M, eid_M = (order_M // K).astype(jnp.int32), e_sorted % El
    x_pad = jnp.concatenate([x_BxTxD.reshape(N, D), jnp.zeros((1, D), x_BxTxD.dtype)])
    exchange = lambda row_M, rows: _exchange(x_pad, token_M, eid_M, row_M, X, rows, El, exp_axes,  # noqa: E731
                                             (wg, wu, wo))

    first = pos_sorted < S
    y_MxD = exchange(jnp.where(first, dest_sorted * S + pos_sorted, X * S), S)
    over = ~first
    # S = W cannot overflow: no collective for a count that is always 0.
    n_over = jax.lax.psum(jnp.sum(over).astype(jnp.float32), all_axes) if S < W else jnp.float32(0)
    if mode == 'exchange' and S < W:
      row2_M = jnp.where(over, dest_sorted * (W - S) + pos_sorted - S, X * (W - S))
      # checkpoint: the cond keeps only the branch's inputs for the backward pass, not a worst-case set of
      # residuals (zeros when not taken); a backward pass through an overflowing layer recomputes it.
      second = jax.checkpoint(lambda r: exchange(r, W - S))
      y_MxD = y_MxD + jax.lax.cond(n_over > 0, second, lambda r: jnp.zeros_like(y_MxD), row2_M)
      n_dropped = jnp.float32(0)
    else:
      n_dropped = n_over

    y_NxKxD = y_MxD[_inverse(order_M)].reshape(N, K, D)
    y_NxD = jnp.einsum('nkd,nk->nd', y_NxKxD, w_BxTxK.reshape(N, K).astype(y_NxKxD.dtype))
    # Replicated copies (mesh axes outside 'batch') count in numerator and denominator alike.
    total = jax.lax.psum(jnp.float32(M), all_axes)
    return y_NxD.reshape(B, T, D), n_dropped / total, n_over / total

  tok = P(batch_axes or None)
  exp = P(exp_axes)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=(tok, P(), P()),
                     check_vma=False)
  return fn(x_BxTxD, w_BxTxK, e_BxTxK, *weights)

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

The bound: top-k picks distinct experts, so one token sends at most min(top_k, E / X) slots to one shard and
S = N * min(top_k, E / X) can never overflow (ep_buffer_factor = 0, the default): truly dropless. That is the
worst case (all of a device's tokens choosing one shard); a dense all-to-all moves the whole buffer, so
ep_buffer_factor = f > 0 sets S = ceil(f * M / X) (f times the balanced load) and counts overflow slots as
dropped, like a capacity factor but per (source, destination) pair. jax.lax.ragged_all_to_all would move only
the real rows, but XLA:CPU cannot run it (jax 0.10.2), so this path uses the dense collective everywhere.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sktlm.errors import UserError


def buffer_rows(moe, n_tokens: int, n_shards: int) -> int:
  """S: rows each device reserves per destination shard (see the module docstring)."""
  worst = n_tokens * min(moe.top_k, moe.num_experts // n_shards)
  if moe.ep_buffer_factor <= 0:
    return worst
  return max(1, min(worst, math.ceil(moe.ep_buffer_factor * n_tokens * moe.top_k / n_shards)))


def _inverse(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _experts(xs_RxD, sizes, wg, wu, wo):
  h = nn.silu(jax.lax.ragged_dot(xs_RxD, wg, sizes)) * jax.lax.ragged_dot(xs_RxD, wu, sizes)
  return jax.lax.ragged_dot(h, wo, sizes)


def dispatch(moe, mesh, batch_axes, exp_axes, x_BxTxD, w_BxTxK, e_BxTxK, weights):
  """Returns (y_BxTxD, dropped_frac). batch_axes / exp_axes: mesh axis names of 'batch' and 'exp'."""
  E, K = moe.num_experts, moe.top_k
  X = math.prod(mesh.shape[a] for a in exp_axes)
  if E % X:
    raise UserError(f'moe.num_experts={E} does not divide over the {X} expert shards of the mesh')
  El = E // X
  all_axes = tuple(mesh.axis_names)

  def local(x_BxTxD, w_BxTxK, e_BxTxK, wg, wu, wo):
    B, T, D = x_BxTxD.shape
    N, M = B * T, B * T * K
    S = buffer_rows(moe, N, X)
    e_M = e_BxTxK.reshape(M)
    order_M = jnp.argsort(e_M, stable=True)
    e_sorted = e_M[order_M]
    dest_sorted = e_sorted // El
    per_shard_X = jnp.bincount(e_M // El, length=X).astype(jnp.int32)
    start_X = jnp.cumsum(per_shard_X) - per_shard_X
    pos_sorted = jnp.arange(M, dtype=jnp.int32) - start_X[dest_sorted]
    kept = pos_sorted < S
    row_sorted = jnp.where(kept, dest_sorted * S + pos_sorted, X * S)  # X * S: overflow bin, never sent
    # Send buffer by row gathers (token index N = a zero row) and the local expert id of each row (El: empty).
    src_R = jnp.full((X * S + 1,), N, jnp.int32).at[row_sorted].set((order_M // K).astype(jnp.int32))[:X * S]
    eid_R = jnp.full((X * S + 1,), El, jnp.int32).at[row_sorted].set(e_sorted % El)[:X * S]
    x_pad = jnp.concatenate([x_BxTxD.reshape(N, D), jnp.zeros((1, D), x_BxTxD.dtype)])
    send_XxSxD = x_pad[src_R].reshape(X, S, D)

    a2a = dict(axis_name=exp_axes, split_axis=0, concat_axis=0, tiled=True)
    recv_XxSxD = jax.lax.all_to_all(send_XxSxD, **a2a)
    recv_eid_R = jax.lax.all_to_all(eid_R.reshape(X, S), **a2a).reshape(X * S)

    order_R = jnp.argsort(recv_eid_R, stable=True)
    sizes = jnp.bincount(recv_eid_R, length=El).astype(jnp.int32)  # empty rows (El) fall past the groups
    ys_RxD = _experts(recv_XxSxD.reshape(X * S, D)[order_R], sizes, wg, wu, wo)
    y_recv_XxSxD = ys_RxD[_inverse(order_R)].reshape(X, S, D)
    y_back_RxD = jax.lax.all_to_all(y_recv_XxSxD, **a2a).reshape(X * S, D)

    y_pad = jnp.concatenate([y_back_RxD, jnp.zeros((1, D), y_back_RxD.dtype)])
    y_NxKxD = y_pad[row_sorted][_inverse(order_M)].reshape(N, K, D)
    y_NxD = jnp.einsum('nkd,nk->nd', y_NxKxD, w_BxTxK.reshape(N, K).astype(y_NxKxD.dtype))
    # Replicated copies (mesh axes outside 'batch') count in numerator and denominator alike.
    dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.float32), all_axes)
    total = jax.lax.psum(jnp.float32(M), all_axes)
    return y_NxD.reshape(B, T, D), dropped / total

  tok = P(batch_axes or None)
  exp = P(exp_axes)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=(tok, P()),
                     check_vma=False)
  return fn(x_BxTxD, w_BxTxK, e_BxTxK, *weights)

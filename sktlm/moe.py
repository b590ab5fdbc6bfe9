"""Routed Mixture-of-Experts SwiGLU feed-forward (config.model.moe), with optional shared experts.

Routing: float32 router logits -> softmax or sigmoid scores -> top-k experts per token (optionally
renormalised to sum to 1). Two dispatch paths, chosen by `moe.capacity_factor`:

- capacity (> 0, GShard/Switch style, the expert-parallel path): each batch row is a group of T tokens;
  every expert takes at most C = ceil(capacity_factor * T * top_k / E) token-slots per group, filled in
  priority order (all first choices before second choices, then by position); overflow slots are dropped
  (the token keeps its residual and any shared expert). Tokens are moved with index gathers into a
  [B, E, C, D] buffer (memory O(B*E*C*D), not the O(B*T*E*C) of one-hot dispatch einsums). Constraining
  that buffer to (batch without the expert mesh axes, 'exp', ...) makes XLA exchange tokens between
  expert shards with all-to-alls inside the compiled step.
- dropless (0): every token-slot is computed. Slots are sorted by expert and multiplied with
  jax.lax.ragged_dot (grouped matmul). Exact and cheapest on GPU/TPU, but the sort is global, so under
  an expert mesh axis XLA gathers tokens and expert weights instead of exchanging tokens: use a capacity
  factor for expert parallelism. On CPU, ragged_dot lowers to a masked dense matmul over all experts.

Capacity dispatch was built first: it has static shapes per expert, so expert weights and the token
buffer shard cleanly over the 'expert' mesh axis, which is what the flagship plan needs.

Auxiliary outputs (float32, same keys and shapes for every MoE layer so nn.scan can stack them):
aux_loss (Switch load balancing E * sum_e f_e P_e, 1 at perfect balance, unscaled), router_z_loss
(mean logsumexp(logits)^2, unscaled), dropped_frac (dropped / routed token-slots), expert_load ([E],
fraction of routed token-slots per expert, before dropping).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sktlm import layers
from sktlm.errors import UserError
from sktlm.sharding import constrain


def capacity(config, group_size: int) -> int:
  """Token-slots per expert per group; group_size (no dropping possible) when dropless."""
  moe = config.moe
  if moe.capacity_factor <= 0:
    return group_size
  c = math.ceil(moe.capacity_factor * group_size * moe.top_k / moe.num_experts)
  return max(1, min(c, group_size))


def _axes(a) -> tuple:
  if a is None:
    return ()
  return tuple(a) if isinstance(a, (list, tuple)) else (a,)


def _ep_rules():
  """Current logical rules plus 'exp_batch': the batch mesh axes that are not used by 'exp'."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    return None
  d = {}
  for name, axes in rules:
    d.setdefault(name, axes)
  exp_axes = set(_axes(d.get('exp')))
  batch = tuple(a for a in _axes(d.get('batch')) if a not in exp_axes)
  return tuple(rules) + (('exp_batch', batch or None),)


def _constrain_ep(x, names, rules):
  # The mesh train.build sets while tracing (sharding.activation_context), with the EP rules.
  return constrain(x, names, rules=rules)


def route(config, logits_NxE):
  """Top-k routing from float32 logits. Returns (weights_NxK, experts_NxK, probs_NxE)."""
  moe = config.moe
  if moe.gate == 'softmax':
    probs = jax.nn.softmax(logits_NxE, axis=-1)
  elif moe.gate == 'sigmoid':
    probs = jax.nn.sigmoid(logits_NxE)
  else:
    raise UserError(f"moe.gate must be 'softmax' or 'sigmoid', got {moe.gate!r}")
  weights, experts = jax.lax.top_k(probs, moe.top_k)
  if moe.renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-9)
  return weights, experts, probs


class MoEFeedForward(nn.Module):
  """x_BxTxD -> (y_BxTxD, aux). See the module docstring."""
  config: object

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    moe = c.moe
    B, T, D = x_BxTxD.shape
    E, K = moe.num_experts, moe.top_k
    F = moe.expert_d_ff or c.d_ff
    cdt, pdt = layers.dtype(c.dtype), layers.dtype(c.param_dtype)
    if not 1 <= K <= E:
      raise UserError(f'moe.top_k={K} must be in [1, num_experts={E}]')

    router_init = layers.param_init(c, kind='router')
    router = self.param('router', nn.with_logical_partitioning(router_init, ('embed', None)),
                        (D, E), jnp.float32)
    wi_gate = self.param('wi_gate', nn.with_logical_partitioning(layers.param_init(c), ('exp', 'embed', 'mlp')),
                         (E, D, F), pdt)
    wi_up = self.param('wi_up', nn.with_logical_partitioning(layers.param_init(c), ('exp', 'embed', 'mlp')),
                       (E, D, F), pdt)
    wo = self.param('wo', nn.with_logical_partitioning(layers.param_init(c, True), ('exp', 'mlp', 'embed')),
                    (E, F, D), pdt)

    logits_BxTxE = jnp.einsum('btd,de->bte', x_BxTxD.astype(jnp.float32), router)
    w_BxTxK, e_BxTxK, probs_BxTxE = route(c, logits_BxTxE)
    weights = (wi_gate.astype(cdt), wi_up.astype(cdt), wo.astype(cdt))
    x = x_BxTxD.astype(cdt)
    if moe.capacity_factor > 0:
      y_BxTxD, dropped = self._capacity(x, w_BxTxK, e_BxTxK, weights)
    else:
      y_BxTxD, dropped = self._dropless(x, w_BxTxK, e_BxTxK, weights), jnp.zeros((), jnp.float32)

    if moe.num_shared_experts > 0:
      y_BxTxD = y_BxTxD + layers.Mlp(c, d_ff=F * moe.num_shared_experts, name='shared')(x)

    # Switch load-balancing loss: f_e = fraction of token-slots routed to e, P_e = mean gate probability
    # (sigmoid scores are normalised per token first so P sums to 1 either way).
    onehot_NKxE = jax.nn.one_hot(e_BxTxK.reshape(-1), E, dtype=jnp.float32)
    load_E = jnp.mean(onehot_NKxE, axis=0)
    p = probs_BxTxE.reshape(-1, E)
    if moe.gate == 'sigmoid':
      p = p / (jnp.sum(p, axis=-1, keepdims=True) + 1e-9)
    aux = dict(
        aux_loss=E * jnp.sum(load_E * jnp.mean(p, axis=0)),
        router_z_loss=jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxE, axis=-1))),
        dropped_frac=dropped,
        expert_load=load_E,
    )
    return constrain(y_BxTxD.astype(cdt), ('batch', 'length', 'act_embed')), aux

  def _capacity(self, x_BxTxD, w_BxTxK, e_BxTxK, weights):
    c = self.config
    B, T, D = x_BxTxD.shape
    E, K = c.moe.num_experts, c.moe.top_k
    C = capacity(c, T)
    # Priority order inside a group: slot s = k * T + t (all first choices first).
    e_BxS = jnp.swapaxes(e_BxTxK, 1, 2).reshape(B, K * T)
    onehot_BxSxE = jax.nn.one_hot(e_BxS, E, dtype=jnp.int32)
    pos_BxS = jnp.sum((jnp.cumsum(onehot_BxSxE, axis=1) - 1) * onehot_BxSxE, axis=-1)
    kept_BxS = pos_BxS < C
    dest_BxS = jnp.where(kept_BxS, e_BxS * C + pos_BxS, E * C)  # E*C: overflow bin, never read
    token_BxS = jnp.broadcast_to(jnp.tile(jnp.arange(T, dtype=jnp.int32), K), (B, K * T))
    # Inverse map slot -> token (T = a zero row for empty slots): integer scatter, then a row gather.
    src_BxEC = jax.vmap(lambda d, t: jnp.full((E * C + 1,), T, jnp.int32).at[d].set(t))(dest_BxS, token_BxS)
    x_pad = jnp.concatenate([x_BxTxD, jnp.zeros((B, 1, D), x_BxTxD.dtype)], axis=1)
    xd_BxExCxD = jnp.take_along_axis(x_pad, src_BxEC[:, :E * C, None], axis=1).reshape(B, E, C, D)

    rules = _ep_rules()
    ep = ('exp_batch', 'exp', None, 'act_embed')
    xd_BxExCxD = _constrain_ep(xd_BxExCxD, ep, rules)
    wg, wu, wo = weights
    h = nn.silu(jnp.einsum('becd,edf->becf', xd_BxExCxD, wg)) * jnp.einsum('becd,edf->becf', xd_BxExCxD, wu)
    h = _constrain_ep(h, ('exp_batch', 'exp', None, 'act_mlp'), rules)
    yd_BxExCxD = _constrain_ep(jnp.einsum('becf,efd->becd', h, wo), ep, rules)
    yd_BxExCxD = constrain(yd_BxExCxD, ('batch', None, None, 'act_embed'))

    y_pad = jnp.concatenate([yd_BxExCxD.reshape(B, E * C, D), jnp.zeros((B, 1, D), yd_BxExCxD.dtype)], axis=1)
    ys_BxSxD = jnp.take_along_axis(y_pad, dest_BxS[..., None], axis=1)
    gate_BxS = jnp.swapaxes(w_BxTxK, 1, 2).reshape(B, K * T) * kept_BxS
    y_BxKxTxD = (ys_BxSxD * gate_BxS[..., None].astype(ys_BxSxD.dtype)).reshape(B, K, T, D)
    dropped = 1.0 - jnp.mean(kept_BxS.astype(jnp.float32))
    return jnp.sum(y_BxKxTxD, axis=1), dropped

  def _dropless(self, x_BxTxD, w_BxTxK, e_BxTxK, weights):
    c = self.config
    B, T, D = x_BxTxD.shape
    E, K = c.moe.num_experts, c.moe.top_k
    N = B * T
    e_M = e_BxTxK.reshape(N * K)
    order_M = jnp.argsort(e_M, stable=True)
    sizes_E = jnp.bincount(e_M, length=E).astype(jnp.int32)
    xs_MxD = x_BxTxD.reshape(N, D)[order_M // K]
    wg, wu, wo = weights
    h = nn.silu(jax.lax.ragged_dot(xs_MxD, wg, sizes_E)) * jax.lax.ragged_dot(xs_MxD, wu, sizes_E)
    ys_MxD = jax.lax.ragged_dot(h, wo, sizes_E)
    inv_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(N * K, dtype=order_M.dtype))
    y_NxKxD = ys_MxD[inv_M].reshape(N, K, D)
    y_NxD = jnp.einsum('nkd,nk->nd', y_NxKxD, w_BxTxK.reshape(N, K).astype(y_NxKxD.dtype))
    return y_NxD.reshape(B, T, D)

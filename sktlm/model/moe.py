"""Routed Mixture-of-Experts SwiGLU feed-forward (config.model.moe), with optional shared experts.

Routing (`route`, shared by every dispatch path): float32 router logits -> softmax or sigmoid scores ->
optionally group-limited (DeepSeek-V3: n_group groups of contiguous experts, a token keeps its topk_group best
groups, a group scored by the sum of its two best scores) -> top-k experts per token (optionally renormalised
to sum to 1) -> gate weights x routed_scaling_factor (V3: 2.5).
Dispatch paths (`moe.dispatch`; 'auto': capacity when capacity_factor > 0, else
dropless_ep, which is plain dropless without an expert mesh axis > 1):

- capacity (GShard/Switch style): each batch row is a group of T tokens; every expert takes at most
  C = ceil(capacity_factor * T * top_k / E) token-slots per group, filled in priority order (all first
  choices before second choices, then by position); overflow slots are dropped (the token keeps its
  residual and any shared expert). Tokens are moved with index gathers into a [B, E, C, D] buffer (memory
  O(B*E*C*D), not the O(B*T*E*C) of one-hot dispatch einsums). Constraining that buffer to (batch without
  the expert mesh axes, 'exp', ...) makes XLA exchange tokens between expert shards with all-to-alls.
- dropless: every token-slot is computed. Slots are sorted by expert and multiplied with
  jax.lax.ragged_dot (grouped matmul). The sort is global, so under an expert mesh axis XLA would gather
  tokens and expert weights instead of exchanging tokens.
- dropless_ep (sktlm/model/moe_ep.py): dropless and expert-parallel: a shard_map whose devices sort their own
  slots by destination shard, exchange them with an all-to-all into a buffer sized for the worst case (no
  slot can be dropped), and run their local experts with ragged_dot.

Balancing (`moe.balance`): 'aux_loss' adds the Switch loss (aux_loss_coef); 'aux_free' is DeepSeek-V3's
auxiliary-loss-free balancing: a per-expert bias (collection BIAS_COLLECTION, not a param) is added to the
scores for choosing the top-k only, and the train step (train/step.py) moves it by
bias_update_rate * sign(mean load - load) after every step (update_bias). seq_aux_loss_coef adds the
sequence-wise balance loss in either mode.

Auxiliary outputs (float32, same keys and shapes for every MoE layer so nn.scan can stack them):
aux_loss (Switch load balancing E * sum_e f_e P_e, 1 at perfect balance, unscaled), seq_aux_loss (the same
per sequence, averaged), router_z_loss (mean logsumexp(logits)^2, unscaled), dropped_frac (dropped / routed
token-slots), ep_overflow_frac (dropless_ep: slots past the first exchange's buffer / routed slots; other paths:
dropped_frac), expert_load ([E], fraction of routed token-slots per expert, before dropping).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sktlm.model import layers, moe_ep
from sktlm.sharding import constrain


def capacity(config, group_size: int) -> int:
  """Token-slots per expert per group; group_size (no dropping possible) when dropless."""
  moe = config.moe
  if moe.capacity_factor <= 0:
    return group_size
  c = math.ceil(moe.capacity_factor * group_size * moe.top_k / moe.num_experts)
  return max(1, min(c, group_size))


BIAS_COLLECTION = 'moe_bias'   # per-layer routing bias (aux-free balancing), carried in TrainState.model_state
LOAD_COLLECTION = 'moe_load'   # per-layer expert load of the step, sown for the bias update


def dispatch_path(moe) -> str:
  """'capacity', 'dropless' or 'dropless_ep' (the latter falls back to 'dropless' without an expert axis)."""
  if moe.dispatch == 'auto':
    return 'capacity' if moe.capacity_factor > 0 else 'dropless_ep'
  return moe.dispatch  # capacity needs capacity_factor > 0 (sktlm.config.validate)


def update_bias(moe, model_state, loads):
  """Aux-free balancing step (DeepSeek-V3): bias_e += u * sign(mean load - load_e) for every MoE layer.

  model_state: {BIAS_COLLECTION: ...}; loads: {LOAD_COLLECTION: ...} from the same model (same tree but
  for the leaf name, so leaves pair up in order). Outside the gradient; a no-op for other balance modes."""
  if moe.balance != 'aux_free' or BIAS_COLLECTION not in model_state:
    return model_state
  biases, treedef = jax.tree.flatten(model_state[BIAS_COLLECTION])
  load_leaves = jax.tree.leaves(loads[LOAD_COLLECTION])
  assert len(biases) == len(load_leaves), (len(biases), len(load_leaves))
  new = [b + moe.bias_update_rate * jnp.sign(jnp.mean(ld, axis=-1, keepdims=True) - ld)
         for b, ld in zip(biases, load_leaves, strict=True)]
  return {**model_state, BIAS_COLLECTION: jax.tree.unflatten(treedef, new)}


def _ep_axes(batch_size: int):
  """(mesh, batch mesh axes, expert mesh axes) when tracing under a mesh with an expert axis > 1, else None
  (also when the batch does not split over the batch mesh axes, e.g. one row: plain dropless, same math)."""
  mesh = jax.sharding.get_abstract_mesh()  # set by sharding.activation_context (or jax.set_mesh)
  mesh = None if mesh.empty else mesh
  rules = nn.get_logical_axis_rules()
  if mesh is None or not rules:
    return None
  d = {}
  for name, axes in rules:
    d.setdefault(name, axes)
  exp_axes = tuple(a for a in _axes(d.get('exp')) if a in mesh.shape)
  if math.prod(mesh.shape[a] for a in exp_axes) <= 1:
    return None
  batch_axes = tuple(a for a in _axes(d.get('batch')) if a in mesh.shape)
  if batch_size % math.prod(mesh.shape[a] for a in batch_axes):
    return None
  return mesh, batch_axes, exp_axes


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


def group_mask(moe, scores_NxE):
  """DeepSeek-V3's group-limited (node-limited) routing: the experts (contiguous ids) form n_group groups, a
  group scores the sum of its two best scores, and only the topk_group best groups stay eligible. Returns a
  boolean [N, E] mask (all True when n_group = 1)."""
  G, E = moe.n_group, moe.num_experts
  if G <= 1:
    return jnp.ones(scores_NxE.shape, bool)
  lead = scores_NxE.shape[:-1]
  per_group = scores_NxE.reshape(*lead, G, E // G)
  group_scores = jnp.sum(jax.lax.top_k(per_group, 2)[0], axis=-1)
  _, best = jax.lax.top_k(group_scores, moe.topk_group)
  keep_G = jnp.sum(jax.nn.one_hot(best, G, dtype=jnp.int32), axis=-2) > 0
  return jnp.repeat(keep_G, E // G, axis=-1)


def route(config, logits_NxE, bias_E=None):
  """Top-k routing from float32 logits. Returns (weights_NxK, experts_NxK, probs_NxE).

  bias_E (aux-free balancing) shifts the scores for choosing groups and experts only; the gate weights stay
  the unbiased scores of the chosen experts, renormalised (moe.renormalize), then x moe.routed_scaling_factor.
  Every dispatch path (capacity, dropless, dropless_ep) takes its experts and weights from here."""
  moe = config.moe
  if moe.gate == 'softmax':
    probs = jax.nn.softmax(logits_NxE, axis=-1)
  else:  # sigmoid (the schema allows these two)
    probs = jax.nn.sigmoid(logits_NxE)
  choice = probs if bias_E is None else probs + jax.lax.stop_gradient(bias_E)
  if moe.n_group > 1:
    choice = jnp.where(group_mask(moe, jax.lax.stop_gradient(choice)), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, moe.top_k)
  weights = jnp.take_along_axis(probs, experts, axis=-1)
  if moe.renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-9)
  scale = moe.routed_scaling_factor
  if scale != 1.0:
    weights = weights * scale
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

    router_init = layers.param_init(c, kind='router')
    router = self.param('router', nn.with_logical_partitioning(router_init, ('embed', None)),
                        (D, E), jnp.float32)
    wi_gate = self.param('wi_gate', nn.with_logical_partitioning(layers.param_init(c), ('exp', 'embed', 'mlp')),
                         (E, D, F), pdt)
    wi_up = self.param('wi_up', nn.with_logical_partitioning(layers.param_init(c), ('exp', 'embed', 'mlp')),
                       (E, D, F), pdt)
    wo = self.param('wo', nn.with_logical_partitioning(layers.param_init(c, True), ('exp', 'mlp', 'embed')),
                    (E, F, D), pdt)

    bias_E = None
    if moe.balance == 'aux_free':
      # Not a param: the train step (train/step.py) updates it after each step from the load sown below (update_bias).
      if self.is_initializing() or self.has_variable(BIAS_COLLECTION, 'bias'):
        bias_E = self.variable(BIAS_COLLECTION, 'bias', jnp.zeros, (E,), jnp.float32).value
      else:  # applied with params alone (e.g. an exported model): route without the bias
        bias_E = jnp.zeros((E,), jnp.float32)
    logits_BxTxE = jnp.einsum('btd,de->bte', x_BxTxD.astype(jnp.float32), router)
    w_BxTxK, e_BxTxK, probs_BxTxE = route(c, logits_BxTxE, bias_E)
    weights = (wi_gate.astype(cdt), wi_up.astype(cdt), wo.astype(cdt))
    x = x_BxTxD.astype(cdt)
    path = dispatch_path(moe)
    ep = _ep_axes(B) if path == 'dropless_ep' and not self.is_initializing() else None
    if path == 'capacity':
      y_BxTxD, dropped = self._capacity(x, w_BxTxK, e_BxTxK, weights)
    elif ep is not None:
      y_BxTxD, dropped, overflow = moe_ep.dispatch(moe, *ep, x, w_BxTxK, e_BxTxK, weights)
    else:
      y_BxTxD, dropped = self._dropless(x, w_BxTxK, e_BxTxK, weights), jnp.zeros((), jnp.float32)
    if ep is None:
      overflow = dropped

    if moe.num_shared_experts > 0:
      y_BxTxD = y_BxTxD + layers.Mlp(c, d_ff=F * moe.num_shared_experts, name='shared')(x)

    # Switch load-balancing loss: f_e = fraction of token-slots routed to e, P_e = mean gate probability
    # (sigmoid scores are normalised per token first so P sums to 1 either way).
    onehot_BxTKxE = jax.nn.one_hot(e_BxTxK.reshape(B, T * K), E, dtype=jnp.float32)
    load_BxE = jnp.mean(onehot_BxTKxE, axis=1)
    load_E = jnp.mean(load_BxE, axis=0)
    p_BxTxE = probs_BxTxE
    if moe.gate == 'sigmoid':
      p_BxTxE = p_BxTxE / (jnp.sum(p_BxTxE, axis=-1, keepdims=True) + 1e-9)
    if bias_E is not None:
      self.sow(LOAD_COLLECTION, 'load', load_E, init_fn=lambda: jnp.zeros((E,), jnp.float32),
               reduce_fn=lambda _, new: new)
    aux = dict(
        aux_loss=E * jnp.sum(load_E * jnp.mean(p_BxTxE, axis=(0, 1))),
        # DeepSeek-V3's sequence-wise form: the same product per sequence (batch row), averaged over rows.
        seq_aux_loss=E * jnp.mean(jnp.sum(load_BxE * jnp.mean(p_BxTxE, axis=1), axis=-1)),
        router_z_loss=jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxE, axis=-1))),
        dropped_frac=dropped,
        ep_overflow_frac=overflow,
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

"""MoEFeedForward against independent references: the dense SwiGLU block and a float64 numpy token loop."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from sktlm.config import accounting, schema
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.model import layers, moe


def model_cfg(E=4, K=2, shared=0, cf=0.0, gate='softmax', renorm=True, d=16, d_ff=24, e_ff=0):
  return ml_collections.FrozenConfigDict(_config(E, K, shared, cf, gate, renorm, d, d_ff, e_ff).model)


def _config(E, K, shared, cf, gate, renorm, d, d_ff, e_ff):
  """A full config (every schema key) with these model and MoE settings."""
  config = schema.get_config()
  config.model.update(dict(n_layers=2, d_model=d, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=d_ff, vocab_size=32,
                           init_std=0.3, dtype='float32', param_dtype='float32', norm_eps=1e-5,
                           tie_embeddings=False))
  config.model.moe.update(dict(num_experts=E, top_k=K, num_shared_experts=shared, expert_d_ff=e_ff,
                               n_dense_layers=0, gate=gate, renormalize=renorm, aux_loss_coef=0.01,
                               router_z_loss_coef=0.001, capacity_factor=cf))
  return config


def init_apply(c, x, seed=0):
  m = moe.MoEFeedForward(c)
  params = nn.unbox(m.init(jax.random.PRNGKey(seed), x)['params'])
  y, aux = m.apply({'params': params}, x)
  return params, np.asarray(y), jax.tree.map(np.asarray, aux)


def x_of(B=2, T=8, D=16, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D), jnp.float32)


def silu(z):
  return z / (1 + np.exp(-z))


def numpy_moe(c, params, x):
  """Token loop in float64: route each token, apply its experts in priority order with capacity."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  B, T, D = x.shape
  E, K = c.moe.num_experts, c.moe.top_k
  C = moe.capacity(c, T)
  y = np.zeros_like(x)
  counts = np.zeros(E)
  dropped = 0
  probs_all, logits_all = [], []
  for b in range(B):
    fill = np.zeros(E, int)
    choice = {}
    for t in range(T):
      logits = x[b, t] @ p['router']
      if c.moe.gate == 'softmax':
        pr = np.exp(logits - logits.max())
        pr /= pr.sum()
      else:
        pr = 1 / (1 + np.exp(-logits))
      top = np.argsort(-pr, kind='stable')[:K]
      w = pr[top] / (pr[top].sum() if c.moe.renormalize else 1.0)
      choice[t] = (top, w)
      probs_all.append(pr)
      logits_all.append(logits)
    for k in range(K):  # all first choices of the group before any second choice
      for t in range(T):
        e, w = choice[t][0][k], choice[t][1][k]
        counts[e] += 1
        if fill[e] >= C:
          dropped += 1
          continue
        fill[e] += 1
        h = silu(x[b, t] @ p['wi_gate'][e]) * (x[b, t] @ p['wi_up'][e])
        y[b, t] += w * (h @ p['wo'][e])
    if c.moe.num_shared_experts:
      s = p['shared']
      y[b] += (silu(x[b] @ s['wi_gate']) * (x[b] @ s['wi_up'])) @ s['wo']
  probs = np.array(probs_all)
  if c.moe.gate == 'sigmoid':
    probs = probs / probs.sum(-1, keepdims=True)
  load = counts / counts.sum()
  lse = np.log(np.exp(np.array(logits_all)).sum(-1))
  aux = dict(aux_loss=E * np.sum(load * probs.mean(0)), router_z_loss=np.mean(lse**2),
             dropped_frac=dropped / counts.sum(), expert_load=load)
  return y, aux


@pytest.mark.parametrize('cf', [0.0, 1.0])
def test_one_expert_top1_equals_dense_swiglu(cf):
  c = model_cfg(E=1, K=1, cf=cf)
  x = x_of()
  params, y, aux = init_apply(c, x)
  dense = layers.Mlp(c, d_ff=c.d_ff)
  w = {k: params[k][0] for k in ('wi_gate', 'wi_up', 'wo')}
  y_dense = np.asarray(dense.apply({'params': w}, x))
  np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-6)
  assert aux['dropped_frac'] == 0 and aux['expert_load'].tolist() == [1.0]
  np.testing.assert_allclose(aux['aux_loss'], 1.0, rtol=1e-6)


@pytest.mark.parametrize('kw', [
    dict(cf=0.0),                                   # dropless (sort + ragged_dot)
    dict(cf=2.0),                                   # capacity, nothing dropped at this size
    dict(cf=0.5),                                   # capacity with drops
    dict(cf=0.75, gate='sigmoid', renorm=False, shared=1, e_ff=12),
    dict(E=8, K=3, cf=1.0, gate='sigmoid', renorm=True),
])
def test_matches_numpy_token_loop(kw):
  c = model_cfg(**kw)
  x = x_of()
  params, y, aux = init_apply(c, x)
  y_ref, aux_ref = numpy_moe(c, params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  for k in aux_ref:
    np.testing.assert_allclose(aux[k], aux_ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
  if kw['cf'] == 0.5:
    assert aux['dropped_frac'] > 0.1  # the test really exercises dropping
  if kw['cf'] in (0.0, 2.0):
    assert aux['dropped_frac'] == 0


def test_capacity_value():
  c = model_cfg(E=4, K=2, cf=1.25)
  assert moe.capacity(c, 8) == 5            # ceil(1.25 * 8 * 2 / 4)
  assert moe.capacity(model_cfg(cf=0.0), 8) == 8
  assert moe.capacity(model_cfg(E=2, K=2, cf=4.0), 8) == 8  # never more than the group


@pytest.mark.parametrize('cf', [0.0, 1.0])
def test_gradients_reach_router(cf):
  c = model_cfg(cf=cf, shared=1)
  x = x_of()
  m = moe.MoEFeedForward(c)
  params = nn.unbox(m.init(jax.random.PRNGKey(0), x)['params'])

  def loss(p):
    y, aux = m.apply({'params': p}, x)
    return jnp.sum(y**2) + 0.01 * aux['aux_loss'] + 0.001 * aux['router_z_loss']

  g = jax.grad(loss)(params)
  for name in ('router', 'wi_gate', 'wi_up', 'wo'):
    assert np.all(np.isfinite(g[name])) and np.abs(g[name]).max() > 0, name
  # The router gets gradient through the gate weights alone too (not only through the aux losses).
  g_main = jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x)[0] ** 2))(params)
  assert np.abs(g_main['router']).max() > 1e-6


@pytest.mark.parametrize('gate', ['softmax', 'sigmoid'])
def test_top1_router_learns_only_without_renormalisation(gate):
  """Top-1 gates renormalised over the one chosen expert are all 1: the loss gives the router no gradient
  (what the validator refuses); the raw gate scales the expert and carries it."""
  x = x_of()
  grads = {}
  for renorm in (True, False):
    c = model_cfg(E=4, K=1, gate=gate, renorm=renorm)
    m = moe.MoEFeedForward(c)
    params = nn.unbox(m.init(jax.random.PRNGKey(0), x)['params'])
    grads[renorm] = np.asarray(jax.grad(lambda p, m=m: jnp.sum(m.apply({'params': p}, x)[0] ** 2))(params)['router'])
  assert np.abs(grads[True]).max() < 1e-6 * np.abs(grads[False]).max()
  assert np.abs(grads[False]).max() > 1e-3
  with pytest.raises(UserError, match='makes every gate weight 1'):
    validate(_config(4, 1, 0, 0.0, gate, True, 16, 24, 0))


def test_param_tree_matches_flops_accounting():
  c = model_cfg(E=6, K=2, shared=2, e_ff=10)
  params, _, _ = init_apply(c, x_of())
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  lc = accounting._layer_counts(c)
  assert n == lc['moe_total']
  active = n - (c.moe.num_experts - c.moe.top_k) * 3 * c.d_model * c.moe.expert_d_ff
  assert active == lc['moe_active']
  assert params['router'].dtype == jnp.float32 and params['shared']['wi_gate'].shape == (16, 20)


def test_expert_parallel_matches_single_device():
  """8 simulated devices, mesh data=2 x expert=4: same outputs, aux and grads as unsharded."""
  from jax.sharding import Mesh

  devices = np.array(jax.devices()[:8]).reshape(2, 1, 4, 1)
  mesh = Mesh(devices, ('data', 'fsdp', 'expert', 'tensor'))
  rules = (('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('exp', 'expert'))
  c = model_cfg(E=8, K=2, cf=1.0, shared=1)
  x = x_of(B=8)
  m = moe.MoEFeedForward(c)
  params = nn.unbox(m.init(jax.random.PRNGKey(0), x)['params'])

  def f(p, x):
    y, aux = m.apply({'params': p}, x)
    return jnp.mean(y**2) + aux['aux_loss'], (y, aux)

  ref = jax.jit(jax.value_and_grad(f, has_aux=True))(params, x)
  abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))['params']
  shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  p_sh = jax.device_put(params, shard)
  assert p_sh['wi_gate'].sharding.spec[0] == 'expert'
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(jax.value_and_grad(f, has_aux=True))
    out = fn(p_sh, x)
    hlo = fn.lower(p_sh, x).compile().as_text()
  assert 'all-to-all' in hlo  # tokens move between expert shards inside the compiled step
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kw, message', [(dict(gate='relu'), 'moe.gate'), (dict(E=2, K=3), 'moe.top_k')])
def test_bad_moe_config_is_a_user_error(kw, message):
  args = dict(E=4, K=2, shared=0, cf=0.0, gate='softmax', renorm=True, d=16, d_ff=24, e_ff=0)
  with pytest.raises(UserError, match=message):  # refused by the schema before a model is built
    validate(_config(**{**args, **kw}))

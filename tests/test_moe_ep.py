"""Dropless expert-parallel dispatch (sktlm/model/moe_ep.py) on 8 simulated devices against the single-device
dropless path (itself checked against a float64 numpy token loop in test_moe.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

from sktlm.config import schema
from sktlm.config.validate import validate
from sktlm.model import moe, moe_ep

RULES = (('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('exp', 'expert'))


def model_cfg(dispatch='dropless_ep', buffer=0.0, E=8, K=2, overflow='exchange'):
  mc = schema.get_config().model
  mc.update(dict(n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=24, vocab_size=32,
                 init_std=0.3, dtype='float32', param_dtype='float32', norm_eps=1e-5, tie_embeddings=False))
  mc.moe.update(dict(num_experts=E, top_k=K, num_shared_experts=1, expert_d_ff=12, n_dense_layers=0, gate='softmax',
                     renormalize=True, aux_loss_coef=0.01, router_z_loss_coef=0.001, capacity_factor=0.0,
                     balance='aux_loss', bias_update_rate=0.0, seq_aux_loss_coef=0.0, dispatch=dispatch,
                     ep_buffer_factor=buffer, ep_overflow=overflow))
  return ml_collections.FrozenConfigDict(mc)


def run(c, params, x, mesh=None):
  m = moe.MoEFeedForward(c)

  def f(p, x):
    y, aux = m.apply({'params': p}, x)
    return jnp.mean(y**2) + aux['aux_loss'], (y, aux)

  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return fn(params, x), ''
  abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))['params']
  p_sh = jax.device_put(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    return fn(p_sh, x), fn.lower(p_sh, x).compile().as_text()


@pytest.mark.parametrize('data, expert, skew, buffer', [
    (2, 4, False, 0.0), (1, 8, True, 0.0), (2, 4, False, 2.0), (1, 8, True, 0.25)])
def test_dropless_ep_equals_single_device_dropless(data, expert, skew, buffer):
  """Values, aux and grads (params and input) equal the unsharded dropless path; dropped fraction 0. skew:
  every token picks experts 0 and 1, so every device sends all its tokens to one shard (the worst case the
  buffer 0.0 is sized for). buffer 0.25 (a first exchange of 0.25 x the balanced load) overflows there and
  the second exchange carries the rest; with ep_overflow='drop' those tokens are dropped and the result
  differs (negative control: the comparison can fail)."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(data, 1, expert, 1), ('data', 'fsdp', 'expert', 'tensor'))
  c = model_cfg(buffer=buffer)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 16), jnp.float32)
  params = nn.unbox(moe.MoEFeedForward(c).init(jax.random.PRNGKey(0), x)['params'])
  if skew:
    x = x + 2.0
    params['router'] = params['router'].at[:, :2].add(1.0)
  ref, _ = run(model_cfg(dispatch='dropless'), params, x)
  got, hlo = run(c, params, x, mesh)
  assert 'all-to-all' in hlo
  assert float(got[0][1][1]['dropped_frac']) == 0
  overflow = float(got[0][1][1]['ep_overflow_frac'])
  assert overflow > 0.5 if buffer == 0.25 else overflow == 0
  if skew:
    np.testing.assert_allclose(got[0][1][1]['expert_load'], [0.5, 0.5] + [0] * 6)
  for aux in (ref[0][1][1], got[0][1][1]):
    aux.pop('ep_overflow_frac')  # the single-device path has no exchange
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

  if skew:
    small, _ = run(model_cfg(buffer=0.25, overflow='drop'), params, x, mesh)
    assert float(small[0][1][1]['dropped_frac']) > 0.5
    assert not np.allclose(np.asarray(small[0][1][0]), np.asarray(ref[0][1][0]), rtol=1e-3, atol=1e-4)


def test_buffer_rows_bound():
  c = model_cfg(E=8, K=2).moe
  assert moe_ep.buffer_rows(c, 64, 4) == 64 * 2     # 2 local experts: a token sends at most 2 slots to a shard
  assert moe_ep.buffer_rows(c, 64, 8) == 64         # 1 local expert: at most 1
  assert moe_ep.buffer_rows(model_cfg(buffer=1.5).moe, 64, 8) == 24  # ceil(1.5 * 64 * 2 / 8)


def _moe_config(**moe):
  config = schema.get_config()
  config.model.moe.update(dict(num_experts=8, **moe))
  return config


def test_bad_overflow_mode_is_a_user_error():
  from sktlm.errors import UserError
  with pytest.raises(UserError, match="model.moe.ep_overflow must be one of 'exchange', 'drop', got 'keep'"):
    validate(_moe_config(ep_overflow='keep'))


def test_dispatch_auto():
  mk = lambda cf, d='auto': ml_collections.FrozenConfigDict(dict(capacity_factor=cf, dispatch=d))  # noqa: E731
  assert moe.dispatch_path(mk(1.25)) == 'capacity' and moe.dispatch_path(mk(0.0)) == 'dropless_ep'
  from sktlm.errors import UserError
  with pytest.raises(UserError, match='model.moe.dispatch'):
    validate(_moe_config(dispatch='ragged'))
  with pytest.raises(UserError, match='capacity_factor'):
    validate(_moe_config(dispatch='capacity'))

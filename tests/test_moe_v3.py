"""DeepSeek-V3 routing (sktlm/model/moe.py route: group-limited top-k, routed_scaling_factor, the aux-free bias)
and YaRN rope (sktlm/model/layers.py) against transformers' own DeepSeek-V3 code (DeepseekV3MoE, the yarn rope
initialisation, yarn_apply_mscale), in float32, on small random models. Every dispatch path (capacity with room
for every token, dropless, dropless expert-parallel on 8 simulated devices) is compared with the same torch MoE.
Negative controls: without the group limit, or without the scaling factor, the outputs differ."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import Mesh
from transformers.models.deepseek_v3 import configuration_deepseek_v3 as hf_cfg
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from sktlm.config import schema
from sktlm.model import layers, moe

RULES = (('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('exp', 'expert'))
D, E, K, F, G, GK = 16, 16, 4, 12, 4, 2


def model_cfg(dispatch='dropless', n_group=G, topk_group=GK, scale=2.5, capacity=0.0):
  """A full model config from the schema with this test's small shapes and V3 routing."""
  mc = schema.get_config('pico').model
  mc.update(dict(n_layers=2, d_model=D, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=24, vocab_size=32,
                 init_std=0.3, dtype='float32', param_dtype='float32', norm_eps=1e-5, tie_embeddings=False))
  mc.moe.update(dict(num_experts=E, top_k=K, num_shared_experts=1, expert_d_ff=F, n_dense_layers=0, gate='sigmoid',
                     renormalize=True, aux_loss_coef=0.0, router_z_loss_coef=0.0, capacity_factor=capacity,
                     balance='aux_free', bias_update_rate=0.0, seq_aux_loss_coef=0.0, dispatch=dispatch,
                     ep_buffer_factor=0.0, ep_overflow='exchange', routed_scaling_factor=scale, n_group=n_group,
                     topk_group=topk_group))
  return ml_collections.FrozenConfigDict(mc)


@dataclasses.dataclass
class Case:
  params: dict
  bias: np.ndarray
  x: np.ndarray
  torch_y: np.ndarray
  torch_experts: np.ndarray


@pytest.fixture(scope='module')
def case():
  c = model_cfg()
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (8, 8, D), jnp.float32))
  params = nn.unbox(moe.MoEFeedForward(c).init(jax.random.PRNGKey(0), jnp.asarray(x))['params'])
  params = jax.tree.map(np.asarray, params)
  bias = np.random.default_rng(0).normal(0, 0.2, E).astype(np.float32)
  hc = hf_cfg.DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
                               n_group=G, topk_group=GK, routed_scaling_factor=2.5, n_shared_experts=1,
                               norm_topk_prob=True, hidden_act='silu')
  m = hf_v3.DeepseekV3MoE(hc).float().eval()
  t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
  with torch.no_grad():
    m.gate.weight.copy_(t(params['router'].T))
    m.gate.e_score_correction_bias.copy_(t(bias))
    m.experts.gate_up_proj.copy_(t(np.concatenate([params['wi_gate'].transpose(0, 2, 1),
                                                   params['wi_up'].transpose(0, 2, 1)], axis=1)))
    m.experts.down_proj.copy_(t(params['wo'].transpose(0, 2, 1)))
    sh = params['shared']
    m.shared_experts.gate_proj.weight.copy_(t(sh['wi_gate'].T))
    m.shared_experts.up_proj.weight.copy_(t(sh['wi_up'].T))
    m.shared_experts.down_proj.weight.copy_(t(sh['wo'].T))
    y = m(t(x)).numpy()
    _, _, experts = m.gate(t(x))
  return Case(params, bias, x, y, np.sort(experts.numpy(), axis=-1))


def apply(c, case, mesh=None):
  m = moe.MoEFeedForward(c)
  variables = {'params': case.params, 'moe_bias': {'bias': jnp.asarray(case.bias)}}
  fn = jax.jit(lambda v, x: m.apply(v, x)[0])
  if mesh is None:
    return np.asarray(fn(variables, jnp.asarray(case.x)))
  abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.asarray(case.x)))['params']
  shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
  variables['params'] = jax.device_put(case.params, shard)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    return np.asarray(fn(variables, jnp.asarray(case.x)))


def test_route_picks_the_experts_of_transformers_router(case):
  c = model_cfg()
  logits = jnp.asarray(case.x.reshape(-1, D)) @ case.params['router']
  w, experts, _ = moe.route(c, logits, jnp.asarray(case.bias))
  np.testing.assert_array_equal(np.sort(np.asarray(experts), axis=-1), case.torch_experts)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-5)  # renormalised, then x routed_scaling_factor
  groups = np.unique(np.asarray(experts) // (E // G), axis=None)
  assert all(len(set(row)) <= GK for row in (np.asarray(experts) // (E // G)).tolist()), groups
  # Negative control: without the group limit a good share of tokens pick other experts.
  _, free, _ = moe.route(model_cfg(n_group=1), logits, jnp.asarray(case.bias))
  changed = np.mean(np.any(np.sort(np.asarray(free), axis=-1) != case.torch_experts, axis=-1))
  assert changed > 0.2, changed


@pytest.mark.parametrize('path', ['capacity', 'dropless', 'dropless_ep'])
def test_every_dispatch_path_equals_transformers_deepseek_v3_moe(case, path):
  """Group-limited routing with the bias and the scaling factor, through each dispatch path, against torch
  (float32, 1e-5). capacity: capacity_factor E / K, so no slot can be dropped."""
  mesh = None
  if path == 'dropless_ep':
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4, 1), ('data', 'fsdp', 'expert', 'tensor'))
  capacity = E / K if path == 'capacity' else 0.0
  y = apply(model_cfg(path, capacity=capacity), case, mesh)
  np.testing.assert_allclose(y, case.torch_y, atol=1e-5, rtol=1e-5)
  if path == 'dropless':  # negative controls: the comparison sees a missing group limit or scaling factor
    assert np.abs(apply(model_cfg(path, n_group=1), case) - case.torch_y).max() > 1e-2
    assert np.abs(apply(model_cfg(path, scale=1.0), case) - case.torch_y).max() > 1e-2


def test_group_limit_config_errors_are_one_line():
  """The schema's validator refuses groups that do not divide the experts or leave fewer than top_k to choose."""
  from sktlm.config import schema
  from sktlm.config.validate import validate
  from sktlm.errors import UserError

  def full(**moe_over):
    c = schema.get_config('pico')
    c.model.moe.update(num_experts=E, top_k=K, expert_d_ff=F, gate='sigmoid', **moe_over)
    return c
  validate(full(n_group=4, topk_group=1))  # 1 group x 4 experts >= top_k 4: allowed
  validate(full(n_group=G, topk_group=GK))
  for bad in (dict(n_group=3), dict(n_group=2, topk_group=3), dict(n_group=8, topk_group=1)):
    with pytest.raises(UserError, match='moe.n_group|moe.topk_group'):
      validate(full(**bad))


# ---------------------------------------------------------------- YaRN
YARN = dict(type='yarn', factor=40.0, original_max_position=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
            mscale_all_dim=1.0)


def yarn_mc(**over):
  return ml_collections.FrozenConfigDict(dict(rope_theta=10_000.0, rope_scaling=dict(YARN, **over)))


@pytest.mark.parametrize('over', [{}, dict(mscale=0.707, mscale_all_dim=0.0), dict(factor=4.0, beta_fast=16.0)])
def test_yarn_frequencies_and_scales_equal_transformers(over):
  """inv_freq, the cos/sin factor and the softmax-scale factor of DeepSeek-V3's YaRN (dims 64, as its rope
  head) against transformers' rope init and yarn_apply_mscale; default RoPE is unchanged; a wrong
  original context (negative control) moves the frequencies."""
  mc = yarn_mc(**over)
  ys = dict(YARN, **over)
  rope = {'rope_type': 'yarn', 'rope_theta': 10_000.0, 'factor': ys['factor'],
          'original_max_position_embeddings': ys['original_max_position'], 'beta_fast': ys['beta_fast'],
          'beta_slow': ys['beta_slow'], 'mscale': ys['mscale'], 'mscale_all_dim': ys['mscale_all_dim']}
  hc = hf_cfg.DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=64,
                               max_position_embeddings=int(64 * ys['factor']), rope_parameters=rope)
  emb = hf_v3.DeepseekV3RotaryEmbedding(hc)
  inv, cos_factor = layers.rope_frequencies(mc, 64)
  np.testing.assert_allclose(inv, emb.inv_freq.numpy(), rtol=1e-6)
  assert abs(cos_factor - emb.attention_scaling) < 1e-6
  want = hf_v3.yarn_apply_mscale(hc.rope_parameters, 1.0)
  assert abs(layers.softmax_scale_factor(mc) - want) < 1e-6
  # applied: rope() at positions equals HF's cos/sin rotation (rotate-half layout, rope_interleave=False)
  x = np.random.default_rng(0).normal(size=(1, 5, 1, 64)).astype(np.float32)
  pos = np.array([[0, 3, 100, 1000, 2500]])
  cos, sin = emb(torch.tensor(x), torch.tensor(pos))
  ref, _ = hf_v3.apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.tensor(x).transpose(1, 2), cos, sin)
  got = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(pos), mc))
  np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), atol=1e-4)  # float32 angles: ulp(2500) = 2.4e-4
  wrong, _ = layers.rope_frequencies(yarn_mc(**dict(over, original_max_position=4096)), 64)
  assert np.abs(wrong - inv).max() > 1e-3 * np.abs(inv).max()


def test_default_rope_is_unchanged():
  mc = ml_collections.FrozenConfigDict(dict(rope_theta=500.0))
  inv, f = layers.rope_frequencies(mc, 8)
  np.testing.assert_allclose(inv, 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
  assert f == 1.0 and layers.softmax_scale_factor(mc) == 1.0

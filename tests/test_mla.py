"""Multi-head latent attention (sktlm/model/mla.py): values and gradients against a float64 numpy per-head
implementation, packed rows, scan/remat equivalence, the same losses on meshes, and its accounting."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_documents_isolated
from test_model import make_batch, np_rmsnorm, np_rope, stack_layers, to_numpy64

from sktlm import sharding
from sktlm.config import accounting, layout, load
from sktlm.model import transformer as model
from sktlm.plan import planner
from sktlm.train import resolve, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small MLA: 4 heads, qk = 6 nope + 4 rope = 10, v = 6 (so the core pads v), latents 16 (q) and 8 (kv).
MLA = {'model.attention': 'mla', 'model.mla.q_lora_rank': 16, 'model.mla.kv_lora_rank': 8,
       'model.mla.qk_nope_head_dim': 6, 'model.mla.qk_rope_head_dim': 4, 'model.mla.v_head_dim': 6}


def mla_config(**over):
  base = {'model.vocab_size': 384, 'model.n_layers': 2, 'model.d_model': 32, 'model.n_heads': 4,
          'model.d_ff': 48, 'data.seq_len': 16, **MLA}
  base.update(over)
  return load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=pico'), base)


# ---------------------------------------------------------------- float64 numpy reference
def np_mla(a, h, pos, seg, mc):
  """MLA written out per head and per query, float64 (the module doc's equations)."""
  m = mc.mla
  N, R = m.qk_nope_head_dim, m.qk_rope_head_dim
  if m.q_lora_rank:
    q = np.einsum('btl,lhk->bthk', np_rmsnorm(h @ a['wq_a'], a['q_norm']['scale'], mc.norm_eps), a['wq_b'])
  else:
    q = np.einsum('btd,dhk->bthk', h, a['wq'])
  ckv = np_rmsnorm(h @ a['wkv_a'], a['kv_norm']['scale'], mc.norm_eps)
  k_nope = np.einsum('btl,lhn->bthn', ckv, a['wk_b'])
  v = np.einsum('btl,lhv->bthv', ckv, a['wv_b'])
  k_rope = np_rope((h @ a['wk_rope'])[:, :, None], pos, mc.rope_theta)[:, :, 0]  # one key for all heads
  q_nope, q_rope = q[..., :N], np_rope(q[..., N:], pos, mc.rope_theta)
  B, T, H, _ = q.shape
  out = np.zeros((B, T, H, m.v_head_dim))
  for b in range(B):
    for head in range(H):
      for t in range(T):
        allowed = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
        sc = np.array([(q_nope[b, t, head] @ k_nope[b, s, head] + q_rope[b, t, head] @ k_rope[b, s])
                       / np.sqrt(N + R) for s in allowed])
        w = np.exp(sc - sc.max())
        w /= w.sum()
        out[b, t, head] = sum(wi * v[b, s, head] for wi, s in zip(w, allowed, strict=True))
  return np.einsum('bthv,hvd->btd', out, a['wo'])


def np_forward(p, mc, tokens, pos, seg):
  x = p['embedding'][tokens]
  for i in range(mc.n_layers):
    lp = p[f'layers_{i}']
    x = x + np_mla(lp['attn'], np_rmsnorm(x, lp['attn_norm']['scale'], mc.norm_eps), pos, seg, mc)
    h = np_rmsnorm(x, lp['mlp_norm']['scale'], mc.norm_eps)
    g, u = h @ lp['mlp']['wi_gate'], h @ lp['mlp']['wi_up']
    x = x + (g / (1 + np.exp(-g)) * u) @ lp['mlp']['wo']
  return np_rmsnorm(x, p['final_norm']['scale'], mc.norm_eps) @ p['head']


def np_loss(p, mc, batch):
  logits = np_forward(p, mc, batch['inputs'], batch['positions'], batch['segment_ids'])
  mx = logits.max(-1, keepdims=True)
  lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[..., 0]
  tgt = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  return float(((lse - tgt) * batch['weights']).sum() / batch['weights'].sum())


def init_params(config, seed=0):
  m = model.make_model(config.model)
  return m, nn.meta.unbox(m.init(jax.random.PRNGKey(seed), jnp.zeros((1, config.data.seq_len), jnp.int32))['params'])


# q_lora_rank 0 is DeepSeek-V2-Lite's direct query projection; block 5 over T=16 puts the document boundary
# (row 9) inside a block; blocked_vjp is the hand-written backward the CPU picks for bf16.
VARIANTS = {'lora_blocked': {'model.attention_impl': 'blocked', 'model.attention_block': 5},
            'direct_q_dense': {'model.attention_impl': 'dense', 'model.mla.q_lora_rank': 0},
            'lora_blocked_vjp': {'model.attention_impl': 'blocked_vjp', 'model.attention_block': 5}}


@pytest.mark.parametrize('variant', VARIANTS)
def test_loss_and_gradients_match_float64_numpy(variant):
  config = mla_config(**{'model.scan_layers': False, **VARIANTS[variant]})
  m, params = init_params(config)
  batch = make_batch()
  p64 = to_numpy64(params)
  logits, _ = m.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
  ref = np_forward(p64, config.model, batch['inputs'], batch['positions'], batch['segment_ids'])
  np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5 * np.abs(ref).max(), rtol=1e-4)

  denom = float(batch['weights'].sum())
  (loss, _), grads = jax.value_and_grad(step.make_loss_fn(config, m), has_aux=True)(params, batch, denom)
  assert abs(float(loss) - np_loss(p64, config.model, batch)) < 1e-5 * float(loss)
  # Gradients: directional derivatives of the numpy loss (central differences) along the gradient and along a
  # random direction, which catches a gradient right in norm but wrong in direction.
  g64 = to_numpy64(grads)
  gnorm = float(np.sqrt(sum((x * x).sum() for x in jax.tree.leaves(g64))))
  rng = np.random.default_rng(1)
  rand = jax.tree.map(lambda p: rng.standard_normal(p.shape), p64)
  rnorm = float(np.sqrt(sum((x * x).sum() for x in jax.tree.leaves(rand))))
  eps = 1e-3
  for direction in (jax.tree.map(lambda g: g / gnorm, g64), jax.tree.map(lambda r: r / rnorm, rand)):
    plus = np_loss(jax.tree.map(lambda p, u: p + eps * u, p64, direction), config.model, batch)
    minus = np_loss(jax.tree.map(lambda p, u: p - eps * u, p64, direction), config.model, batch)
    dot = sum((a * b).sum() for a, b in zip(jax.tree.leaves(g64), jax.tree.leaves(direction), strict=True))
    assert abs((plus - minus) / (2 * eps) - dot) < 1e-3 * gnorm, (variant, dot)
  # Every MLA weight gets a gradient (none is dead, e.g. the rope key or the latent norms).
  for name, g in grads['layers_0']['attn'].items():
    assert np.abs(np.asarray(jax.tree.leaves(g)[0])).max() > 0, name


def test_packed_rows_never_attend_across_documents():
  config = mla_config(**{'model.attention_block': 5})
  m, params = init_params(config)
  assert_documents_isolated(m, params, make_batch())


@pytest.mark.parametrize('remat, unroll', [('full', 0), ('dots', 1)])
def test_scan_and_remat_match_plain_stack(remat, unroll):
  plain = mla_config(**{'model.scan_layers': False})
  other = mla_config(**{'model.scan_layers': True, 'model.remat': remat, 'model.scan_unroll': unroll})
  m_plain, params = init_params(plain)
  batch = make_batch()
  denom = float(batch['weights'].sum())

  def lg(cfg, m, p):
    return jax.jit(jax.value_and_grad(step.make_loss_fn(cfg, m), has_aux=True))(p, batch, denom)

  (l1, _), g1 = lg(plain, m_plain, params)
  (l2, _), g2 = lg(other, model.make_model(other.model), stack_layers(params, 2))
  assert abs(float(l1) - float(l2)) < 1e-6 * abs(float(l1))
  for a, b in zip(jax.tree.leaves(stack_layers(g1, 2)), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(a).max())


def train_losses(config, mesh, batch, steps=3):
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  b = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
  losses = []
  for _ in range(steps):
    state, m = setup.train_step(state, b)
    losses.append(float(m['loss']))
  return np.array(losses), state


@pytest.mark.parametrize('shape', [(2, 2, 2), pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_same_losses_on_one_device_and_on_mesh_shapes(shape):
  config = mla_config(**{'train.batch_size': 8, 'optim.peak_lr': 1e-2, 'optim.warmup_steps': 1,
                         'model.attention_block': 4})
  batch = {k: np.concatenate([v] * 4) for k, v in make_batch().items()}
  one = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  ref, _ = train_losses(config, one, batch)
  d, f, t = shape
  config.mesh.update(dict(data=d, fsdp=f, tensor=t))
  losses, state = train_losses(config, sharding.make_mesh(config.mesh), batch)
  np.testing.assert_allclose(losses, ref, rtol=2e-5)
  assert losses[-1] < losses[0]
  # The weights really are split as the logical names say: heads over tensor, embed and the latents over fsdp.
  wq_b, wkv_a = state.params['layers']['attn']['wq_b'], state.params['layers']['attn']['wkv_a']
  assert wq_b.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)  # [layers, Lq, H, K]
  assert wkv_a.sharding.shard_shape(wkv_a.shape) == (2, 32 // f, 8)


@pytest.mark.parametrize('over', [{}, {'model.mla.q_lora_rank': 0}])
def test_param_counts_match_the_parameter_tree(over):
  for spec, extra in ((os.path.join(ROOT, 'experiments/lm.py:size=pico'), MLA),
                      (os.path.join(ROOT, 'experiments/flagship.py:layers=3,experts=4,top_k=2'), {})):
    config = load.load_config(spec, {'model.vocab_size': 384, **extra, **over})
    assert config.model.attention == 'mla'
    m = model.make_model(config.model)
    shapes = jax.eval_shape(lambda m=m: nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
    p = shapes['params']
    counts = accounting.param_counts(config.model)
    assert counts['total'] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
    # The attention weights of one layer, from the tree: the matmul weights (N of 6N) and the latent norms.
    attn = p['moe_layers' if 'moe_layers' in p else 'layers']['attn']
    n_layers = attn['wo'].shape[0]
    weights = sum(int(np.prod(x.shape)) for k, x in attn.items() if k.startswith('w')) // n_layers
    norms = sum(int(np.prod(x['scale'].shape)) for k, x in attn.items() if k.endswith('norm')) // n_layers
    assert accounting._attention_weights(config.model) == (weights, norms)


def test_flagship_attention_is_deepseek_v3_mla():
  """The flagship's MLA layer: ~101M attention weights (64 heads) and a 576-value latent per token."""
  config = load.load_config(os.path.join(ROOT, 'experiments/flagship.py'))
  mc = config.model
  a = mc.mla
  assert (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (
      1536, 512, 128, 64, 128)
  weights, _ = accounting._attention_weights(mc)
  assert weights == 7168 * 1536 + 1536 * 64 * 192 + 7168 * 512 + 7168 * 64 + 512 * 64 * 256 + 64 * 128 * 7168
  assert 100e6 < weights < 102e6
  assert layout.attention_dims(mc) == (192, 128)
  # A.X K1's published counts: ~519B total, ~33B active (the remaining 0.7% of active: module doc of
  # experiments/flagship.py).
  p = accounting.param_counts(mc)
  assert p['total'] == pytest.approx(519e9, rel=0.01) and p['active'] == pytest.approx(33e9, rel=0.01)


def test_traced_matmul_flops_equal_the_analytic_count():
  """6N + 6 L H (qk + v) T against the matmuls of the real compiled step (one attention block, v = qk so
  nothing is padded): equal once the one-hot embedding matmul of small vocabularies is added."""
  config = mla_config(**{'model.mla.v_head_dim': 10, 'model.attention_impl': 'dense', 'train.batch_size': 8,
                         'data.seq_len': 32, 'model.vocab_size': 256})
  rep = planner.plan(config, planner.get_target('cpu:8'))
  v, d = config.model.vocab_size, config.model.d_model
  one_hot = 4 * v * d * 8 * 32 / 8
  assert rep['traced_flops_per_device'] == pytest.approx(rep['analytic_flops_per_device'] + one_hot, rel=0.005)
  # Negative control: the GQA attention term (12 L H head_dim T, head_dim = d_model / H = 8) is 3% off.
  L, H, T = 2, 4, 32
  gqa_term = (rep['flops_per_token']['6N'] + 12 * L * H * 8 * T) * 8 * T / 8
  assert rep['traced_flops_per_device'] != pytest.approx(gqa_term + one_hot, rel=0.01)

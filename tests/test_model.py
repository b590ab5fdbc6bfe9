"""Model numerics against an independent float64 numpy implementation, and scan/remat equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_documents_isolated

from sktlm.config import accounting, load
from sktlm.model import kernels as sktlm_kernels
from sktlm.model import transformer as model
from sktlm.train import step


def small_config(**over):
  base = {'model.vocab_size': 384, 'model.n_layers': 2, 'model.d_model': 32, 'model.n_heads': 4,
          'model.n_kv_heads': 2, 'model.d_ff': 48, 'data.seq_len': 16}
  base.update(over)
  return load.load_config('experiments/lm.py:size=pico', base)


# ---------------------------------------------------------------- float64 numpy reference
def np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, pos, theta):
  K = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, K, 2) / K)
  ang = pos[..., None] * inv  # B,T,K/2
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., :K // 2], x[..., K // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_forward(p, mc, tokens, pos, seg):
  """Straightforward per-head loops, float64; p is the unscanned param tree as numpy."""
  B, T = tokens.shape
  H, KV = mc.n_heads, mc.n_kv_heads
  x = p['embedding'][tokens]
  for i in range(mc.n_layers):
    lp = p[f'layers_{i}']
    h = np_rmsnorm(x, lp['attn_norm']['scale'], mc.norm_eps)
    a = lp['attn']
    q = np.einsum('btd,dhk->bthk', h, a['wq'])
    k = np.einsum('btd,dhk->bthk', h, a['wk'])
    v = np.einsum('btd,dhk->bthk', h, a['wv'])
    K = q.shape[-1]
    q, k = np_rope(q, pos, mc.rope_theta) / np.sqrt(K), np_rope(k, pos, mc.rope_theta)
    out = np.zeros_like(q)
    for b in range(B):
      for head in range(H):
        kvh = head // (H // KV)
        for t in range(T):
          allowed = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
          sc = np.array([q[b, t, head] @ k[b, s, kvh] for s in allowed])
          w = np.exp(sc - sc.max())
          w /= w.sum()
          out[b, t, head] = sum(wi * v[b, s, kvh] for wi, s in zip(w, allowed, strict=True))
    x = x + np.einsum('bthk,hkd->btd', out, a['wo'])
    h = np_rmsnorm(x, lp['mlp_norm']['scale'], mc.norm_eps)
    m = lp['mlp']
    g, u = h @ m['wi_gate'], h @ m['wi_up']
    x = x + (g / (1 + np.exp(-g)) * u) @ m['wo']
  x = np_rmsnorm(x, p['final_norm']['scale'], mc.norm_eps)
  head = p['embedding'].T if mc.tie_embeddings else p['head']
  return x @ head


def np_loss(p, mc, batch):
  logits = np_forward(p, mc, batch['inputs'], batch['positions'], batch['segment_ids'])
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  tgt = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  w = batch['weights']
  return float(((lse - tgt) * w).sum() / w.sum())


def make_batch(B=2, T=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[0, 9:] = 2  # two documents packed in row 0
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  pos[0, 9:] = np.arange(T - 9)
  weights = np.ones((B, T), np.float32)
  weights[0, 8] = 0.0  # the target that would cross documents
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg, 'positions': pos,
          'weights': weights}


def init_params(config, seed=0):
  m = model.make_model(config.model)
  v = m.init(jax.random.PRNGKey(seed), jnp.zeros((1, config.data.seq_len), jnp.int32))
  return m, nn.meta.unbox(v['params'])


def to_numpy64(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


# Attention variants: one dense T x T block, and query blocks of 5 over T=16 (uneven last block; the document
# boundary at row 9 falls inside a block), differentiated by JAX (plain kernels) or by hand (the cpu kernels:
# blocked_vjp attention and hand-written dense / swiglu / embedding backward passes).
ATTENTION = {'dense': {'model.attention_impl': 'dense', 'model.kernels': 'plain'},
             'blocked': {'model.attention_impl': 'blocked', 'model.attention_block': 5, 'model.kernels': 'plain'},
             'blocked_vjp': {'model.attention_impl': 'blocked_vjp', 'model.attention_block': 5,
                             'model.kernels': 'cpu'}}


@pytest.mark.parametrize('attention', ATTENTION)
@pytest.mark.parametrize('tie', [False, True])
def test_forward_matches_float64_numpy(tie, attention):
  config = small_config(**{'model.scan_layers': False, 'model.tie_embeddings': tie, **ATTENTION[attention]})
  m, params = init_params(config)
  batch = make_batch()
  logits, _ = m.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
  ref = np_forward(to_numpy64(params), config.model, batch['inputs'], batch['positions'],
                   batch['segment_ids'])
  # float32 vs float64 over a 2-layer net: agreement to ~1e-5 of the logit scale.
  np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5 * np.abs(ref).max(), rtol=1e-4)


@pytest.mark.parametrize('attention', ATTENTION)
def test_golden_loss_and_grad_norm(attention):
  """Loss and gradient norm of the train loss vs the float64 reference: the norm is checked as the
  directional derivative along the gradient, by central finite differences of the numpy loss."""
  config = small_config(**{'model.scan_layers': False, 'model.z_loss': 0.0, **ATTENTION[attention]})
  m, params = init_params(config)
  batch = make_batch()
  loss_fn = step.make_loss_fn(config, m)
  denom = float(batch['weights'].sum())
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, denom)
  p64 = to_numpy64(params)
  ref_loss = np_loss(p64, config.model, batch)
  assert abs(float(loss) - ref_loss) < 1e-5 * ref_loss
  assert abs(ref_loss - np.log(384)) < 0.05  # sanity: near-uniform predictions at init

  g64 = to_numpy64(grads)
  gnorm = float(np.sqrt(sum((x * x).sum() for x in jax.tree.leaves(g64))))
  eps = 1e-3
  unit = jax.tree.map(lambda g: g / gnorm, g64)
  plus = np_loss(jax.tree.map(lambda p, u: p + eps * u, p64, unit), config.model, batch)
  minus = np_loss(jax.tree.map(lambda p, u: p - eps * u, p64, unit), config.model, batch)
  fd = (plus - minus) / (2 * eps)
  assert abs(fd - gnorm) < 1e-3 * gnorm, (fd, gnorm)
  # And along a random direction (catches a gradient that is right in norm but wrong in direction).
  rng = np.random.default_rng(1)
  rand = jax.tree.map(lambda p: rng.standard_normal(p.shape), p64)
  rnorm = np.sqrt(sum((x * x).sum() for x in jax.tree.leaves(rand)))
  rand = jax.tree.map(lambda r: r / rnorm, rand)
  dot = sum((a * b).sum() for a, b in zip(jax.tree.leaves(g64), jax.tree.leaves(rand), strict=True))
  plus = np_loss(jax.tree.map(lambda p, u: p + eps * u, p64, rand), config.model, batch)
  minus = np_loss(jax.tree.map(lambda p, u: p - eps * u, p64, rand), config.model, batch)
  assert abs((plus - minus) / (2 * eps) - dot) < 1e-3 * gnorm


@pytest.mark.parametrize('impl', ['blocked', 'blocked_vjp'])
@pytest.mark.parametrize('block', [3, 7])  # uneven last blocks; 6 and 3 blocks
def test_blocked_attention_equals_dense(block, impl):
  """The blocked form skips only fully masked work: same loss and gradients as one dense block (float32,
  different summation order), for MHA and GQA."""
  batch = make_batch()
  denom = float(batch['weights'].sum())
  for kv_heads in (4, 2):
    dense = small_config(**{'model.attention_impl': 'dense', 'model.n_kv_heads': kv_heads})
    blocked = small_config(**{'model.attention_impl': impl, 'model.attention_block': block,
                              'model.n_kv_heads': kv_heads})
    m, params = init_params(dense)
    (l1, _), g1 = jax.jit(jax.value_and_grad(step.make_loss_fn(dense, m), has_aux=True))(params, batch, denom)
    m2 = model.make_model(blocked.model)
    (l2, _), g2 = jax.jit(jax.value_and_grad(step.make_loss_fn(blocked, m2), has_aux=True))(params, batch, denom)
    assert abs(float(l1) - float(l2)) < 1e-6 * abs(float(l1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize('kernels', ['cpu', 'plain'])
@pytest.mark.parametrize('attention_dtype', ['', 'float32'])
def test_bfloat16_compute_tracks_float32(attention_dtype, kernels):
  """bfloat16 compute (float32 params, accumulation and softmax; attention operands bf16 by default, via
  blocked_vjp with the cpu kernels, or float32) stays within bf16 precision of the float32 model: loss to 1e-2
  relative, gradients to a few percent of their scale. Kernels and attention resolved as step.build does."""
  batch = make_batch()
  denom = float(batch['weights'].sum())
  out = {}
  for dt in ('float32', 'bfloat16'):
    config = small_config(**{'model.dtype': dt, 'model.attention_block': 5, 'model.kernels': kernels,
                             'model.attention_dtype': attention_dtype if dt == 'bfloat16' else ''})
    sktlm_kernels.resolve(config.model, 'cpu')
    m, params = init_params(config)
    out[dt] = jax.jit(jax.value_and_grad(step.make_loss_fn(config, m), has_aux=True))(params, batch, denom)
  (l32, _), g32 = out['float32']
  (l16, _), g16 = out['bfloat16']
  assert abs(float(l16) - float(l32)) < 1e-2 * float(l32)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
    assert b.dtype == jnp.float32
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-7


def stack_layers(params, n):
  """Unscanned params (layers_0..n-1) -> the scanned layout (leading layer axis under 'layers')."""
  out = {k: v for k, v in params.items() if not k.startswith('layers_')}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f'layers_{i}'] for i in range(n)])
  return out


# scan_unroll 2 is fully unrolled (what auto resolves to on CPU), 1 a rolled loop.
@pytest.mark.parametrize('remat, unroll', [('none', 2), ('none', 1), ('full', 2), ('full', 1), ('dots', 1)])
def test_scan_and_remat_match_plain_stack(remat, unroll):
  plain = small_config(**{'model.scan_layers': False, 'model.remat': 'none', 'model.z_loss': 1e-4})
  other = small_config(**{'model.scan_layers': True, 'model.remat': remat, 'model.z_loss': 1e-4,
                          'model.scan_unroll': unroll})
  m_plain, params = init_params(plain)
  m_other = model.make_model(other.model)
  batch = make_batch()
  denom = float(batch['weights'].sum())

  def lg(cfg, m, p):
    return jax.jit(jax.value_and_grad(step.make_loss_fn(cfg, m), has_aux=True))(p, batch, denom)

  (l1, _), g1 = lg(plain, m_plain, params)
  (l2, _), g2 = lg(other, m_other, stack_layers(params, 2))
  assert abs(float(l1) - float(l2)) < 1e-6 * abs(float(l1))
  g1 = stack_layers(g1, 2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_scan_unroll_is_capped_by_the_stack_and_rolled_when_unresolved():
  config = small_config(**{'model.n_layers': 5, 'model.scan_unroll': 2})
  assert model.scan_unroll(config.model, 5) == 2
  assert model.scan_unroll(config.model, 1) == 1
  config.model.scan_unroll = 0  # auto, not resolved by train.build: a rolled loop (resolution: test_kernels.py)
  assert model.scan_unroll(config.model, 5) == 1


@pytest.mark.parametrize('attention', ATTENTION)
def test_attention_never_crosses_documents(attention):
  """Changing document 2 of a packed row leaves every logit of document 1 unchanged (and vice versa
  changes document 2's logits)."""
  config = small_config(**ATTENTION[attention])
  m, params = init_params(config)
  assert_documents_isolated(m, params, make_batch())


@pytest.mark.parametrize('size', ['pico', 'tiny', 'large'])
@pytest.mark.parametrize('tie', [False, True])
def test_param_counts_match_the_parameter_tree(size, tie):
  config = load.load_config(f'experiments/lm.py:size={size}',
                               {'model.vocab_size': 384, 'model.tie_embeddings': tie})
  m = model.make_model(config.model)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  counts = accounting.param_counts(config.model)
  assert counts['total'] == n
  assert counts['non_embedding'] == n - 384 * config.model.d_model * (1 if tie else 2)

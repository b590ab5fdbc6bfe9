"""The kernel sets (sktlm/model/kernels): the cpu kernels equal the plain path, `auto` resolves per platform in
train.build and the resolved choice lands in config.json, and the cpu kernels keep bf16 matmuls bf16.

Tolerances: float32, the same math in another summation order: 1e-5 of each result's scale (values and
gradients). bfloat16: the plain path rounds weight gradients to bf16 (autodiff through the cast) while the cpu
kernels return them in float32, and matmul inputs are rounded at different points: 2e-2 of the scale (bf16 has
an 8-bit mantissa, relative step 2^-8 = 0.4%, and errors add over a few roundings).
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_operand_dtypes, train_config

from sktlm import sharding
from sktlm.config import schema
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.model import kernels
from sktlm.model import transformer as model
from sktlm.train import loop, resolve, step

RNG = np.random.default_rng(0)
TOL = {'float32': 1e-5, 'bfloat16': 2e-2}


def _ops(**over):
  mc = schema.get_config().model
  mc.update(over)
  return kernels.ops(mc)


PLAIN, CPU = _ops(kernels='plain'), _ops(kernels='cpu', attention_impl='blocked_vjp')


def close(actual, expected, dtype):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err = np.abs(actual - expected).max()
  assert err <= TOL[dtype] * np.abs(expected).max(), (err, np.abs(expected).max())


def seg_ids(B, T):
  seg = np.ones((B, T), np.int32)
  seg[0, T // 2:] = 2   # a document boundary inside a block
  seg[1, T - 3:] = 0    # padding
  return jnp.asarray(seg)


TOKENS = jnp.asarray(RNG.integers(0, 40, 64), jnp.int32)
# One case per operation of the Ops interface: argument shapes, kinds ('a': an activation in the compute dtype,
# 'w': a float32 parameter) and a function of (ops, compute dtype, *args).
CASES = {
    'dense': (((64, 24), (24, 40)), 'aw', lambda ops, dt, x, w: ops.dense(x, w)),
    'dense_f32_out': (((64, 24), (24, 40)), 'aw', lambda ops, dt, x, w: ops.dense(x, w, jnp.float32)),
    'swiglu': (((64, 24), (24, 40), (24, 40), (40, 24)), 'awww', lambda ops, dt, x, *ws: ops.swiglu(x, *ws)),
    'embed': (((40, 24),), 'w', lambda ops, dt, t: ops.embed(TOKENS, t, dt)),
    'tied_head': (((64, 24), (40, 24)), 'aw', lambda ops, dt, x, e: ops.dense(x, ops.transposed(e), jnp.float32)),
    'attention': (((2, 13, 4, 8), (2, 13, 2, 8), (2, 13, 2, 8)), 'aaa',
                  lambda ops, dt, q, k, v: ops.causal_attention(q, k, v, seg_ids(2, 13), block=5)),
}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('case', CASES)
def test_cpu_kernels_equal_the_plain_path(case, dtype):
  """Values and gradients of every Ops entry, cpu vs plain."""
  shapes, kinds, fn = CASES[case]
  args = [jnp.asarray(RNG.standard_normal(s) * (1.0 if k == 'a' else 0.2), dtype if k == 'a' else jnp.float32)
          for s, k in zip(shapes, kinds, strict=True)]
  dt = jnp.dtype(dtype)
  out_p = jax.jit(lambda *a: fn(PLAIN, dt, *a))(*args)
  dy = jnp.asarray(RNG.standard_normal(out_p.shape), jnp.float32)

  def value_and_grads(ops):
    out = jax.jit(lambda *a: fn(ops, dt, *a))(*args)
    # dy is an argument: as a closed-over constant XLA:CPU folds it into dots its runtime cannot execute
    grads = jax.jit(jax.grad(lambda dy, *a: jnp.vdot(fn(ops, dt, *a).astype(jnp.float32), dy),
                             argnums=tuple(range(1, len(args) + 1))))(dy, *args)
    return out, grads

  out_p, g_p = value_and_grads(PLAIN)
  out_c, g_c = value_and_grads(CPU)
  assert out_c.dtype == out_p.dtype
  close(out_c, out_p, dtype)
  for a, b, x in zip(g_c, g_p, args, strict=True):
    assert a.dtype == b.dtype == x.dtype  # float32 params get float32 gradients on both paths
    close(a, b, dtype)


def model_config(**over):
  config = schema.get_config('pico')
  config.model.update(dict(vocab_size=384, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                           attention_block=5, scan_layers=True))
  config.model.update(over)
  return config


def batch_of(B=2, T=16):
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 259, (B, T + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.asarray(seg_ids(B, T)),
          'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)), 'weights': np.ones((B, T), np.float32)}


def loss_and_grads(config, params=None):
  m = model.make_model(config.model)
  if params is None:
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                          m.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params'],
                          is_leaf=lambda x: hasattr(x, 'unbox'))
  fn = jax.value_and_grad(step.make_loss_fn(config, m), has_aux=True)
  (loss, _), grads = jax.jit(fn)(params, batch_of(), 32.0)
  return float(loss), grads, params, jax.make_jaxpr(fn)(params, batch_of(), 32.0)


# bf16 with tied embeddings used to crash XLA:CPU (see cpu.transposed_param)
@pytest.mark.parametrize('dtype, tie', [('float32', False), ('bfloat16', True)])
def test_model_with_cpu_kernels_equals_plain(dtype, tie):
  """The whole loss and its gradients, auto resolved for CPU (cpu kernels; blocked_vjp for bf16) vs plain."""
  cpu_cfg = model_config(dtype=dtype, tie_embeddings=tie)
  kernels.resolve(cpu_cfg.model, 'cpu')
  assert cpu_cfg.model.kernels == 'cpu'
  plain_cfg = model_config(dtype=dtype, kernels='plain', tie_embeddings=tie)
  kernels.resolve(plain_cfg.model, 'cpu')
  assert plain_cfg.model.attention_impl == 'blocked'
  l_c, g_c, params, jaxpr_c = loss_and_grads(cpu_cfg)
  l_p, g_p, _, jaxpr_p = loss_and_grads(plain_cfg, params)
  # The two paths really differ (else this test could not fail): only the cpu one has custom backward passes.
  assert 'custom_vjp_call' in str(jaxpr_c) and 'custom_vjp_call' not in str(jaxpr_p)
  assert abs(l_c - l_p) <= (1e-6 if dtype == 'float32' else 1e-2) * abs(l_p)
  for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_p), strict=True):
    assert a.dtype == b.dtype == jnp.float32
    close(a, b, dtype if dtype == 'float32' else 'bfloat16')


def test_bfloat16_model_matmuls_stay_bf16_only_with_cpu_kernels():
  """Every matmul of the bf16 train gradient (forward and backward, embedding to head) is bf16 x bf16 -> f32
  on XLA:CPU with the cpu kernels; with the plain kernels some are not (the negative control)."""
  def dots(kernel_set):
    # blocks of 8 rows: a 1-row last block (block 5 at T=16) gets an f32 dk/dv matmul from XLA:CPU
    config = model_config(dtype='bfloat16', kernels=kernel_set, attention_block=8)
    kernels.resolve(config.model, 'cpu')
    m = model.make_model(config.model)
    params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))['params']
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params,
                          is_leaf=lambda x: hasattr(x, 'unbox'))
    fn = jax.grad(lambda p, b: step.make_loss_fn(config, m)(p, b, 32.0)[0])
    return dot_operand_dtypes(jax.jit(fn).lower(params, batch_of()).compile().as_text())

  with_cpu = dots('cpu')
  assert len(with_cpu) >= 2 * 4 * 3  # per layer: q, k, v, o and three MLP matmuls, each with two gradients
  assert all(d == ('bf16', 'bf16', 'f32') for d in with_cpu), with_cpu
  assert any(d != ('bf16', 'bf16', 'f32') for d in dots('plain'))


@pytest.mark.parametrize('platform, dtype, want', [
    ('cpu', 'float32', ('cpu', 'blocked', 2)),
    ('cpu', 'bfloat16', ('cpu', 'blocked_vjp', 2)),
    ('tpu', 'bfloat16', ('tpu', 'splash', 1)),
    ('gpu', 'bfloat16', ('gpu', 'flash', 1)),
    ('cuda', 'float32', ('gpu', 'flash', 1)),
    ('metal', 'bfloat16', ('plain', 'blocked', 1)),
])
def test_auto_resolves_per_platform(platform, dtype, want):
  config = model_config(dtype=dtype)
  kernels.resolve(config.model, platform)
  kernel_set, fused, unroll = want
  assert (config.model.kernels, config.model.attention_impl, config.model.scan_unroll) == (kernel_set, fused, unroll)
  again = config.model.to_dict()
  kernels.resolve(config.model, platform)  # idempotent: resolved values are explicit
  assert config.model.to_dict() == again


def test_explicit_choices_are_kept_and_bad_ones_refused():
  config = model_config(dtype='bfloat16', kernels='plain', attention_impl='dense', scan_unroll=1)
  kernels.resolve(config.model, 'cpu')
  assert (config.model.kernels, config.model.attention_impl, config.model.scan_unroll) == ('plain', 'dense', 1)
  config = model_config(attention_dtype='float32', dtype='bfloat16')  # float32 attention: no hand-written vjp
  kernels.resolve(config.model, 'cpu')
  assert config.model.attention_impl == 'blocked'
  with pytest.raises(UserError, match='model.kernels'):  # refused by the schema, before anything resolves
    validate(model_config(kernels='fpga'))
  with pytest.raises(UserError, match='model.attention_impl'):
    validate(model_config(attention_impl='flash2'))


@pytest.mark.parametrize('name, owner', [('splash', 'tpu'), ('flash', 'gpu')])
def test_a_missing_kernel_module_is_named(monkeypatch, name, owner):
  """Without kernels/<owner>.py (a trimmed install): auto falls back to blocked attention with a note, and an
  explicit fused attention is refused naming the file."""
  real = kernels.available
  monkeypatch.setattr(kernels, 'available', lambda n: n != owner and real(n))
  config = model_config(dtype='bfloat16')
  notes = kernels.resolve(config.model, owner)
  assert config.model.attention_impl == 'blocked' and notes and f'kernels/{owner}.py is absent' in notes[0]
  with pytest.raises(UserError, match=f'needs sktlm/model/kernels/{owner}.py'):
    kernels.resolve(model_config(attention_impl=name).model, 'cpu')


def test_resolve_platform_reads_the_mesh_devices():
  """train.resolve.platform takes the platform from the mesh's devices, not from the host's backend: a mesh of
  (fake) TPU devices resolves for TPU on this CPU host."""
  config = model_config(dtype='bfloat16')
  resolve.platform(config, sharding.make_mesh(config.mesh, jax.devices()[:2]))
  assert (config.model.kernels, config.model.attention_impl) == ('cpu', 'blocked_vjp')
  fake_tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform='tpu')] * 4).reshape(2, 2))
  config = model_config(dtype='bfloat16')
  resolve.platform(config, fake_tpu)
  assert config.model.kernels == 'tpu' and config.model.scan_unroll == 1


def test_build_takes_a_resolved_config_only():
  """Resolve once: build checks the choices were made (kernels, attention, unrolling, vocab) instead of making
  them again; after train.resolve the same config builds."""
  config = model_config(vocab_size=0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  with pytest.raises(UserError, match=r'^model.vocab_size is not resolved'):
    step.build(config, mesh)
  config.model.vocab_size = 384
  with pytest.raises(UserError, match=r'^model.kernels, model.attention_impl, model.scan_unroll not resolved'):
    step.build(config, mesh)
  resolve.resolve(config, mesh)
  assert (config.model.kernels, config.model.attention_impl, config.model.scan_unroll) == ('cpu', 'blocked', 2)
  step.build(config, mesh)


def test_resolved_kernels_land_in_config_json(data_dir, tmp_path):
  config = train_config(data_dir, **{'train.steps': 2, 'train.eval_batches': 0, 'model.dtype': 'bfloat16'})
  assert config.model.kernels == 'auto' and config.model.attention_impl == 'auto' and config.model.scan_unroll == 0
  assert loop.run(config, str(tmp_path)) == 0
  recorded = json.loads((tmp_path / 'config.json').read_text())['model']
  assert (recorded['kernels'], recorded['attention_impl'], recorded['scan_unroll']) == (
      'cpu', 'blocked_vjp', config.model.n_layers)

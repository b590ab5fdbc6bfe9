"""The fused accelerator attention kernels (model/kernels/tpu.py: Pallas splash; model/kernels/gpu.py: Pallas
flash with segment ids) in Pallas interpret mode on CPU, against the plain `dense` attention (itself checked
against float64 numpy in test_attention.py).

Packed rows put document boundaries inside kernel tiles, padding (segment 0) at a row's end, and a length
that is not a multiple of the tile (the kernels pad rows internally). Values and gradients (of a random
linear function of the output); float32 to 2e-6 of the largest magnitude; bfloat16 operands (float32
softmax and accumulation inside the kernels) to 3e-2 of it, against the float32 reference. MHA and GQA.
Negative control: the same comparison with segment ids dropped (one document per row) must fail by far.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sktlm import sharding
from sktlm.config import schema
from sktlm.model import attention, kernels
from sktlm.model.kernels import gpu, sharded, tpu
from sktlm.train import resolve, step

KERNELS = {
    # name: (module, T, block): splash tiles are multiples of 128 lanes, so its rows are longer
    'tpu': (tpu, 200, 128),   # 2 tiles of 128 after padding to 256
    'gpu': (gpu, 50, 16),     # 4 tiles of 16 after padding to 64
}
B, K = 2, 8


def segments(T):
  seg = np.ones((B, T), np.int32)
  seg[0, int(T * 0.3):] = 2   # boundaries inside tiles
  seg[0, int(T * 0.7):] = 3
  seg[1, int(T * 0.45):] = 2
  seg[1, int(T * 0.9):] = 0   # padding at the end of row 1
  return seg


def inputs(T, H, G, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, h, K)).astype(np.float32) for h in (H, G, G))
  return q * K**-0.5, k, v, rng.standard_normal((B, T, H, K)).astype(np.float32)


def value_and_grads(fn, q, k, v, seg, dout):
  def f(q, k, v):
    out = fn(q, k, v, seg)
    return jnp.vdot(out.astype(jnp.float32), dout), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


def dense(q, k, v, seg):
  return attention.dense(q, k, v, seg)


def kernel_fn(name):
  module, _, block = KERNELS[name]
  return lambda q, k, v, seg: module.causal_attention(q, k, v, seg, block=block, interpret=True)


def rel_errors(got, want):
  """Max |got - want| / max |want| for the output and each gradient."""
  return [float(np.abs(np.asarray(g, np.float32) - np.asarray(w)).max() / np.abs(np.asarray(w)).max())
          for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize('heads', [(4, 4), (4, 2)], ids=['mha', 'gqa'])
@pytest.mark.parametrize('name', ['tpu', 'gpu'])
def test_kernel_matches_dense_float32_and_bfloat16(name, heads):
  _, T, _ = KERNELS[name]
  q, k, v, dout = inputs(T, *heads)
  seg, dout = jnp.asarray(segments(T)), jnp.asarray(dout)
  want = value_and_grads(dense, q, k, v, seg, dout)

  got = value_and_grads(kernel_fn(name), q, k, v, seg, dout)
  assert all(x.dtype == jnp.float32 for x in got)
  assert max(rel_errors(got, want)) < 2e-6, rel_errors(got, want)

  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  got16 = value_and_grads(kernel_fn(name), q16, k16, v16, seg, dout)
  assert all(x.dtype == jnp.bfloat16 for x in got16)
  assert max(rel_errors(got16, want)) < 3e-2, rel_errors(got16, want)

  # Negative control: a kernel that ignored segment ids (attended across documents) fails by far.
  ignored = value_and_grads(kernel_fn(name), q, k, v, jnp.ones_like(seg), dout)
  assert min(rel_errors(ignored[:1], want[:1])) > 1e-1, rel_errors(ignored, want)


@pytest.mark.parametrize('name', ['tpu', 'gpu'])
def test_kernel_on_a_mesh_splits_rows_and_heads(name):
  """Under the model's mesh and rules the kernel runs per device on its rows and heads (shard_map) and gives the
  same values and gradients as dense attention on the whole batch."""
  _, T, _ = KERNELS[name]
  H, G = 4, 2
  q, k, v, dout = inputs(T, H, G, seed=1)
  seg, dout = jnp.asarray(segments(T)), jnp.asarray(dout)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, tensor=2), jax.devices()[:4])
  rules = (('batch', ('data', 'fsdp', 'expert')), ('act_heads', 'tensor'), ('act_kv_heads', 'tensor'))
  with nn.logical_axis_rules(rules):
    assert sharded.specs(mesh, B, H, G)[0] == jax.sharding.PartitionSpec('data', None, 'tensor', None)
    # one kv head cannot split over tensor=2: query heads stay whole too, or they would miss their kv head
    assert sharded.specs(mesh, B, H, 1)[:2] == (jax.sharding.PartitionSpec('data', None, None, None),) * 2

  def fn(q, k, v, seg):
    with sharding.activation_context(mesh, rules):  # as step.build traces the step
      return kernel_fn(name)(q, k, v, seg)
  # the step's inputs live on the mesh (as step.build's shardings put them); here replicated
  on_mesh = [jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
             for x in (q, k, v, seg, dout)]
  got = value_and_grads(fn, *on_mesh)
  hlo = jax.jit(fn).lower(*on_mesh[:4]).as_text()
  assert 'shard_map' in hlo or 'sdy.manual_computation' in hlo
  want = value_and_grads(dense, q, k, v, seg, dout)
  assert max(rel_errors(got, want)) < 2e-6, rel_errors(got, want)


def test_tile_sizes():
  assert [tpu.tile_size(b, 4096) for b in (0, 64, 128, 200, 512)] == [128, 128, 128, 256, 512]
  assert tpu.tile_size(512, 200) == 256  # at most the padded row
  assert [gpu.tile_size(b, 4096) for b in (0, 8, 64, 100, 512)] == [128, 16, 64, 128, 128]
  assert gpu.tile_size(64, 50) == 64


@pytest.mark.parametrize('name', ['tpu', pytest.param('gpu', marks=pytest.mark.slow)])
def test_model_kernels_setting_reaches_the_fused_kernel(name, monkeypatch):
  """`model.kernels=tpu|gpu` resolves (train.build) to splash | flash, the real train step on a 4-device mesh
  (rows over data, heads over tensor) calls the Pallas kernel, and loss and gradient norm equal the plain
  kernels'. On CPU the kernel runs in Pallas' interpreter: the same function with interpret=True."""
  module = KERNELS[name][0]
  monkeypatch.setattr(module, 'causal_attention', functools.partial(module.causal_attention, interpret=True))
  kernels._ops.cache_clear()  # the registry caches looked-up functions; look the patched one up

  def run_step(kernel_set):
    config = schema.get_config('pico')
    config.model.update(dict(vocab_size=384, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, attention_block=16,
                             kernels=kernel_set))
    config.data.seq_len, config.train.batch_size = 64, 4
    config.mesh.update(dict(data=2, fsdp=1, expert=1, tensor=2))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    resolve.resolve(config, mesh)
    setup = step.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    seg = segments(64)
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, 259, (4, 65)).astype(np.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.concatenate([seg, seg[::-1]]),
             'positions': np.tile(np.arange(64, dtype=np.int32), (4, 1)), 'weights': np.ones((4, 64), np.float32)}
    batch = step.device_batch(batch, setup, 4)
    jaxpr = str(setup.train_step.trace(state, batch).jaxpr)
    _, metrics = setup.train_step(state, batch)
    return setup.config.model, jaxpr, {k: float(metrics[k]) for k in ('loss', 'grad_norm')}

  try:
    fused_cfg, fused_jaxpr, fused = run_step(name)
    plain_cfg, plain_jaxpr, plain = run_step('plain')
  finally:
    kernels._ops.cache_clear()
  assert fused_cfg.attention_impl == kernels.FUSED_ATTENTION[name] and plain_cfg.attention_impl == 'blocked'
  assert 'pallas_call' in fused_jaxpr and 'pallas_call' not in plain_jaxpr
  for k in plain:
    assert fused[k] == pytest.approx(plain[k], rel=1e-5), (k, fused, plain)

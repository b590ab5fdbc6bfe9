"""Context parallelism (sktlm/model/context.py): a `context` mesh axis splits every sequence over 4 of the 8 simulated
devices; losses and gradients equal the unsharded model's, for GQA and MLA, with packed rows."""

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from test_mla import MLA
from test_model import make_batch

from sktlm import sharding
from sktlm.config import load
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.model import transformer as model
from sktlm.train import resolve, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(attention, **over):
  base = {'model.vocab_size': 384, 'model.n_layers': 1, 'model.d_model': 32, 'model.n_heads': 4,
          'model.n_kv_heads': 2, 'model.d_ff': 48, 'data.seq_len': 16, 'model.z_loss': 1e-4,
          'model.attention_impl': 'blocked', 'model.attention_block': 2, **(MLA if attention == 'mla' else {})}
  base.update(over)
  return load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=pico'), base)


def loss_and_grads(config, mesh, params, batch):
  """The train loss and its gradients, traced under `mesh` and the logical rules as step.build does."""
  rules = sharding.logical_rules(config)
  m = model.make_model(config.model)
  grad_fn = jax.value_and_grad(step.make_loss_fn(config, m), has_aux=True)

  def fn(p, b):
    with sharding.activation_context(mesh, rules):
      return grad_fn(p, b, float(batch['weights'].sum()))

  b = {k: jax.device_put(v, sharding.batch_sharding(mesh, rules)) for k, v in batch.items()}
  jitted = jax.jit(fn)
  (loss, _), grads = jitted(params, b)
  return float(loss), grads, jitted.lower(params, b).as_text()


# mla_moe: a dense then a dropless MoE layer, whose feed-forward runs on each shard's tokens (in_token_groups).
MOE = {'model.n_layers': 2, 'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
       'model.moe.n_dense_layers': 1, 'model.moe.capacity_factor': 0.0}


@pytest.mark.parametrize('attention', ['gqa', 'mla', pytest.param('mla_moe', marks=pytest.mark.slow)])
def test_context_parallel_equals_unsharded(attention):
  config = config_for(attention.removesuffix('_moe'), **(MOE if attention.endswith('_moe') else {}))
  m = model.make_model(config.model)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), np.zeros((1, 16), np.int32))['params'])
  batch = make_batch()  # row 0 packs two documents; the boundary (row 9) lies in context shard 2 of 4
  one = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  ref_loss, ref_grads, _ = loss_and_grads(config, one, params, batch)
  config.mesh.update(dict(data=2, context=4))
  mesh = sharding.make_mesh(config.mesh)
  loss, grads, hlo = loss_and_grads(config, mesh, params, batch)
  assert 'all_gather' in hlo or 'all-gather' in hlo  # keys (GQA) or latents (MLA) really cross shards
  assert abs(loss - ref_loss) < 1e-6 * ref_loss
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_context_parallel_training_matches_and_shards_the_sequence():
  """Train steps through train.build: inputs split along the sequence, same losses as one device."""
  config = config_for('mla', **{'train.batch_size': 4, 'optim.warmup_steps': 1, 'optim.peak_lr': 1e-2})
  batch = {k: np.concatenate([v] * 2) for k, v in make_batch().items()}

  def losses(mesh):
    resolve.resolve(config, mesh)
    setup = step.build(config, mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    b = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
    out = []
    for _ in range(3):
      state, met = setup.train_step(state, b)
      out.append(float(met['loss']))
    return np.array(out), b

  ref, _ = losses(sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
  config.mesh.update(dict(data=-1, fsdp=2, context=4))
  got, b = losses(sharding.make_mesh(config.mesh))
  assert b['inputs'].sharding.shard_shape(b['inputs'].shape) == (2, 4)  # batch over fsdp, length over context
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  assert got[-1] < got[0]


def test_sequence_must_divide_the_context_axis():
  """data.seq_len: one line from validate, before anything is built; a traced length the config does not fix
  (decode's) is refused by the model."""
  config = config_for('gqa', **{'data.seq_len': 18, 'mesh.data': 2, 'mesh.context': 4})
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(UserError, match=r'^data.seq_len=18 does not divide the context mesh axis \(4 devices\)$'):
    validate(config, mesh)
  resolve.resolve(config, mesh)
  with pytest.raises(UserError, match='sequence length 18 does not divide the context mesh axis'):
    step.build(config, mesh).init_state(jax.random.PRNGKey(0))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason="libtpu absent (pip install 'jax[tpu]==0.10.2')")
def test_reduced_flagship_with_context_axis_compiles_for_v5p():
  """The flagship's context-parallel path (MLA latents gathered over context=2) compiles for a v5p topology."""
  from sktlm.plan import planner
  config = load.load_config(os.path.join(
      ROOT, 'experiments/flagship.py:layers=2,experts=8,top_k=2,fsdp=1,expert=2,context=2,batch=2,seq_len=2048,'
      'block=128'))
  target = planner.get_target('v5p:2x2x1')
  rep = planner.plan(config, target)
  assert rep['mesh']['context'] == 2 and rep['fits']
  assert rep['traced_flops_per_device'] == pytest.approx(rep['analytic_flops_per_device'], rel=0.25)

"""MoE inside the model and the training spine: same losses with an expert mesh axis, and it learns."""

import json

import jax
import numpy as np
import pytest
from conftest import run_steps, train_config

from sktlm import data, sharding
from sktlm.config import accounting
from sktlm.train import loop, resolve, step

MOE = {'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
       'model.moe.n_dense_layers': 1, 'model.moe.expert_d_ff': 96}


def cfg(data_dir, **over):
  return train_config(data_dir, **{**MOE, **over})


@pytest.mark.parametrize('cf, ep_buffer', [(1.0, 0.0), (0.0, 0.0), (0.0, 0.5)])
def test_same_losses_on_one_device_and_with_expert_axis(data_dir, cf, ep_buffer):
  """cf 0 runs dropless_ep on the expert axis; ep_buffer 0.5 (half the balanced load) overflows its first
  exchange, and the second one keeps it dropless."""
  config = cfg(data_dir, **{'optim.peak_lr': 1e-2, 'model.moe.capacity_factor': cf,
                            'model.moe.ep_buffer_factor': ep_buffer})
  resolve.vocab(config, data.get_tokenizer(config.data))
  one = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  ref, _, _ = run_steps(config, one, 3)
  config.mesh.update(dict(data=2, fsdp=1, expert=4, tensor=1))
  got, state, _ = run_steps(config, sharding.make_mesh(config.mesh), 3)
  for key in ('loss', 'moe_aux_loss', 'moe_z_loss', 'moe_dropped_frac', 'moe_expert_load'):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=5e-5, atol=1e-6, err_msg=key)
  wi = state.params['moe_layers']['moe']['wi_gate']  # [layers, E, D, F]: experts split over 'expert'
  assert wi.sharding.shard_shape(wi.shape)[1] == 1
  if cf > 0:
    assert 0 <= float(got[0]['moe_dropped_frac']) < 0.5
  else:
    assert float(got[0]['moe_dropped_frac']) == 0
    assert (float(got[0]['moe_ep_overflow_frac']) > 0) == (ep_buffer > 0)


def test_param_count_matches_accounting(data_dir):
  config = cfg(data_dir)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  resolve.resolve(config, mesh, data.get_tokenizer(config.data))
  setup = step.build(config, mesh)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  assert n == accounting.param_counts(config.model)['total']


def test_small_moe_loss_falls_and_logs_routing(data_dir, tmp_path):
  config = cfg(data_dir, **{'train.steps': 60, 'optim.peak_lr': 3e-3, 'model.moe.capacity_factor': 1.25})
  assert loop.run(config, str(tmp_path)) == 0
  recs = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  tr = [r for r in recs if r['kind'] == 'train']
  assert tr[0]['loss'] > 5.0 and tr[-1]['loss'] < tr[0]['loss'] - 1.5, [r['loss'] for r in tr]
  last = tr[-1]
  assert len(last['moe_expert_load']) == 4 and abs(sum(last['moe_expert_load']) - 1) < 1e-5
  assert 0 <= last['moe_dropped_frac'] < 0.5
  assert 1.0 <= last['moe_aux_loss'] < 2.0  # 1 at perfect balance, E at full collapse
  assert np.isfinite(last['moe_z_loss'])

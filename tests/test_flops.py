"""FLOP conventions of sktlm/config/accounting.py against the matmuls of the traced train step (an independent count).

`executed` must equal the dot_general FLOPs of the jaxpr that training runs (scan bodies x length, remat
recompute included) for each kernel choice; `exact` (model FLOPs) must not depend on the kernel.
"""

import os

import pytest

from sktlm.config import accounting, load
from sktlm.model.kernels import cpu
from sktlm.plan import planner
from sktlm.train import resolve, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 2, 128


def _config(**overrides):
  base = {'model.vocab_size': 256, 'train.batch_size': B, 'data.seq_len': T, 'model.attention_block': 32,
          'mesh.data': 1, 'mesh.fsdp': 1}
  base.update(overrides)
  return load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=pico'), base)


def _traced_per_token(config) -> float:
  mesh = planner.make_mesh(config, planner.get_target('cpu:1'))
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  traced = setup.train_step.trace(setup.abstract_state, step.abstract_batch(config, setup))
  return planner.jaxpr_matmul_flops(traced.jaxpr.jaxpr) / (B * T)


CASES = [
    {'model.attention_impl': 'blocked'},
    {'model.attention_impl': 'dense'},
    {'model.attention_impl': 'blocked', 'model.remat': 'full'},
    {'model.attention_impl': 'blocked', 'model.remat': 'dots_no_batch'},
    {'model.attention_impl': 'blocked', 'model.remat': 'dots'},
]


@pytest.mark.parametrize('overrides', [{'model.kernels': 'cpu', **c} for c in CASES] + [
    {'model.kernels': 'cpu', 'model.attention_impl': 'blocked_vjp', 'model.dtype': 'bfloat16'},
    {'model.kernels': 'cpu', 'model.vocab_size': 4096},   # above the one-hot limit: a gather
    {'model.kernels': 'cpu', 'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
     'model.moe.capacity_factor': 1.25, 'model.attention_impl': 'dense', 'model.remat': 'full'},  # E C / T = 2.5
] + [{'model.kernels': 'plain', **c} for c in CASES])
def test_executed_equals_traced_matmuls(overrides):
  config = _config(**overrides)
  fpt = accounting.flops_per_token(config.model, T)
  traced = _traced_per_token(config)
  assert traced == pytest.approx(fpt['executed'], rel=1e-9), (traced, fpt)
  # Model FLOPs do not depend on the kernels: the same model with dense attention and no remat.
  plain = _config(**{**overrides, 'model.attention_impl': 'dense', 'model.remat': 'none', 'model.kernels': 'plain'})
  assert fpt['exact'] == accounting.flops_per_token(plain.model, T)['exact']


def test_blocked_attention_fraction_and_model_constant():
  mc = _config().model
  assert accounting.attention_fraction(mc, 128) == pytest.approx((1 + 32 / 128) / 2)  # block divides T
  assert accounting.attention_fraction(mc, 100) == pytest.approx((32 * 32 + 32 * 64 + 32 * 96 + 4 * 100) / 100 ** 2)
  with mc.unlocked():
    mc.attention_impl = 'dense'
  assert accounting.attention_fraction(mc, 128) == 1.0
  # The one-hot threshold is stated in both places; they must agree.
  assert accounting.ONE_HOT_EMBED_MAX_VOCAB == cpu.ONE_HOT_EMBED_MAX_VOCAB

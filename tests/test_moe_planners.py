"""MoE planners and records: settings, active parameters, active FLOPs per token and steps against closed
forms written out here (not sktlm.config.accounting), and the MoE fields of summary.json / results.csv."""

import math

import pytest

from sktlm import run_row
from sktlm.config import schema
from sktlm.errors import UserError
from sktlm.scaling import io
from sktlm.sweep import moe_planners
from sktlm.sweep.schedule import vocab_size
from sktlm.sweep.spec import load_run_config
from sktlm.train import loop
from sktlm.train.metrics import RunStats

BASE = 'experiments/lm.py'
COMMON = {'config.data.seq_len': 64, 'config.train.batch_size': 4}
T, B, V = 64, 4, 384   # byte vocabulary 259 padded to 384, untied head
MICRO = dict(L=4, d=128, d_ff=384)


def _closed_form(e, g, shared, top_k, s=MICRO):
  """(active non-embedding N, total non-embedding N, exact FLOPs per token) of micro with E x G experts of width
  d_ff / G, top_k x G - shared routed and `shared` shared; E = 1: dense."""
  L, d, d_ff = s['L'], s['d'], s['d_ff']
  attn, norms = 4 * d * d, 2 * d
  if e == 1 and g == 1 and shared == 0:
    mlp_act = mlp_tot = 3 * d * d_ff
  else:
    eff, n_exp, k = d_ff // g, e * g, top_k * g - shared
    mlp_act = 3 * d * eff * (k + shared) + d * n_exp
    mlp_tot = 3 * d * eff * (n_exp + shared) + d * n_exp
  n_act = L * (attn + norms + mlp_act) + d
  n_tot = L * (attn + norms + mlp_tot) + d
  fpt = 6 * (L * (attn + mlp_act) + V * d) + 12 * L * d * T   # exact: 6N + full T x T attention
  return n_act, n_tot, fpt


def test_moe_settings_granularity_and_shared():
  s = moe_planners.moe_settings(BASE, 'micro', 8, 2, 1, 1, COMMON)
  assert s == {'config.model.moe.num_experts': 16, 'config.model.moe.top_k': 1, 'config.model.moe.expert_d_ff': 192,
               'config.model.moe.num_shared_experts': 1, 'config.model.moe.renormalize': False}  # one routed slot
  assert 'config.model.moe.renormalize' not in moe_planners.moe_settings(BASE, 'micro', 8, 2, 0, 1, COMMON)
  assert moe_planners.moe_settings(BASE, 'micro', 1) == {'config.model.moe.num_experts': 0}
  with pytest.raises(UserError, match='shared expert'):
    moe_planners.moe_settings(BASE, 'micro', 8, 1, 1, 1, COMMON)   # top-1 leaves no slot for a shared expert
  with pytest.raises(UserError, match='does not divide'):
    moe_planners.moe_settings(BASE, 'micro', 8, 5, 0, 1, COMMON)


@pytest.mark.parametrize('e,g,shared', [(1, 1, 0), (4, 1, 0), (8, 1, 0), (8, 4, 0), (4, 2, 1)])
def test_ladder_counts_and_steps_match_closed_form(e, g, shared):
  runs = moe_planners.moe_ladder(BASE, ['micro'], experts=[e], granularity=[g], shared=[shared],
                                 tokens_per_param=3.0, param_kind='non_embedding', common=COMMON)
  (run,) = runs
  n_act, n_tot, fpt = _closed_form(e, g, shared, 1)
  dense_n = _closed_form(1, 1, 0, 1)[1]
  assert run.settings['config.train.steps'] == math.ceil(3.0 * dense_n / (B * T))   # the dense size's tokens
  config = load_run_config(BASE, {**run.common, **run.settings})
  from sktlm.config import accounting
  config.model.vocab_size = vocab_size(config)
  counts = accounting.param_counts(config.model)
  assert (counts['active_non_embedding'], counts['non_embedding']) == (n_act, n_tot)
  assert accounting.flops_per_token(config.model, T)['exact'] == fpt
  assert run.name == f'size-micro_E-{e}' + (f'_G-{g}' if g > 1 else '') + (f'_S-{shared}' if shared else '')


def test_ladder_same_tokens_for_every_expert_count_and_lr_grid_at_smallest_size():
  runs = moe_planners.moe_ladder(BASE, ['pico', 'micro'], experts=[1, 4, 8], tokens_per_param=1.0,
                                 param_kind='non_embedding', common=COMMON, lr_grid={8: [1e-3, 3e-3]})
  steps = {r.name: r.settings['config.train.steps'] for r in runs}
  assert len({v for k, v in steps.items() if 'micro' in k}) == 1
  assert sorted(k for k in steps if '_lr-' in k) == ['size-pico_E-8_lr-0.001', 'size-pico_E-8_lr-0.003']
  with pytest.raises(UserError, match='lr_grid'):
    moe_planners.moe_ladder(BASE, ['pico'], experts=[1, 4], lr_grid={16: [1e-3]}, common=COMMON)


def test_isoflop_steps_from_active_flops_per_token():
  c = 3e12
  runs = moe_planners.moe_isoflop(BASE, [c], size_names=['pico', 'nano', 'micro'], experts=[1, 8], per_budget=3,
                                  tokens_per_param=2.0, common=COMMON, min_steps=5)
  micro = {r.name: r for r in runs if 'micro' in r.name}
  for e in (1, 8):
    r = micro[f'C-{c:.3g}_size-micro_E-{e}']
    assert r.settings['config.train.steps'] == round(c / (_closed_form(e, 1, 0, 1)[2] * B * T))
    assert r.planned['params'] == _closed_form(e, 1, 0, 1)[0]


def test_summary_and_results_carry_the_moe_shape_and_dropped_fraction(tmp_path):
  mc = schema.get_config('micro').model
  assert loop.moe_shape(mc) == dict(experts=1, top_k=1, granularity=1.0, shared_experts=0)
  mc.moe.num_experts, mc.moe.top_k, mc.moe.expert_d_ff, mc.moe.num_shared_experts = 32, 3, 96, 1
  shape = loop.moe_shape(mc)
  assert shape == dict(experts=32, top_k=3, granularity=4.0, shared_experts=1)
  stats = RunStats(tokens_per_step=256, fpt={'exact': 1.0, '6N': 1.0}, peak=1.0, history=[], start_step=0)
  for step, frac in ((1, 0.1), (2, 0.3)):
    stats.observe(step, {'loss': 2.0, 'lr': 1e-3, 'grad_norm': 1.0, 'moe_dropped_frac': frac})
    stats.train_record(step)
  s = {**stats.summary(2), 'moe': shape, 'status': 'done'}
  assert s['moe_dropped_frac'] == pytest.approx(0.2)
  cols = run_row.moe_columns(s)
  assert cols == dict(moe_experts=32, moe_top_k=3, moe_granularity=4.0, moe_shared_experts=1, moe_dropped_frac=0.2)
  import json
  (tmp_path / 'summary.json').write_text(json.dumps(s))
  row = io.row_from_workdir(str(tmp_path))
  assert (row['moe_experts'], row['moe_top_k'], row['moe_granularity'], row['moe_dropped_frac']) == (32, 3, 4, 0.2)

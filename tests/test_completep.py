"""CompleteP / depth-muP (sktlm/model/mup.py): every rule of the table against its closed form, written out here
from the paper's Table 1 (not from mup.py), with a mutation for each rule that the check must catch; at
m_N = m_L = 1 the four parametrisations train bit-identically; the validator's rules."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps, train_config

from sktlm import sharding
from sktlm.config import validate
from sktlm.errors import UserError
from sktlm.model import mup
from sktlm.model import transformer as model_lib
from sktlm.tools import coord_check
from sktlm.train import optim

BASE_WIDTH, BASE_DEPTH = 32, 1
WIDTH, DEPTH = 64, 4            # m_N = 2, m_L = 4
SIGMA, LR, WD, EPS = 0.02, 1e-2, 0.1, 1e-3


def config_of(data_dir, parametrization, **over):
  return train_config(data_dir, **{'model.vocab_size': 256, 'model.d_model': WIDTH, 'model.d_ff': 2 * WIDTH,
                                   'model.n_heads': 4, 'model.n_kv_heads': 4, 'model.n_layers': DEPTH,
                                   'model.parametrization': parametrization, 'model.base_width': BASE_WIDTH,
                                   'model.base_depth': BASE_DEPTH, 'model.init_std': SIGMA,
                                   'optim.peak_lr': LR, 'optim.weight_decay': WD, 'optim.eps': EPS,
                                   'optim.warmup_steps': 0, 'optim.schedule': 'constant', 'optim.clip_norm': 0.0,
                                   'model.scan_layers': False, **over})  # unscanned: eager, nothing to compile


def table(alpha: float) -> dict:
  """Dey et al. 2025, Table 1, at m_N = 2, m_L = 4 (module doc of mup.py for the decay and epsilon forms)."""
  mn, ml = WIDTH / BASE_WIDTH, DEPTH / BASE_DEPTH
  head_dim = WIDTH // 4
  return dict(
      residual=ml**-alpha,
      init={'embedding': SIGMA, 'head': SIGMA, 'wq': SIGMA / math.sqrt(mn),
            'wo': SIGMA / math.sqrt(mn * 2 * BASE_DEPTH)},
      lr={'embedding': 1.0, 'head': 1.0, 'final_norm': 1.0, 'hidden': ml**(alpha - 1) / mn, 'norm': ml**(alpha - 1)},
      eps={'embedding': 1 / mn, 'head': 1 / mn, 'final_norm': 1 / mn, 'hidden': ml**-alpha / mn,
           'norm': ml**-alpha / mn},
      decay={'embedding': 1.0, 'head': 1.0, 'hidden': ml**(alpha - 1)},  # x schedule x wd; norms: none
      logits=1 / mn,
      attention=1 / head_dim * math.sqrt(head_dim / mn),  # 1/d_head, sqrt(d_head at base width) in front
  )


def init(config):
  model = model_lib.make_model(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params']
  return nn.meta.unbox(params), model


def failures(data_dir, parametrization: str, alpha: float) -> list[str]:
  """Every quantity the table fixes, measured on a real model and optimizer, against table(alpha)."""
  config = config_of(data_dir, parametrization)
  want = table(alpha)
  params, model = init(config)
  bad = []
  # init std (measured)
  for name, node in (('embedding', params['embedding']), ('head', params['head']),
                     ('wq', params['layers_0']['attn']['wq']), ('wo', params['layers_0']['mlp']['wo'])):
    if abs(np.std(np.asarray(node)) / want['init'][name] - 1) > 0.05:
      bad.append(f'init {name}: {np.std(np.asarray(node)):.4g} != {want["init"][name]:.4g}')
  # forward: the model = an SP model whose weights carry the table's multipliers (residual, logits, attention)
  sp = config_of(data_dir, 'sp')
  folded = jax.tree.map(lambda x: x, params)
  folded['head'] = params['head'] * want['logits']
  for i in range(DEPTH):
    layer, folded_layer = params[f'layers_{i}'], folded[f'layers_{i}']
    folded_layer['attn']['wq'] = layer['attn']['wq'] * (want['attention'] / (WIDTH // 4)**-0.5)
    for branch in ('attn', 'mlp'):
      folded_layer[branch]['wo'] = layer[branch]['wo'] * want['residual']
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 256)
  got, _ = model.apply({'params': params}, tokens)
  ref, _ = model_lib.make_model(sp.model).apply({'params': folded}, tokens)
  err = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))
  if err > 1e-5:
    bad.append(f'forward differs from SP with the table folded in by {err:.3g}')
  exported = mup.to_sp_params(params, config.model)  # the export path folds the same multipliers
  if not all(np.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(folded),
                                                                    strict=True)):
    bad.append('mup.to_sp_params folds differently from the table')
  # one optimizer step: -lr (lr_c g / (|g| + eps_c) + wd_c p), Adam's bias-corrected first step, with gradients
  # of the size of eps so that every epsilon shows
  tx, _ = optim.make_optimizer(config.optim, 10, config.model)
  grads = jax.tree.map(lambda p: EPS * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  upd, _ = tx.update(grads, tx.init(params), params)
  cls_of = {'embedding': 'embedding', 'head': 'head', 'final_norm/scale': 'final_norm',
            'layers_0/attn/wq': 'hidden', 'layers_3/mlp/wo': 'hidden', 'layers_1/attn_norm/scale': 'norm'}
  for path, cls in cls_of.items():
    u, g, p = (np.asarray(_at(t, path), np.float64) for t in (upd, grads, params))
    decay = want['decay'].get(cls, 0.0)
    expect = -LR * (want['lr'][cls] * g / (np.abs(g) + EPS * want['eps'][cls]) + WD * decay * p)
    if not np.allclose(u, expect, rtol=1e-4, atol=1e-9):
      bad.append(f'optimizer step {path} ({cls}): max error {np.max(np.abs(u - expect)):.3g}')
  return bad


def _at(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _wrap(name, f):
  orig = getattr(mup, name)
  return name, lambda mc, *a: f(orig, mc, *a)


def _classes(**change):
  """A mutant of a per-class multiplier table: `change` maps a class to a function of (mc, value)."""
  return lambda orig, mc: {k: change[k](mc, v) if k in change else v for k, v in orig(mc).items()}


def _dm(mc, power):
  return (mc.n_layers / mc.base_depth) ** power


# Each drops one rule of the table (or puts SP's in its place).
MUTATIONS = {
    'residual branch multiplier': _wrap('residual_multiplier', lambda orig, mc: 1.0),
    'hidden init 1/m_N': _wrap('init_std', lambda orig, mc, kind='hidden', sbd=False:
                               orig(mc, kind, sbd) * (math.sqrt(mc.d_model / mc.base_width) if kind == 'hidden'
                                                      else 1.0)),
    'init without depth dependence': _wrap('init_std', lambda orig, mc, kind='hidden', sbd=False:
                                           orig(mc, kind, sbd) * (math.sqrt(mc.base_depth / mc.n_layers) if sbd
                                                                  else 1.0)),
    'hidden LR 1/m_N': _wrap('lr_multipliers', _classes(hidden=lambda mc, v: v * mc.d_model / mc.base_width)),
    'hidden LR m_L^(alpha-1)': _wrap('lr_multipliers', _classes(
        hidden=lambda mc, v: v / _dm(mc, mup.depth_alpha(mc) - 1))),
    'pre-LN gain LR m_L^(alpha-1)': _wrap('lr_multipliers', _classes(
        norm=lambda mc, v: v / _dm(mc, mup.depth_alpha(mc) - 1))),
    'hidden weight decay (lambda m_N, coupled)': _wrap('decay_multipliers', _classes(hidden=lambda mc, v: 1.0)),
    'in-block eps m_N^-1 m_L^-alpha': _wrap('eps_multipliers', _classes(
        hidden=lambda mc, v: 1.0, norm=lambda mc, v: 1.0)),
    'embedding/head eps m_N^-1': _wrap('eps_multipliers', _classes(
        embedding=lambda mc, v: 1.0, head=lambda mc, v: 1.0, final_norm=lambda mc, v: 1.0)),
    'embedding/head/final norm LR unchanged': _wrap('lr_multipliers', _classes(
        final_norm=lambda mc, v: _dm(mc, mup.depth_alpha(mc) - 1))),
    'logits 1/m_N': _wrap('logit_multiplier', lambda orig, mc: 1.0),
    'attention 1/d_head': _wrap('attention_scale', lambda orig, mc, k: k**-0.5),
}


@pytest.mark.parametrize('parametrization, alpha', [('completep', 1.0), ('depth_mup', 0.5)])
def test_every_rule_of_the_table(data_dir, parametrization, alpha):
  assert failures(data_dir, parametrization, alpha) == []


@pytest.mark.parametrize('mutation', list(MUTATIONS))
def test_dropping_any_rule_fails_the_check(data_dir, mutation, monkeypatch):
  """Depth-muP (alpha 0.5) shows every rule (under CompleteP the depth LR factor m_L^0 is 1); the residual and
  init mutations are checked under CompleteP too."""
  name, fn = MUTATIONS[mutation]
  monkeypatch.setattr(mup, name, fn)
  assert failures(data_dir, 'depth_mup', 0.5), f'{mutation}: the check did not notice'
  if name in ('residual_multiplier', 'init_std'):
    assert failures(data_dir, 'completep', 1.0), f'{mutation} under completep: the check did not notice'


def test_identical_runs_at_base_size(data_dir):
  """At d_model = base_width and n_layers = base_depth, sp / mup / completep / depth_mup are one function with
  one optimiser: 3 real train steps (data pipeline, jitted step, clipping, warmup) give bit-identical params."""
  mesh = sharding.make_mesh(train_config(data_dir).mesh, devices=jax.devices()[:1])
  over = {'model.base_width': 64, 'model.base_depth': 2, 'optim.eps': 1e-3, 'optim.clip_norm': 0.5}
  runs = {}
  for p in ('sp', 'mup', 'completep', 'depth_mup'):
    config = train_config(data_dir, **{'model.vocab_size': 384, 'model.parametrization': p, **over})
    assert (config.model.d_model, config.model.n_layers) == (64, 2)  # pico: the base size
    metrics, state, _ = run_steps(config, mesh, 3)
    runs[p] = ([float(m['loss']) for m in metrics], jax.tree.leaves(nn.meta.unbox(state.params)))
  losses, leaves = runs['sp']
  assert losses[-1] < losses[0]
  for p in ('mup', 'completep', 'depth_mup'):
    assert runs[p][0] == losses, p
    for a, b in zip(runs[p][1], leaves, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


FLAGSHIP_LIKE = {'model.attention': 'mla', 'model.mla.q_lora_rank': 16, 'model.mla.kv_lora_rank': 8,
                 'model.mla.qk_nope_head_dim': 6, 'model.mla.qk_rope_head_dim': 4, 'model.mla.v_head_dim': 6,
                 'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
                 'model.moe.n_dense_layers': 1, 'model.moe.expert_d_ff': 96, 'model.moe.gate': 'sigmoid',
                 'model.moe.balance': 'aux_free', 'model.n_layers': 3, 'model.vocab_size': 384}


def test_flagship_parameter_groups(data_dir):
  """The flagship's groups (docs/scaling.md's table), on its real parameter tree (abstract: nothing allocated):
  MLA projections, dense and routed experts and the shared expert are hidden weights, the router keeps muP's
  readout-like rule, latent and pre-LN norms are in-block gains, final norm / embedding / head are outside."""
  from sktlm.config import load
  config = load.load_config('experiments/flagship.py:layers=3,experts=8', {})
  with config.unlocked():
    config.model.update(parametrization='completep', base_width=1792, base_depth=1)  # m_N = 4, m_L = 3
  model = model_lib.make_model(config.model)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                                                ['params']))
  labels = {'/'.join(str(k.key) for k in path): c
            for path, c in jax.tree_util.tree_flatten_with_path(mup.param_labels(shapes))[0]}
  want = {'hidden': [f'{g}/attn/{w}' for g in ('dense_layers', 'moe_layers')
                     for w in ('wq_a', 'wq_b', 'wkv_a', 'wk_rope', 'wk_b', 'wv_b', 'wo')]
          + [f'dense_layers/mlp/{w}' for w in ('wi_gate', 'wi_up', 'wo')]
          + [f'moe_layers/moe/{w}' for w in ('wi_gate', 'wi_up', 'wo', 'shared/wi_gate', 'shared/wi_up', 'shared/wo')],
          'norm': [f'{g}/{n}/scale' for g in ('dense_layers', 'moe_layers')
                   for n in ('attn/q_norm', 'attn/kv_norm', 'attn_norm', 'mlp_norm')],
          'router': ['moe_layers/moe/router'], 'embedding': ['embedding'], 'head': ['head'],
          'final_norm': ['final_norm/scale']}
  assert sorted(labels) == sorted(n for names in want.values() for n in names)
  for cls, names in want.items():
    assert {labels[n] for n in names} == {cls}, cls
  assert mup.lr_multipliers(config.model) == dict(embedding=1.0, hidden=0.25, head=1.0, norm=1.0, final_norm=1.0,
                                                  router=0.25)  # alpha 1: no depth LR factor
  assert mup.eps_multipliers(config.model)['router'] == pytest.approx(1 / 12)  # in-block: m_N^-1 m_L^-1
  assert mup.residual_multiplier(config.model) == pytest.approx(1 / 3)


@pytest.mark.slow  # ~1.5 min of CPU (three MLA + MoE compiles); the rules are covered by the tests above
def test_flagship_shape_on_an_expert_mesh(data_dir):
  """MLA + MoE (the flagship's routing) on an expert mesh: at the base size completep trains exactly as sp
  (MLA projections, experts, shared expert, router, latent norms: every class at multiplier 1, the optimizer
  state sharded like the params); at m_L = 3 it trains (finite, falling loss)."""
  mesh_over = {'mesh.data': 1, 'mesh.expert': 2}
  runs = {}
  for p in ('sp', 'completep'):
    config = train_config(data_dir, **{**FLAGSHIP_LIKE, **mesh_over, 'model.parametrization': p,
                                       'model.base_width': 64, 'model.base_depth': 3})
    metrics, state, _ = run_steps(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:2]), 2)
    runs[p] = ([float(m['loss']) for m in metrics], jax.tree.leaves(nn.meta.unbox(state.params)))
  assert runs['completep'][0] == runs['sp'][0]
  for a, b in zip(runs['completep'][1], runs['sp'][1], strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  deep = train_config(data_dir, **{**FLAGSHIP_LIKE, **mesh_over, 'model.parametrization': 'completep',
                                   'model.base_width': 64, 'model.base_depth': 1, 'optim.warmup_steps': 1})
  metrics, _, _ = run_steps(deep, sharding.make_mesh(deep.mesh, devices=jax.devices()[:2]), 2)
  losses = [float(m['loss']) for m in metrics]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_validator_rules(data_dir):
  with pytest.raises(UserError, match='base_depth > 0'):
    validate.validate(config_of(data_dir, 'completep', **{'model.base_depth': 0}))
  with pytest.raises(UserError, match='base_width > 0'):
    validate.validate(config_of(data_dir, 'depth_mup', **{'model.base_width': 0}))


def test_sweep_refuses_depth_change_under_mup(data_dir):
  """The rule across a sweep's runs (sweep dry run and run): one line naming the depths and their runs."""
  models = {f'size-{n}': config_of(data_dir, 'mup', **{'model.n_layers': n}).model for n in (2, 4)}
  with pytest.raises(UserError, match=r"n_layers 2 \(size-2\), 4 \(size-4\); use 'completep'") as e:
    validate.across_runs(models)
  assert '\n' not in str(e.value)
  for m in models.values():
    with m.unlocked():
      m.allow_depth_change = True
  validate.across_runs(models)
  validate.across_runs({f'size-{n}': config_of(data_dir, 'completep', **{'model.n_layers': n}).model
                        for n in (2, 4)})


def test_depth_coord_check(data_dir, monkeypatch):
  """CompleteP: the residual stream and its update since init are depth-flat (2 vs 8 layers, 3 Adam steps);
  mutation: dropping the residual branch multiplier m_L^-1 makes them grow with depth, and the check fails."""
  config = train_config(data_dir, **{'data.seq_len': 32, 'train.batch_size': 8, 'model.d_model': 32,
                                     'model.d_ff': 96, 'model.n_heads': 2, 'model.n_kv_heads': 2,
                                     'optim.peak_lr': 1e-2})

  def residual_stream_drift(res):
    return {k: v for k, v in coord_check.flat(res, 'completep').items() if k in ('out', 'out_update')}

  res = coord_check.run_depth(config, [2, 8], 3, parametrizations=('completep',))
  assert residual_stream_drift(res) == {}, res.slopes('completep')
  assert res.rms['completep']['out_update'][:, 0].tolist() == [0.0, 0.0]  # the update at init is exactly 0
  monkeypatch.setattr(mup, 'residual_multiplier', lambda mc: 1.0)
  broken = coord_check.run_depth(config, [2, 8], 3, parametrizations=('completep',))
  drift = residual_stream_drift(broken)
  assert drift.get('out_update', 0) > 0.5, broken.slopes('completep')


def test_depth_coord_check_cli_bad_input_is_one_line():
  from conftest import run_cli
  p = run_cli('coord-check', '--config=experiments/lm.py:size=pico', '--depths=2,x')
  assert p.returncode == 2 and '--depths must be integers' in p.stderr and 'Traceback' not in p.stderr, p.stderr
  p = run_cli('coord-check', '--config=experiments/lm.py:size=pico', '--depths=4')
  assert p.returncode == 2 and 'at least two depths' in p.stderr and 'Traceback' not in p.stderr, p.stderr


def test_completep_ladder_grows_depth_and_width_at_fixed_aspect_and_head_dim():
  from sktlm.config import accounting
  from sktlm.sweep import planners, schedule, spec
  common = {'config.data.seq_len': 128, 'config.train.batch_size': 8, 'config.optim.peak_lr': 6e-3}
  runs = planners.completep_ladder('experiments/lm.py', [2, 4, 8], aspect=32, head_dim=16, tokens_per_param=5.0,
                                   common=common)
  sd = spec.SweepDef(path='-', arg='', base='experiments/lm.py', common=common, runs=runs, resources={})
  planned = schedule.resolve(sd)  # the validator's rules across runs pass: the depth changes under completep
  assert [r.name for r in planned] == ['size-L2-d64', 'size-L4-d128', 'size-L8-d256']
  for r, depth in zip(planned, (2, 4, 8), strict=True):
    m = r.model
    assert (m.n_layers, m.d_model, m.d_model // m.n_heads, m.d_ff) == (depth, 32 * depth, 16, 96 * depth)
    assert (m.parametrization, m.base_width, m.base_depth, m.base_head_dim) == ('completep', 64, 2, 16)
    n = accounting.param_counts(m)['non_embedding']
    assert r.steps == math.ceil(5.0 * n / (8 * 128))  # D = 5 N
  with pytest.raises(UserError, match=r'multiple of head_dim 16; not for n_layers \[3\]'):
    planners.completep_shapes([2, 3], aspect=24, head_dim=16)


def test_moe_ladder_changes_no_depth_under_width_only_mup():
  """sweeps/moe_sizes.py (its dry run): runs under 'mup' keep one depth and one head dim; the depth it changes
  is under completep, with a base depth."""
  from sktlm.sweep import schedule, spec
  planned = schedule.resolve(spec.load_sweep_file('sweeps/moe_sizes.py'))
  mup_shapes = {(r.model.n_layers, r.model.d_model // r.model.n_heads) for r in planned
                if r.model.parametrization == 'mup'}
  assert len(mup_shapes) <= 1, mup_shapes
  depths = {r.model.n_layers for r in planned}
  assert depths == {2, 3, 4} and all(r.model.parametrization == 'completep' and r.model.base_depth == 2
                                     for r in planned)


def test_ladder_reach_factors():
  """`sktlm plan --ladder`: the target over the ladder's largest value per axis, and whether it lies inside."""
  from sktlm.plan import report
  ladder = [dict(n=1e5, depth=2, c=1e12), dict(n=2e6, depth=2, c=8e12)]
  r = report.ladder_reach(ladder, dict(n=3e10, depth=61, c=2e21))
  assert r['n']['factor'] == pytest.approx(1.5e4) and r['depth']['factor'] == pytest.approx(30.5)
  assert r['c']['factor'] == pytest.approx(2.5e8) and not any(r[k]['covered'] for k in r)
  line = report._reach_line(dict(ladder_reach=r, ladder=dict(name='sweeps/x.py', runs=2, steps=10, tokens=1e6)))
  assert 'x1.5e+04 its largest N' in line and 'beyond what the ladder covers in N, depth, C' in line
  inside = report.ladder_reach(ladder, dict(n=1e6, depth=2, c=2e12))
  assert all(inside[k]['covered'] for k in inside) and inside['n']['factor'] == pytest.approx(0.5)

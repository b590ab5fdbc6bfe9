"""The learning-rate section of `sktlm scaling` (sktlm/scaling/lr_transfer.py) on synthetic run folders whose
losses follow a known parabola in log LR: the optimum per width, its drift with width, and the edge flags."""

import json
import math
import os

import numpy as np
import pytest

from sktlm.scaling import analysis, io, lr_transfer, report

GRID = [1e-3 * 2**k for k in range(7)]  # 1e-3 .. 6.4e-2


def true_opt(p, width):
  return 8e-3 if p == 'mup' else 8e-3 * 64 / width  # muP: transfers; SP: ~1/width (Adam)


def write_run(root, name, p, width, lr, loss, status='done'):
  wd = os.path.join(root, name)
  os.makedirs(wd)
  n = 12 * 2 * width**2
  with open(os.path.join(wd, 'summary.json'), 'w') as f:
    json.dump(dict(status=status, params=dict(total=n * 1.2, non_embedding=n, active=n * 1.2), tokens=1e5,
                   flops={'6N': 6 * n * 1e5, 'exact': 6.6 * n * 1e5}, final_train_loss=loss, final_eval_loss=loss,
                   best_eval_loss=loss), f)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(dict(model=dict(parametrization=p, base_width=64, n_layers=2, d_model=width, n_heads=4,
                              d_ff=3 * width, size='pico'), optim=dict(peak_lr=lr)), f)


def loss_at(p, width, lr, noise=0.0):
  return 3.0 - 0.2 * math.log2(width) + 0.05 * (math.log(lr) - math.log(true_opt(p, width)))**2 + noise


def test_optimum_of_an_exact_parabola_and_its_bracket():
  lrs = np.array(GRID)
  o = lr_transfer.optimum(lrs, [loss_at('mup', 64, x) for x in lrs], n_boot=50)
  assert o['lr_opt'] == pytest.approx(8e-3, rel=1e-6) and o['edge'] == ''
  assert o['best_lr'] == 8e-3
  o = lr_transfer.optimum(lrs[:3], [loss_at('mup', 64, x) for x in lrs[:3]])  # 3 points: the bracket
  assert math.isnan(o['lr_opt']) and o['edge'] == 'high' and o['best_lr'] == 4e-3  # optimum above the grid
  o = lr_transfer.optimum(lrs[2:5], [loss_at('mup', 64, x) for x in lrs[2:5]])
  assert o['lr_opt'] == pytest.approx(8e-3, rel=1e-6) and o['ci'] == (4e-3, 1.6e-2)


def test_report_section_optimum_per_width_drift_and_edges(tmp_path):
  root = str(tmp_path / 'transfer')
  rng = np.random.default_rng(0)
  for p in ('sp', 'mup'):
    for width in (64, 128, 256):
      for lr in GRID:
        loss = loss_at(p, width, lr, noise=rng.normal(0, 0.002))
        write_run(root, f'{p}_w{width}_lr{lr:g}', p, width, lr, loss)
  # a width whose optimum lies below its grid, and a run that did not finish
  for lr in GRID[3:]:
    write_run(root, f'sp_w512_lr{lr:g}', 'sp', 512, lr, loss_at('sp', 512, lr))
  write_run(root, 'sp_w512_lr0.1', 'sp', 512, 0.1, float('nan'), status='failed')
  out = str(tmp_path / 'out')
  report.run([root], out, analysis.Options(n_boot=100, curves=False))
  doc = json.load(open(os.path.join(out, 'lr_transfer.json')))['transfer']
  by = {(g['parametrization'], g['shape'][1]): g for g in doc}
  for p in ('sp', 'mup'):
    for width in (64, 128, 256):
      g = by[(p, width)]
      assert g['lr_opt'] == pytest.approx(true_opt(p, width), rel=0.15), (p, width, g)
      assert g['ci'][0] <= true_opt(p, width) * 1.15 and g['ci'][1] >= true_opt(p, width) / 1.15
      assert g['edge'] == ''
  assert by[('sp', 512)]['edge'] == 'low' and by[('sp', 512)]['failed_lrs'] == [0.1]
  gs = lr_transfer.groups(io.load_sweep(root).rows, 'best_eval_loss')
  for g in gs:
    g.opt = lr_transfer.optimum(g.lrs, g.losses, 50)
  d = lr_transfer.drift(gs)
  assert abs(d['mup']) < 0.1 and d['sp'] == pytest.approx(-1.0, abs=0.15)
  md = open(os.path.join(out, 'report.md')).read()
  assert '## Learning rate' in md and 'EDGE: best LR is the lowest tried' in md and 'lr_vs_loss.png' in md
  assert os.path.isfile(os.path.join(out, 'lr_vs_loss.png'))
  assert 'mup: optimal LR ~ width^+0.0' in md or 'mup: optimal LR ~ width^-0.0' in md


def test_size_ladder_lr_grid_per_size():
  """An LR grid on some sizes of a ladder: one run per LR with the size's steps; other sizes keep one run."""
  from conftest import ROOT

  from sktlm.errors import UserError
  from sktlm.sweep import planners
  lm = f'{ROOT}/experiments/lm.py'
  plain = planners.size_ladder(lm, ['pico', 'nano'], tokens_per_param=0.3)
  runs = planners.size_ladder(lm, ['pico', 'nano'], tokens_per_param=0.3, lr_grid={'pico': [1e-3, 3e-3]},
                              extra={'config.optim.peak_lr': 2e-3})
  assert [r.name for r in runs] == ['size-pico_lr-0.001', 'size-pico_lr-0.003', 'size-nano']
  assert [r.settings['config.optim.peak_lr'] for r in runs] == [1e-3, 3e-3, 2e-3]
  assert [r.settings['config.train.steps'] for r in runs] == [plain[0].settings['config.train.steps']] * 2 + [
      plain[1].settings['config.train.steps']]
  every = planners.size_ladder(lm, ['pico', 'nano'], tokens_per_param=0.3, lr_grid=[1e-3, 3e-3])
  assert len(every) == 4 and len({r.name for r in every}) == 4
  with pytest.raises(UserError, match='not in the ladder'):
    planners.size_ladder(lm, ['pico'], lr_grid={'tiny': [1e-3]})


def test_default_sweep_is_a_mup_width_ladder():
  """sweeps/model_sizes.py (`make main`): >= 5 widths spanning >= 20x in non-embedding N at one depth and one head
  dim (heads grow with width: what width-only muP assumes), muP with the base width of the smallest model at
  one LR, >= 3 token budgets per size shared by every size (WSD branches), >= 3 seeds at one size."""
  from conftest import ROOT

  from sktlm.config import accounting
  from sktlm.sweep import schedule, spec
  sd = spec.load_sweep_file(f'{ROOT}/sweeps/model_sizes.py')
  ns, shapes, budgets, seeds = {}, set(), {}, {}
  for r in sd.runs:
    c = spec.load_run_config(sd.base, {**sd.common, **r.common, **r.settings})
    with c.model.unlocked():
      c.model.vocab_size = schedule.vocab_size(c)
    m = c.model
    assert m.parametrization == 'mup' and m.base_width == 64 and c.optim.peak_lr == sd.common['config.optim.peak_lr']
    ns[m.d_model] = accounting.param_counts(m)['non_embedding']
    shapes.add((m.n_layers, m.head_dim, m.d_model // m.n_heads))
    budgets.setdefault(m.d_model, set()).add(c.train.steps)
    seeds.setdefault((m.d_model, c.train.steps), set()).add(c.seed)
  assert len(ns) >= 5 and max(ns.values()) / min(ns.values()) >= 20 and min(ns) == 64
  assert len(shapes) == 1 and next(iter(shapes))[1] == next(iter(shapes))[2] == 16
  assert all(len(b) >= 3 for b in budgets.values()) and len({frozenset(b) for b in budgets.values()}) == 1
  assert max(len(s) for s in seeds.values()) >= 3


DEPTH_GRID = [6e-3 * 2**(k / 2) for k in range(-4, 4)]  # 2^0.5 spacing, 8 LRs: 1.5e-3 .. 1.7e-2


def depth_opt(p, depth):
  return 6e-3 if p == 'completep' else 6e-3 * (depth / 2)**-0.5  # mup: drifts down with depth


def write_depth_run(root, p, depth, lr, loss, seed):
  wd = os.path.join(root, f'{p}_L{depth}_lr{lr:.3g}_s{seed}')
  os.makedirs(wd)
  n = 12 * depth * 64**2
  with open(os.path.join(wd, 'summary.json'), 'w') as f:
    json.dump(dict(status='done', params=dict(total=n * 1.2, non_embedding=n, active=n * 1.2), tokens=1e5,
                   flops={'6N': 6 * n * 1e5, 'exact': 6.6 * n * 1e5}, final_train_loss=loss, final_eval_loss=loss,
                   best_eval_loss=loss), f)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(dict(model=dict(parametrization=p, base_width=64, base_depth=2, n_layers=depth, d_model=64,
                              n_heads=4, d_ff=192, size='pico'), optim=dict(peak_lr=lr), seed=seed), f)


def test_depth_drift_with_intervals(tmp_path):
  """Depths 2..16 at one width: completep's optimum (constant by construction) is reported within one 2x step with
  an interval around x1; mup's (~ depth^-0.5) drifts x0.35 from 2 to 16 layers, its interval excluding 1."""
  root = str(tmp_path / 'depth')
  rng = np.random.default_rng(1)
  for p in ('mup', 'completep'):
    for depth in (2, 4, 8, 16):
      for lr in DEPTH_GRID:
        for seed in (0, 1):  # repeated seeds at one LR: their mean is the point
          loss = 3.0 - 0.1 * math.log2(depth) + 0.05 * (math.log(lr) - math.log(depth_opt(p, depth)))**2
          write_depth_run(root, p, depth, lr, loss + rng.normal(0, 0.002), seed)
  out = str(tmp_path / 'out')
  report.run([root], out, analysis.Options(n_boot=200, curves=False))
  doc = {d['parametrization']: d for d in json.load(open(os.path.join(out, 'lr_depth.json')))['depth']}
  cp, mp = doc['completep'], doc['mup']
  assert cp['depths'] == mp['depths'] == [2, 4, 8, 16] and cp['base_depth'] == 2
  assert abs(cp['slope']) < 0.05 and cp['slope_ci'][0] < 0 < cp['slope_ci'][1], cp
  assert 0.9 < cp['ratio'] < 1.1 and 0.5 <= cp['ratio_ci'][0] and cp['ratio_ci'][1] <= 2, cp
  assert mp['slope'] == pytest.approx(-0.5, abs=0.05) and mp['slope_ci'][1] < -0.3, mp
  assert mp['ratio'] == pytest.approx(8**-0.5, rel=0.1) and mp['ratio_ci'][1] < 0.5, mp
  for lr_opt, depth in zip(mp['lr_opt'], mp['depths'], strict=True):
    assert lr_opt == pytest.approx(depth_opt('mup', depth), rel=0.1)
  md = open(os.path.join(out, 'report.md')).read()
  assert 'completep (d_model 64): optimal LR ~ depth^' in md and 'within one 2x step (interval inside' in md
  assert 'mup (d_model 64): optimal LR ~ depth^-0.5' in md and 'MORE than one 2x step' in md

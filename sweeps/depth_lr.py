"""LR transfer across depth: mup against completep, a 2^0.5 grid of peak LRs at depths 2, 4, 8 and 16.

The default ladder's base model (sweeps/model_sizes.py: d_model 64, head dim 16, d_ff 192, init std 0.06, its
WSD recipe, batch 8 x 128 tokens) trained 250 steps at each depth under
- mup (width-only muP, sktlm/model/mup.py): the residual branches are not scaled with depth, so the optimum is
  expected to move (the earlier three-LR check, docs/scaling.md, saw the high-LR side rise from 2 to 8 layers);
  its runs set model.allow_depth_change (the validator refuses a mup sweep that changes depth otherwise);
- completep (Dey et al. 2025; base depth 2, base width 64): branches x 2/L with its LR, epsilon and decay
  rules; its optimum should stay within one 2x step from 2 to 16 layers.
At depth 2 the two are the same model (m_L = 1) and their losses agree (a check of the run itself).

`sktlm scaling` then reports each optimum with its bootstrap interval and, per parametrisation, the drift across
depth (the slope of log LR* against log depth and the ratio L 16 / L 2, with intervals), section "Learning rate".

  sktlm sweep sweeps/depth_lr.py --dry_run
  sktlm sweep sweeps/depth_lr.py --sweep_dir=runs/depth_lr
  sktlm scaling runs/depth_lr --out=runs/depth_lr/report --backtest=0

Arguments: depths=2+4+8+16, parametrizations=mup+completep, lo=-5 and lrs=8 (the grid: 6e-3 x 2^(k/2) for
k = lo .. lo + lrs - 1, i.e. 1.06e-3 .. 1.2e-2), steps=250, width=64. A tiny end-to-end check of the sweep
and its report: `depths=2+4,lrs=2,steps=20`.
"""

import sweeps.model_sizes as ladder  # noqa: E402  (the ladder's recipe: COMMON and the width-64 shape)
from sktlm.config import load
from sktlm.sweep import spec

BASE = ladder.BASE
PEAK_LR = ladder.PEAK_LR  # 6e-3: the grid's centre, tuned at depth 2 (sweeps/mup_transfer.py)
COMMON = {**ladder.COMMON, 'config.optim.schedule': 'wsd', 'config.optim.decay_shape': '1-sqrt',
          'config.optim.decay_fraction': 0.2, 'config.model.base_depth': 2,
          'config.model.allow_depth_change': True}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, depths='2+4+8+16', parametrizations='mup+completep', lo=-5, lrs=8, steps=250,
                       width=64)
  depths = sorted(int(d) for d in arg.depths.split('+'))
  order = depths[:1] + depths[-1:] + depths[1:-1] if len(depths) > 1 else depths  # the widest span first
  shape = {k: v for k, v in ladder.shape(arg.width).items() if k != 'config.model.n_layers'}
  grid = [PEAK_LR * 2 ** (k / 2) for k in range(arg.lo, arg.lo + arg.lrs)]
  steps = {'config.train.steps': arg.steps, 'config.optim.warmup_steps': max(1, round(0.06 * arg.steps)),
           'config.model.base_width': arg.width}
  named = ('config.model.n_layers', 'config.model.parametrization', 'config.optim.peak_lr')
  return [spec.Run({**shape, **steps, **s}, name_keys=named) for s in spec.product([
      spec.sweep(named[0], order), spec.sweep(named[1], arg.parametrizations.split('+')),
      spec.sweep(named[2], [float(f'{lr:.3g}') for lr in grid])])]

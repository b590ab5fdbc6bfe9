"""muP learning-rate transfer: widths x peak learning rates at fixed depth, data and steps, under SP and muP.

Width is d_model (d_ff = 3 d_model, 4 heads, 2 layers; muP base width 64, so at width 64 the two parametrisations
are the same model); every run sees the same tokens. `sktlm scaling` finds the LR sweep in the results and adds
its "Learning rate" section: loss against LR per width, and the optimal LR per width (vertex of a parabola in
log LR through the best grid point and its neighbours, with a residual-bootstrap interval). Under muP the optimum
stays put as the width grows; under SP it drifts down.

  sktlm sweep sweeps/mup_transfer.py --dry_run
  nice sktlm sweep sweeps/mup_transfer.py --workdir=runs/mup_transfer
  sktlm scaling runs/mup_transfer --out=runs/mup_transfer/report

Arguments: widths=64+128+256, lrs=6.4e-4+1.6e-3+4e-3+1e-2+2.5e-2, sp_lrs=2.56e-4 (SP only), steps=200,
parametrizations=sp+mup, init_std=0.06 (tuned at the base width: 0.02, the GPT-2 value, is ~6x below
1/sqrt(64) and left the muP models of every width at the base model's loss: at width 64 and LR 4e-3 it gives
2.534 against 2.306 for 0.06).
"""

from sktlm.config import load
from sktlm.sweep import product, sweep

BASE = 'experiments/lm.py:size=pico'
COMMON = {
    'config.model.n_layers': 2,
    'config.model.n_heads': 4,
    'config.model.n_kv_heads': 4,
    'config.model.base_width': 64,
    'config.data.seq_len': 64,
    'config.train.batch_size': 8,
    'config.train.log_every': 10,
    'config.train.eval_every': 1_000_000,  # evaluate once, at the end
    'config.train.eval_batches': 32,       # 16K held-out tokens
    'config.train.checkpoint_every': 1_000_000,
    'config.optim.schedule': 'cosine',
    'config.metrics.progress': False,
    'config.metrics.tensorboard': False,
}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, widths='64+128+256', lrs='6.4e-4+1.6e-3+4e-3+1e-2+2.5e-2', sp_lrs='2.56e-4',
                          steps=200, parametrizations='sp+mup', init_std=0.06)
  widths = sorted(int(w) for w in arg.widths.split('+'))
  # Order: the smallest and the largest width first, both parametrisations, so that a partial sweep already
  # shows the transfer (or its absence) over the widest span.
  order = widths[:1] + widths[-1:] + widths[1:-1] if len(widths) > 1 else widths
  runs = []
  common = [{'config.model.init_std': arg.init_std}]
  for w in order:
    runs += product([
        sweep('config.model.parametrization', arg.parametrizations.split('+')),
        [{'config.model.d_model': w, 'config.model.d_ff': 3 * w}],
        sweep('config.optim.peak_lr', [float(x) for x in arg.lrs.split('+')]),
        sweep('config.train.steps', [arg.steps]),
        sweep('config.optim.warmup_steps', [max(1, arg.steps // 10)]),
        common,
    ])
  # SP's optimum falls with width: one more LR below the grid for SP, after the rest (`sp_lrs=` to change)
  extra = [float(x) for x in arg.sp_lrs.split('+') if x] if 'sp' in arg.parametrizations.split('+') else []
  for w in order:
    runs += product([
        sweep('config.model.parametrization', ['sp']),
        [{'config.model.d_model': w, 'config.model.d_ff': 3 * w}],
        sweep('config.optim.peak_lr', extra),
        sweep('config.train.steps', [arg.steps]),
        sweep('config.optim.warmup_steps', [max(1, arg.steps // 10)]),
        common,
    ]) if extra else []
  return runs

"""The default sweep (the README's main command): a muP width ladder with warmup-stable-decay branches.

Sizes: five widths (d_model 64 to 288) at fixed depth (2 layers) and fixed head dim (16; heads grow with width:
4 to 18), d_ff = 3 d_model, so non-embedding N goes 20x (107K to 2.16M) and muP's width-only transfer holds
(sktlm/model/mup.py assumes fixed depth; docs/scaling.md argues this over CompleteP depth scaling). Every size
trains in muP (base width 64) at the base model's tuned peak LR and init std (sweeps/mup_transfer.py).

Token budgets: the same three for every size (steps x 8 x 128 tokens), reached by one constant-LR run per size
with 1-sqrt cooldown branches over the last 20% (Hägele et al. 2024; sktlm.sweep.planners.wsd), so D does not
move with N and L(N, D) (Chinchilla approach 3) is identifiable; every branch end is evaluated on the same
held-out rows. The smallest size is repeated with 3 seeds: its spread is the noise floor the backtest
error is read against. The backtest fits without the largest size and predicts each of its budgets
(measured: -1.50%, -0.10%, +1.18%, every interval covering; docs/scaling.md).

  sktlm sweep sweeps/model_sizes.py --dry_run
  sktlm sweep sweeps/model_sizes.py --workdir=runs/sizes
  sktlm scaling runs/sizes --out=runs/sizes/report

Argument `width=384` plans one other width with the same recipe (no seeds): the sweep a ladder predicts with
`sktlm scaling runs/sizes --predict=runs/big384` (docs/scaling.md has the measured table).
  sktlm sweep sweeps/model_sizes.py:width=384 --workdir=runs/big384
"""

from sktlm.config import load
from sktlm.sweep import planners

BASE = 'experiments/lm.py'
WIDTHS = (64, 96, 144, 208, 288)
DEPTH = 2
HEAD_DIM = 16
SEED_WIDTH = 64
STEPS = (125, 250, 500)   # token budgets, in steps of 8 x 128 tokens
PEAK_LR = 6e-3            # optimal at the muP base width (d_model 64): sweeps/mup_transfer.py
INIT_STD = 0.06           # tuned there too (0.02 is ~6x below 1/sqrt(64))
TOKENS_PER_STEP = 8 * 128
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 8,
    'config.train.log_every': 10,
    'config.train.eval_every': 1_000_000,  # evaluate once, at the end of each run and branch
    'config.train.eval_batches': 64,       # 65K held-out tokens, the same rows for every run
    'config.optim.warmup_steps': 15,
    'config.model.parametrization': 'mup',
    'config.model.base_width': 64,
    'config.model.init_std': INIT_STD,
    'config.optim.peak_lr': PEAK_LR,
    'config.metrics.progress': False,
}


def shape(width: int) -> dict:
  heads = width // HEAD_DIM
  return {'arg.size': 'pico', 'config.model.n_layers': DEPTH, 'config.model.d_model': width,
          'config.model.n_heads': heads, 'config.model.n_kv_heads': heads, 'config.model.head_dim': HEAD_DIM,
          'config.model.d_ff': 3 * width}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, width=0, seeds=3)
  widths = (arg.width,) if arg.width else WIDTHS
  shapes = {f'd{w}': shape(w) for w in widths}
  seeds = {f'd{SEED_WIDTH}': list(range(arg.seeds))} if not arg.width and arg.seeds > 1 else None
  return planners.wsd(BASE, list(shapes), tokens=[s * TOKENS_PER_STEP for s in STEPS], decay_fraction=0.2,
                      shapes=shapes, seeds=seeds, common=COMMON)

"""The default sweep (the README's main command): five model sizes on the embedded corpus (Python stdlib
source, bytes), sized to finish on a 2-core laptop CPU in about 10 minutes.

Every size trains on the same number of tokens per parameter (D = 0.3 N, far below Chinchilla's 20 so
that it fits a laptop): a size ladder along a fixed D/N line, whose final losses `sktlm scaling` fits
with L(N) = E + A / N^alpha. (At one fixed D for all sizes the larger models here are data-limited and
their losses stop falling with N.)

  sktlm sweep sweeps/model_sizes.py --dry_run
  sktlm sweep sweeps/model_sizes.py --workdir=runs/sizes
  sktlm scaling runs/sizes --out=runs/sizes/report
"""

from sktlm import configs
from sktlm.sweep import planners

BASE = 'experiments/lm.py'
SIZES = ['pico', 'nano', 'micro', 'mini', 'tiny']
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 8,
    'config.train.log_every': 10,
    'config.train.eval_every': 1_000_000,  # evaluate once, at the end
    'config.train.eval_batches': 64,       # 65K held-out tokens, rows sampled across the validation split
    'config.train.checkpoint_every': 200,
    'config.optim.peak_lr': 3e-3,
    'config.metrics.progress': False,
}


def get_sweep(arg=None):
  arg = configs.parse_arg(arg, tokens_per_param=0.3)
  return planners.size_ladder(BASE, SIZES, tokens_per_param=arg.tokens_per_param, warmup_fraction=0.1,
                              common=COMMON)

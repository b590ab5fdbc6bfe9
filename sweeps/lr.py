"""Learning-rate sweep in plain big_vision style: sizes x peak learning rates at a fixed step count.

  sktlm sweep sweeps/lr.py --dry_run
  sktlm sweep sweeps/lr.py:steps=300 --workdir=runs/lr --parallel=2
"""

from sktlm.config import load
from sktlm.sweep import product, sweep

BASE = 'experiments/lm.py'
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 16,
    'config.train.eval_every': 100,
    'config.metrics.progress': False,
}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, steps=200)
  return product([
      sweep('arg.size', ['nano', 'micro']),
      sweep('config.optim.peak_lr', [1e-3, 3e-3, 1e-2]),
      sweep('config.train.steps', [arg.steps]),
  ])

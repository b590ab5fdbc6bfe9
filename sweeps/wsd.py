"""Warmup-stable-decay sweep: per size one long WSD run, plus short decay branches that resume its
stable-phase checkpoints, so each size yields several token budgets (2.5, 5, 10 tokens per parameter)
for little more than the cost of its longest run. A branch waits for its parent's checkpoint.

  sktlm sweep sweeps/wsd.py --dry_run
  sktlm sweep sweeps/wsd.py --workdir=runs/wsd --parallel=2
"""

from sktlm.sweep import planners

BASE = 'experiments/lm.py'
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 16,
    'config.train.eval_every': 100,
    'config.optim.warmup_steps': 50,
    'config.metrics.progress': False,
}


def get_sweep(arg=None):
  del arg
  return planners.wsd(BASE, ['pico', 'nano', 'micro'], tokens_per_param=(2.5, 5, 10), decay_fraction=0.2,
                      common=COMMON)

"""IsoFLOP sweep (Chinchilla Approach 2): for each compute budget C, the sizes around the expected optimum,
each trained for C / (FLOPs per token x tokens per step) steps. `sktlm scaling` fits a parabola of loss
against log N per budget and N_opt(C) from the vertices.

  sktlm sweep sweeps/isoflop.py --dry_run
  sktlm sweep sweeps/isoflop.py --workdir=runs/isoflop
  sktlm sweep sweeps/isoflop.py:budgets=3e13+1e14+3e14 --workdir=runs/isoflop_big
"""

from sktlm.config import load
from sktlm.sweep import planners

BASE = 'experiments/lm.py'
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 16,
    'config.train.eval_every': 100,
    'config.train.checkpoint_every': 200,
    'config.metrics.progress': False,
}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, budgets='1e13+3e13+1e14', per_budget=5)
  budgets = [float(b) for b in arg.budgets.split('+')]
  return planners.isoflop(BASE, budgets, size_names=['pico', 'nano', 'micro', 'mini', 'tiny', 'small'],
                          per_budget=arg.per_budget, common=COMMON)

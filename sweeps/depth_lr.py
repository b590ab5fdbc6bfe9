"""muP across depth? An LR sweep at two depths of the default ladder's base width (sweeps/model_sizes.py).

muP (sktlm/model/mup.py) transfers the LR across width at fixed depth; the default ladder keeps depth fixed for
that reason. This checks what a depth ladder would do: the optimal peak LR at 2 and 8 layers (d_model 64,
head dim 16, d_ff 192, the ladder's WSD recipe, 250 steps of 8 x 128 tokens). If the optimum moved with depth,
a ladder that grows depth under width-only muP would train its larger sizes off their best LR (docs/scaling.md).

  sktlm sweep sweeps/depth_lr.py --workdir=runs/depth_lr
  sktlm scaling runs/depth_lr --out=runs/depth_lr/report --backtest=0   # section "Learning rate"
"""

import sweeps.model_sizes as ladder  # noqa: E402  (the ladder's recipe: COMMON and the width-64 shape)
from sktlm.sweep import spec

BASE = ladder.BASE
COMMON = {**ladder.COMMON, 'config.optim.schedule': 'wsd', 'config.optim.decay_shape': '1-sqrt',
          'config.optim.decay_fraction': 0.2, 'config.train.steps': 250}


def get_sweep(arg=None):
  del arg
  shape = {k: v for k, v in ladder.shape(64).items() if k != 'config.model.n_layers'}
  return spec.product([[shape], spec.sweep('config.model.n_layers', [2, 8]),
                       spec.sweep('config.optim.peak_lr', [2e-3, 6e-3, 1.8e-2])])

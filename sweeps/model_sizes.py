"""The default sweep (the README's main command): five model sizes, pico to tiny (25x in non-embedding N, 107K
to 2.66M), on the embedded corpus (Python stdlib source, bytes), sized to finish on a 2-core CPU in ~10 minutes.

Learning rate: every size trains in muP (`model.parametrization=mup`, base width 64 = pico's d_model) at the
peak LR and init std that are optimal for the base model, so the LR is transferred, not guessed:
sweeps/mup_transfer.py measured that under muP the optimal LR stays put from d_model 64 to 256 while under SP it
drifts (README, "muP"). The cheap smallest size also trains at LR/3 and 3 LR: `sktlm scaling` keeps its best run
and its "Learning rate" section shows the LR each size used and flags a best LR at the edge of its grid.
Warmup is 10% of each run's steps. Time: the dry run estimates 10 min on an idle 2-core CPU (7 runs; tiny alone
~6 min); on the shared machine under a load of ~20 the first runs took 4-6x their estimates.

What the curve shows: L(N) along a fixed D/N line, D = 0.3 N tokens (batch 8 x 128 tokens; 32 steps for pico,
779 for tiny). The law fitted on the smaller sizes predicts the largest (the report's backtest).
What it does not show: compute-optimal scaling. D/N = 0.3 is ~70x below Chinchilla's ~20 tokens per parameter,
so every model is far from converged and the fitted exponent mixes the N and D terms of L(N, D); at these
budgets a compute-optimal model would be several times smaller (the byte-level stdlib corpus also differs from
web text). The LR was measured at 200 steps and 2 layers; along the ladder depth grows with width (2 to 6 layers),
run length varies 25x (32 to 779 steps), and muP transfers across width only, so the LR grid at the base size
checks the transferred LR where it is cheap; the larger sizes are not checked here.

  sktlm sweep sweeps/model_sizes.py --dry_run
  sktlm sweep sweeps/model_sizes.py --workdir=runs/sizes
  sktlm scaling runs/sizes --out=runs/sizes/report
"""

from sktlm.config import load as configs
from sktlm.sweep import planners

BASE = 'experiments/lm.py'
SIZES = ['pico', 'nano', 'micro', 'mini', 'tiny']
PEAK_LR = 6e-3          # optimal at the muP base width (d_model 64, 200 steps): sweeps/mup_transfer.py
INIT_STD = 0.06         # tuned there too (0.02 is ~6x below 1/sqrt(64))
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 8,
    'config.train.log_every': 10,
    'config.train.eval_every': 1_000_000,  # evaluate once, at the end
    'config.train.eval_batches': 64,       # 65K held-out tokens, rows sampled across the validation split
    'config.train.checkpoint_every': 200,
    'config.model.parametrization': 'mup',
    'config.model.base_width': 64,
    'config.model.init_std': INIT_STD,
    'config.optim.peak_lr': PEAK_LR,
    'config.metrics.progress': False,
}


def get_sweep(arg=None):
  arg = configs.parse_arg(arg, tokens_per_param=0.3, lr_check=True)
  grid = {'pico': [PEAK_LR / 3, PEAK_LR, PEAK_LR * 3]} if arg.lr_check else None
  return planners.size_ladder(BASE, SIZES, tokens_per_param=arg.tokens_per_param, warmup_fraction=0.1,
                              common=COMMON, lr_grid=grid)

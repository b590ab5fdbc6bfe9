"""Dense and MoE ladders side by side: three sizes (pico, nano, micro: 107K to 853K active non-embedding
parameters) x routed expert expansion E = 1 (dense), 4 and 8 (top-1, experts of the dense MLP's width:
Krajewski et al.'s granularity G = 1), every E of a size at the same active parameters and the same tokens, on the
embedded corpus (Python stdlib source, bytes). Routing as the flagship (experiments/flagship.py): sigmoid
gates, DeepSeek-V3's auxiliary-loss-free balancing (a per-expert selection bias) and dropless dispatch, so no
token is dropped (the report's dropped fraction says so). One difference: the flagship renormalises its 8
gates to sum to 1, which over a single routed expert would make every gate 1 and leave the router without a
gradient (the validator refuses it); top-1 runs keep the raw sigmoid gate (the planner sets
renormalize=False).

`sktlm scaling` then reports (section "Mixture of experts"): loss against active and total N per E, the
compute multiplier of each E over dense at equal loss (the dense L(C) inverted at the MoE run's loss) with a
bootstrap interval, the joint MoE law (Ludziejewski et al. 2025, along this ladder's D = r N_act line) with a
backtest on the largest size, and with `--moe_target=experiments/flagship.py` what the law implies for
the flagship (an extrapolation over many decades of C, labelled as such).

Tokens: D = 0.5 x the dense model's non-embedding N (batch 8 x 128 tokens): 53 steps for pico, 417 for micro.
Every model is far from compute-optimal; the multiplier is measured at this data ratio, not at the optimum.
Parametrisation: the sizes grow depth (2, 3, 4 layers) with width, so they train under CompleteP (base width 64
and base depth 2: pico is the base model, where CompleteP is muP), whose LR transfers across depth as well as
width; width-only muP would not (the sweep validator refuses a mup sweep that changes depth). The head dim grows
with width at 4 heads (16, 24, 32), which is muP's own 1/d_head setting (base_head_dim 0). A fixed-head-dim
ladder is sktlm.sweep.planners.completep_shapes (the MoE ladder would need moe_ladder(shapes=...)).
LR: CompleteP (base 64 x 2) at the LR tuned for the dense base model (sweeps/model_sizes.py); routed experts
change the optimum (Ludziejewski et al. 2025: ln LR ~ -0.25 ln E), so the smallest size also runs each E at
LR / 2 and 2 LR and the report's "Learning rate" section flags a best LR at the edge of its grid.

  sktlm sweep sweeps/moe_sizes.py --dry_run
  sktlm sweep sweeps/moe_sizes.py --workdir=runs/moe_sizes
  sktlm scaling runs/moe_sizes --n=active --out=runs/moe_sizes/report --moe_target=experiments/flagship.py
"""

from sktlm.config import load
from sktlm.sweep import moe_planners

BASE = 'experiments/lm.py'
SIZES = ['pico', 'nano', 'micro']
EXPERTS = [1, 4, 8]
PEAK_LR = 6e-3
COMMON = {
    'config.data.seq_len': 128,
    'config.train.batch_size': 8,
    'config.train.log_every': 10,
    'config.train.eval_every': 1_000_000,  # evaluate once, at the end
    'config.train.eval_batches': 64,
    'config.train.checkpoint_every': 500,
    'config.model.parametrization': 'completep',  # depth grows 2 -> 4 (see the module doc)
    'config.model.base_width': 64,
    'config.model.base_depth': 2,
    'config.model.init_std': 0.06,
    'config.optim.peak_lr': PEAK_LR,
    'config.metrics.progress': False,
    # routing as the flagship: sigmoid gates, aux-loss-free balancing, dropless
    'config.model.moe.gate': 'sigmoid',
    'config.model.moe.balance': 'aux_free',
    'config.model.moe.bias_update_rate': 1e-3,
    'config.model.moe.capacity_factor': 0.0,
    'config.model.moe.dispatch': 'dropless',
}


def get_sweep(arg=None):
  arg = load.parse_arg(arg, tokens_per_param=0.5, lr_check=True)
  grid = {e: [PEAK_LR / 2, PEAK_LR, PEAK_LR * 2] for e in EXPERTS} if arg.lr_check else None
  return moe_planners.moe_ladder(BASE, SIZES, experts=EXPERTS, tokens_per_param=arg.tokens_per_param,
                                 param_kind='non_embedding', warmup_fraction=0.1, common=COMMON, lr_grid=grid)

"""Planners: runs with step counts derived from the one parameter/FLOP accounting (sktlm.config.accounting) of each
run's resolved config, so sweep files rarely write step counts by hand.

  size_ladder: sizes x a token rule (D = tokens_per_param x N, or fixed tokens) -> steps.
  isoflop:     per compute budget C, the sizes around the expected optimum,
               steps = C / (FLOPs per token x tokens per step).
  wsd:         per size one long warmup-stable-decay run plus short decay branches that start from its
               stable-phase checkpoints: several token budgets per size for little more than one run.
  completep_shapes / completep_ladder: sizes that grow depth and width together (fixed d_model / n_layers and
               head dim, as real ladders do) under CompleteP, whose LR transfers across both (sktlm/model/mup.py).

Each takes the sweep's BASE and its common settings (`common=`, which may set batch size, seq_len... that
change the counts). The runs carry those settings (spec.Run.common: they train with what they were sized
with) and what was planned (spec.Run.planned: resolving a run checks its config still gives that), so a
planner's common= and the module's COMMON cannot disagree silently.
"""

from __future__ import annotations

import math

from sktlm.config import accounting, sizes
from sktlm.errors import UserError
from sktlm.sweep import schedule, spec


def _counts(base: str, common: dict | None, size: str, param_kind: str = 'non_embedding'):
  """-> (N by `param_kind`, exact-and-6N FLOPs per token, tokens per step) for a size."""
  config = spec.load_run_config(base, {**(common or {}), 'arg.size': size})
  mc = config.model
  with mc.unlocked():
    mc.vocab_size = schedule.vocab_size(config)
  counts = accounting.param_counts(mc)
  if param_kind not in counts:
    raise UserError(f"param_kind '{param_kind}' is not one of {sorted(counts)}")
  tokens_per_step = config.train.batch_size * config.data.seq_len
  return counts[param_kind], accounting.flops_per_token(mc, config.data.seq_len), tokens_per_step


def _check_sizes(names):
  unknown = [s for s in names if s not in sizes.SIZES]
  if unknown:
    raise UserError(f'unknown sizes {unknown} (known: {", ".join(sizes.SIZE_NAMES)})')


def size_ladder(base: str, size_names, *, tokens_per_param: float = 20.0, tokens: int = 0,
                param_kind: str = 'non_embedding', common: dict | None = None, min_steps: int = 1,
                warmup_fraction: float = 0.0, extra: dict | None = None,
                lr_grid: list | dict | None = None, shapes: dict | None = None) -> list[spec.Run]:
  """One run per size: D = tokens_per_param x N (or `tokens` for all), steps = ceil(D / tokens per step).

  Runs are named by size only ('size-micro'); `extra` settings are added to every run. warmup_fraction > 0
  sets each run's optim.warmup_steps to that fraction of its steps (runs of very different lengths).
  lr_grid: peak LRs to try per size (a list for every size, or {size: list} for some), one run per LR named
  'size-micro_lr-0.01'; `sktlm scaling` keeps the best run per size and flags a best LR at the grid's edge.
  shapes: {label: config overrides} for sizes outside the table (as wsd's; e.g. completep_shapes).
  """
  shapes = shapes or {}
  _check_sizes([s for s in size_names if s not in shapes])
  if isinstance(lr_grid, dict) and set(lr_grid) - set(size_names):
    raise UserError(f'lr_grid names sizes not in the ladder: {sorted(set(lr_grid) - set(size_names))}')
  runs = []
  for size in size_names:
    shape = dict(shapes.get(size) or {})
    table_size = shape.pop('arg.size', 'pico' if size in shapes else size)
    n, _, per_step = _counts(base, {**(common or {}), **shape}, table_size, param_kind)
    d = tokens if tokens > 0 else tokens_per_param * n
    steps = max(min_steps, math.ceil(d / per_step))
    settings = {'arg.size': table_size, **shape, 'config.train.steps': steps}
    if warmup_fraction > 0:
      settings['config.optim.warmup_steps'] = max(1, round(warmup_fraction * steps))
    lrs = lr_grid.get(size) if isinstance(lr_grid, dict) else lr_grid
    planned = dict(tokens_per_step=per_step, params=n, param_kind=param_kind)
    if not lrs:
      runs.append(spec.Run({**settings, **(extra or {})}, name=f'size-{size}', common=dict(common or {}),
                           planned=planned))
    for lr in lrs or ():
      runs.append(spec.Run({**settings, **(extra or {}), 'config.optim.peak_lr': float(lr)},
                           name=f'size-{size}_lr-{float(lr):.3g}', common=dict(common or {}),
                           planned=dict(planned)))
  return [spec.normalise(r) for r in runs]


def isoflop(base: str, budgets, *, size_names=None, per_budget: int = 5, tokens_per_param: float = 20.0,
            convention: str = 'exact', common: dict | None = None, min_steps: int = 20,
            extra: dict | None = None) -> list[spec.Run]:
  """For each budget C: the `per_budget` sizes whose D/N at that C is closest (in log) to tokens_per_param,
  each with steps = C / (FLOPs per token x tokens per step). Named 'C-<budget>_size-<size>'.

  C is in `convention` (sktlm/config/accounting.py: 'exact' = model FLOPs, the convention `sktlm scaling` reports in by
  default, or '6N'), so the budgets are the ones the report groups and allocates by.
  """
  size_names = list(size_names or sizes.SIZE_NAMES)
  _check_sizes(size_names)
  info = {s: _counts(base, common, s) for s in size_names}
  runs = []
  for c in budgets:
    cands = []
    for s in size_names:
      n, fpt, per_step = info[s]
      convention = {'6n': '6N'}.get(convention, convention)
      if convention not in fpt:
        raise UserError(f"convention '{convention}' is not one of {sorted(fpt)}")
      steps = round(c / (fpt[convention] * per_step))
      if steps < min_steps:
        continue
      ratio = steps * per_step / n
      cands.append((abs(math.log(ratio / tokens_per_param)), s, steps))
    chosen = sorted(cands)[:per_budget]
    if len(chosen) < min(3, per_budget):
      raise UserError(f'budget C={c:.3g} leaves fewer than 3 sizes with >= {min_steps} steps; raise it')
    for _, s, steps in sorted(chosen, key=lambda t: size_names.index(t[1])):
      runs.append(spec.Run({'arg.size': s, 'config.train.steps': steps, **(extra or {})},
                           name=f'C-{c:.3g}_size-{s}', common=dict(common or {}),
                           planned=dict(tokens_per_step=info[s][2], params=info[s][0])))
  return [spec.normalise(r) for r in runs]


def wsd(base: str, size_names, *, tokens_per_param=(5.0, 10.0, 20.0), decay_fraction: float = 0.2,
        decay_shape: str = '1-sqrt', param_kind: str = 'non_embedding', common: dict | None = None,
        extra: dict | None = None, tokens=None, shapes: dict | None = None,
        seeds: dict | None = None) -> list[spec.Run]:
  """Per size: one WSD run to the largest budget, and for each smaller budget a branch that resumes the
  long run's stable-phase checkpoint at step K and decays over its last `decay_fraction` of steps.

  Every budget T (steps) keeps the same shape: decay starts at K = (1 - decay_fraction) T. The long run
  checkpoints every p steps with all K multiples of p, and keeps all its checkpoints.
  tokens: token budgets shared by every size (instead of tokens_per_param x N), so D does not move with N.
  shapes: {label: config overrides} for sizes outside the table (e.g. a width ladder at fixed depth and head
    dim); size_names are then those labels, each run trains `arg.size` of its overrides (default pico) with them.
  seeds: {label: [seed, ...]}: that size's whole family (long run and branches) once per seed, named
    '..._seed-S' with config.seed set, which `sktlm scaling` averages as one configuration.
  """
  shapes = shapes or {}
  _check_sizes([s for s in size_names if s not in shapes])
  if not 0 < decay_fraction < 1:
    raise UserError('decay_fraction must be in (0, 1)')
  runs = []
  for size in size_names:
    shape = dict(shapes.get(size) or {})
    table_size = shape.pop('arg.size', 'pico' if size in shapes else size)
    n, _, per_step = _counts(base, {**(common or {}), **shape}, table_size, param_kind)
    budgets = sorted(set(tokens)) if tokens else [b * n for b in sorted(set(tokens_per_param))]
    raw_k = [max(1.0, b / per_step * (1 - decay_fraction)) for b in budgets]
    p = max(1, int(raw_k[0] // 4))
    ks = sorted({max(p, round(k / p) * p) for k in raw_k})
    total = [round(k / (1 - decay_fraction)) for k in ks]
    sched = {'config.optim.schedule': 'wsd', 'config.optim.decay_shape': decay_shape}
    base_settings = {'arg.size': table_size, **shape}
    for seed in (seeds or {}).get(size) or [None]:
      tag = '' if seed is None else f'_seed-{seed}'
      seed_set = {} if seed is None else {'config.seed': seed}
      long_name = f'size-{size}_steps-{total[-1]}{tag}'
      carry = dict(common=dict(common or {}),
                   planned=dict(tokens_per_step=per_step, params=n, param_kind=param_kind))
      runs.append(spec.Run({**base_settings, 'config.train.steps': total[-1], **sched,
                            'config.optim.decay_start': ks[-1], 'config.train.checkpoint_every': p,
                            'config.train.keep_checkpoints': 0, **seed_set, **(extra or {})}, name=long_name,
                           **carry))
      for k, t in zip(ks[:-1], total[:-1], strict=False):
        runs.append(spec.Run({**base_settings, 'config.train.steps': t, **sched, 'config.optim.decay_start': k,
                              **seed_set, **(extra or {})}, name=f'size-{size}_steps-{t}{tag}', parent=long_name,
                             parent_step=k, **carry))
  return [spec.normalise(r) for r in runs]


def completep_shapes(depths, *, aspect: int, head_dim: int, ffn_ratio: float = 3.0,
                     table_size: str = 'pico') -> dict[str, dict]:
  """{'L4-d128': overrides} of a ladder that grows depth and width together: n_layers L, d_model = aspect x L,
  head dim fixed (n_heads = n_kv_heads = d_model / head_dim), d_ff = ffn_ratio x d_model (a multiple of 8), under
  completep with base width and depth the smallest size's and base_head_dim = head_dim (muP's 1/d_head with a
  fixed head dim: attention unchanged across sizes). Every size's LR is the smallest size's (CompleteP transfers
  it across width and depth: Dey et al. 2025; sktlm/model/mup.py)."""
  depths = sorted({int(d) for d in depths})
  if not depths or depths[0] < 1:
    raise UserError(f'completep ladder: depths must be >= 1, got {depths}')
  if head_dim < 2 or head_dim % 2:
    raise UserError(f'completep ladder: head_dim must be even (RoPE), got {head_dim}')
  bad = [d for d in depths if (aspect * d) % head_dim]
  if aspect < 1 or bad:
    raise UserError(f'completep ladder: d_model = aspect {aspect} x n_layers must be a multiple of head_dim '
                    f'{head_dim}; not for n_layers {bad}')
  base_depth, base_width = depths[0], aspect * depths[0]
  out = {}
  for d in depths:
    width = aspect * d
    heads = width // head_dim
    out[f'L{d}-d{width}'] = {
        'arg.size': table_size, 'config.model.n_layers': d, 'config.model.d_model': width,
        'config.model.n_heads': heads, 'config.model.n_kv_heads': heads, 'config.model.head_dim': head_dim,
        'config.model.d_ff': max(8, round(ffn_ratio * width / 8) * 8),
        'config.model.parametrization': 'completep', 'config.model.base_width': base_width,
        'config.model.base_depth': base_depth, 'config.model.base_head_dim': head_dim}
  return out


def completep_ladder(base: str, depths, *, aspect: int, head_dim: int, ffn_ratio: float = 3.0,
                     **ladder) -> list[spec.Run]:
  """size_ladder over completep_shapes (runs named 'size-L4-d128'); `ladder`: size_ladder's token rule, common,
  lr_grid, ..."""
  shapes = completep_shapes(depths, aspect=aspect, head_dim=head_dim, ffn_ratio=ffn_ratio)
  return size_ladder(base, list(shapes), shapes=shapes, **ladder)

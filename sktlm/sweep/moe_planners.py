"""MoE planners: routed-expert ladders built from a dense base shape, with step counts from the one
parameter/FLOP accounting (sktlm.config.accounting; MoE counts the active experts and the router).

Krajewski et al. 2024's parametrisation of an MoE layer relative to the dense SwiGLU of width d_ff:
  E  expansion rate: routed expert parameters = E x the dense MLP (E = 1: the dense model itself),
  G  granularity: E x G experts of width d_ff / G, top_k x G of them active per token,
  so every (E, G) of one size has the dense model's active MLP parameters (plus the router, d_model x E G).
Shared experts (`shared=S`): S always-on experts of the routed width take S of the top_k x G active slots,
so the active parameters stay those of the dense model.

  moe_ladder:  sizes x E (x G x shared), D = tokens_per_param x N of the dense size, the same tokens for
               every E of a size (equal active parameters, equal data): the compute multiplier compares
               runs that differ only in routing.
  moe_isoflop: per compute budget C and E, the sizes around D/N = tokens_per_param with
               steps = C / (active FLOPs per token x tokens per step), so each E is run at the same C.
"""

from __future__ import annotations

import math

from sktlm.config import accounting, sizes
from sktlm.errors import UserError
from sktlm.sweep import schedule, spec

MOE = 'config.model.moe.'


def moe_settings(base: str, size: str, e: int, g: int = 1, shared: int = 0, top_k: int = 1,
                 common: dict | None = None) -> dict:
  """The `config.model.moe.*` overrides of expansion E, granularity G, `shared` shared experts, from the dense
  `size` of `base` (whose d_ff is the dense MLP width). E = 1, G = 1, no shared: dense (num_experts 0)."""
  for name, v in (('E', e), ('G', g), ('top_k', top_k)):
    if int(v) != v or v < 1:
      raise UserError(f'moe ladder: {name} must be a positive integer, got {v}')
  if shared < 0:
    raise UserError(f'moe ladder: shared experts must be >= 0, got {shared}')
  if e == 1 and g == 1 and shared == 0:
    return {MOE + 'num_experts': 0}
  d_ff = spec.load_run_config(base, {**(common or {}), 'arg.size': size}).model.d_ff
  if d_ff % g:
    raise UserError(f'moe ladder: granularity G={g} does not divide d_ff={d_ff} of size {size}')
  active = top_k * g
  if shared >= active:
    raise UserError(f'moe ladder: {shared} shared expert(s) need top_k x G > {shared} active slots, got {active}')
  out = {MOE + 'num_experts': e * g, MOE + 'top_k': active - shared, MOE + 'expert_d_ff': d_ff // g,
         MOE + 'num_shared_experts': shared}
  if active - shared == 1:  # renormalised over one expert every gate is 1 and the router learns nothing
    out[MOE + 'renormalize'] = False
  return out


def _counts(base: str, common: dict | None, settings: dict):
  """-> (param counts, FLOPs per token by convention, tokens per step) of one run's resolved config."""
  config = spec.load_run_config(base, {**(common or {}), **settings})
  mc = config.model
  with mc.unlocked():
    mc.vocab_size = schedule.vocab_size(config)
  return accounting.param_counts(mc), accounting.flops_per_token(mc, config.data.seq_len), \
      config.train.batch_size * config.data.seq_len


def _name(size: str, e: int, g: int, shared: int) -> str:
  return f'size-{size}_E-{e}' + (f'_G-{g}' if g != 1 else '') + (f'_S-{shared}' if shared else '')


def _variants(experts, granularity, shared):
  """(E, G, S) triples; the dense model (E = 1) once, without granularity or shared experts."""
  out = []
  for e in experts:
    for g in ([1] if e == 1 else granularity):
      for s in ([0] if e == 1 else shared):
        if (e, g, s) not in out:
          out.append((e, g, s))
  return out


def moe_ladder(base: str, size_names, *, experts=(1, 4, 8), granularity=(1,), shared=(0,), top_k: int = 1,
               tokens_per_param: float = 20.0, tokens: int = 0, param_kind: str = 'active_non_embedding',
               common: dict | None = None, min_steps: int = 1, warmup_fraction: float = 0.0,
               extra: dict | None = None, lr_grid: dict | None = None) -> list[spec.Run]:
  """One run per (size, E, G, shared): D = tokens_per_param x (the dense size's `param_kind` N), or `tokens`.

  Every variant of a size trains the same steps (tokens), so at equal active parameters the only
  difference is routing. lr_grid: {E: [peak LRs]} runs those LRs for E at the smallest size (the MoE
  optimum moves with E: Ludziejewski et al. 2025); `sktlm scaling` keeps the best and flags grid edges.
  Names: 'size-micro_E-8[_G-2][_S-1][_lr-0.003]'.
  """
  unknown = [s for s in size_names if s not in sizes.SIZES]
  if unknown:
    raise UserError(f'unknown sizes {unknown} (known: {", ".join(sizes.SIZE_NAMES)})')
  if lr_grid and set(lr_grid) - set(experts):
    raise UserError(f'lr_grid names expert counts not in the ladder: {sorted(set(lr_grid) - set(experts))}')
  runs = []
  for i, size in enumerate(size_names):
    dense_counts, _, per_step = _counts(base, common, {'arg.size': size, MOE + 'num_experts': 0})
    if param_kind not in dense_counts:
      raise UserError(f"param_kind '{param_kind}' is not one of {sorted(dense_counts)}")
    d = tokens if tokens > 0 else tokens_per_param * dense_counts[param_kind]
    steps = max(min_steps, math.ceil(d / per_step))
    for e, g, s in _variants(experts, granularity, shared):
      moe = moe_settings(base, size, e, g, s, top_k, common)
      counts, _, per_step_run = _counts(base, common, {'arg.size': size, **moe})
      settings = {'arg.size': size, **moe, 'config.train.steps': steps, **(extra or {})}
      if warmup_fraction > 0:
        settings['config.optim.warmup_steps'] = max(1, round(warmup_fraction * steps))
      planned = dict(tokens_per_step=per_step_run, params=counts[param_kind], param_kind=param_kind)
      lrs = (lr_grid or {}).get(e) if i == 0 else None
      for lr in lrs or [None]:
        lr_settings = {} if lr is None else {'config.optim.peak_lr': float(lr)}
        name = _name(size, e, g, s) + ('' if lr is None else f'_lr-{float(lr):.3g}')
        runs.append(spec.Run({**settings, **lr_settings}, name=name, common=dict(common or {}),
                             planned=dict(planned)))
  return [spec.normalise(r) for r in runs]


def moe_isoflop(base: str, budgets, *, size_names, experts=(1, 4, 8), granularity=(1,), shared=(0,),
                top_k: int = 1, per_budget: int = 3, tokens_per_param: float = 20.0, convention: str = 'exact',
                common: dict | None = None, min_steps: int = 20, extra: dict | None = None) -> list[spec.Run]:
  """Per budget C and (E, G, shared): the `per_budget` sizes whose active D/N at C is closest (in log) to
  tokens_per_param, each with steps = round(C / (active FLOPs per token x tokens per step)), the FLOPs in
  `convention` ('exact' = model FLOPs, router included, or '6N'). Named 'C-<budget>_size-<size>_E-<E>...'.
  """
  convention = {'6n': '6N'}.get(convention, convention)
  runs = []
  for e, g, s in _variants(experts, granularity, shared):
    info = {}
    for size in size_names:
      moe = moe_settings(base, size, e, g, s, top_k, common)
      counts, fpt, per_step = _counts(base, common, {'arg.size': size, **moe})
      if convention not in fpt:
        raise UserError(f"convention '{convention}' is not one of {sorted(fpt)}")
      info[size] = (moe, counts['active_non_embedding'], fpt[convention], per_step)
    for c in budgets:
      cands = []
      for size, (_, n, fpt, per_step) in info.items():
        steps = round(c / (fpt * per_step))
        if steps >= min_steps:
          cands.append((abs(math.log(steps * per_step / n / tokens_per_param)), size, steps))
      chosen = sorted(cands)[:per_budget]
      if len(chosen) < min(3, per_budget):
        raise UserError(f'budget C={c:.3g} leaves fewer than 3 sizes with >= {min_steps} steps for E={e}; raise it')
      for _, size, steps in sorted(chosen, key=lambda t: list(size_names).index(t[1])):
        moe, n, _, per_step = info[size]
        runs.append(spec.Run({'arg.size': size, **moe, 'config.train.steps': steps, **(extra or {})},
                             name=f'C-{c:.3g}_{_name(size, e, g, s)}', common=dict(common or {}),
                             planned=dict(tokens_per_step=per_step, params=n, param_kind='active_non_embedding')))
  return [spec.normalise(r) for r in runs]

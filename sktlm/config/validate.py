"""`validate(config, mesh)`: the one check of a config, from the schema plus the few rules across keys.

Called once per config: by training (train/start.py) and `sktlm plan` with the mesh, before the config is
resolved (sktlm/train/resolve.py) and before anything is written; by the sweep's dry run and the CLI for the
other commands that load a config, and for a run's stored config (tools/runs.py), without one. The code below
trusts the config: a rule about a config value is written here once, next to the schema entry it constrains.
Each failure is one UserError line naming the key. A leaf (no jax): `mesh` is anything with a `.shape` mapping
of mesh axis sizes (a jax Mesh), or None to skip the rules that depend on it.
"""

from __future__ import annotations

import math
import re

from sktlm.config.schema import BY_KEY, Key
from sktlm.errors import UserError

_RANGE = re.compile(r'^(>=|>|<)\s*(-?[\d.e+-]+)$|^([\[(])\s*(-?[\d.e+-]+),\s*(-?[\d.e+-]+)\s*([\])])$')


def validate(config, mesh=None) -> None:
  """Raises UserError for the first config value the schema or a cross-key rule refuses."""
  flat = _flatten(config)
  unknown = sorted(set(flat) - set(BY_KEY))
  if unknown:
    raise UserError(f"unknown config key '{unknown[0]}' (not in sktlm/config/schema.py)")
  for key, value in flat.items():
    check_value(BY_KEY[key], value)
  _cross_rules(config)
  if mesh is not None:
    _mesh_rules(config, dict(mesh.shape))


def check_value(entry: Key, value) -> None:
  """Type and allowed values of one key."""
  key, want = entry.key, entry.type
  ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
  if want is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if want is tuple:
    ok = isinstance(value, (tuple, list))
  if not ok:
    raise UserError(f'{key} must be a {want.__name__}, got {value!r}')
  if want in (int, float) and not math.isfinite(value):
    raise UserError(f'{key} must be a finite number, got {value}')
  allowed = entry.allowed
  if isinstance(allowed, tuple) and value not in allowed:
    raise UserError(f"{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
  if isinstance(allowed, str) and not in_range(allowed, value):
    raise UserError(f'{key} must be {rule_text(allowed)}, got {value}')


def rule_text(rule: str) -> str:
  """'>=1' -> '>= 1' (messages and docs)."""
  return re.sub(r'^(>=|>|<)\s*', r'\1 ', rule)


def in_range(rule: str, v) -> bool:
  m = _RANGE.match(rule)
  if not m:
    raise ValueError(f'bad range {rule!r} in the schema')
  op, bound, lo_br, lo, hi, hi_br = m.groups()
  if op:
    b = float(bound)
    return v >= b if op == '>=' else v > b if op == '>' else v < b
  lo, hi = float(lo), float(hi)
  return (v >= lo if lo_br == '[' else v > lo) and (v <= hi if hi_br == ']' else v < hi)


def _cross_rules(config) -> None:
  """Rules across keys, each written once."""
  m, t, d, moe = config.model, config.train, config.data, config.model.moe
  if m.n_heads % m.n_kv_heads:
    raise UserError(f'model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}')
  if not m.head_dim and m.d_model % m.n_heads:
    raise UserError(f'model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}')
  if (m.head_dim or m.d_model // m.n_heads) % 2:
    raise UserError('model.head_dim must be even (RoPE rotates pairs)')
  if m.attention == 'mla' and m.mla.qk_rope_head_dim % 2:
    raise UserError(f'model.mla.qk_rope_head_dim must be even (RoPE rotates pairs), got {m.mla.qk_rope_head_dim}')
  if m.parametrization != 'sp' and m.base_width <= 0:
    raise UserError(f"model.parametrization='{m.parametrization}' needs model.base_width > 0 (the d_model the LR was "
                    'tuned at)')
  if m.parametrization in ('completep', 'depth_mup') and m.base_depth <= 0:
    raise UserError(f"model.parametrization='{m.parametrization}' needs model.base_depth > 0 (the n_layers the LR "
                    'was tuned at)')
  if moe.num_experts > 0 and moe.top_k > moe.num_experts:
    raise UserError(f'model.moe.top_k={moe.top_k} must be <= model.moe.num_experts={moe.num_experts}')
  if moe.num_experts > 0 and moe.top_k == 1 and moe.renormalize:
    raise UserError('model.moe.renormalize with model.moe.top_k=1 makes every gate weight 1: the router gets no '
                    'gradient from the loss; set model.moe.renormalize=False (the gate then scales the expert) or '
                    'top_k >= 2')
  if moe.num_experts > 0 and moe.n_group > 1:
    g, gk, per = moe.n_group, moe.topk_group, moe.num_experts // moe.n_group
    if moe.num_experts % g or per < 2:
      raise UserError(f'model.moe.n_group={g} must divide model.moe.num_experts={moe.num_experts} into groups of '
                      '>= 2 experts')
    if gk > g or gk * per < moe.top_k:
      raise UserError(f'model.moe.topk_group={gk} must be <= model.moe.n_group={g} and leave >= top_k='
                      f'{moe.top_k} experts to choose from ({gk} groups x {per} experts)')
  if moe.num_experts > 0 and moe.dispatch == 'capacity' and moe.capacity_factor <= 0:
    raise UserError('model.moe.dispatch=capacity needs model.moe.capacity_factor > 0')
  if 0 < t.spike_factor <= 1:
    raise UserError(f'train.spike_factor must be 0 (off) or > 1, got {t.spike_factor}')
  if t.batch_size % t.grad_accum:
    raise UserError(f'train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum}')
  if t.init_from and t.init_from_hf:
    raise UserError('set train.init_from or train.init_from_hf, not both')
  if d.name == 'text_files' and not d.path:
    raise UserError("data.name='text_files' needs --config.data.path=FOLDER|GLOB|FILE.txt|FILE.jsonl")


def across_runs(models: dict) -> None:
  """The rule across the runs of one sweep ({run name: its config.model}): muP ('mup') transfers the LR across
  width only, so its runs may not differ in depth unless each sets model.allow_depth_change (e.g. a study of
  that very drift); completep / depth_mup transfer across depth from model.base_depth."""
  depths: dict[int, str] = {}
  for name, m in models.items():
    if m.parametrization == 'mup' and not m.get('allow_depth_change', False):
      depths.setdefault(int(m.n_layers), name)
  if len(depths) > 1:
    sizes = ', '.join(f'{d} ({depths[d]})' for d in sorted(depths))
    raise UserError(f"runs change model.n_layers under model.parametrization='mup' (width-only: the LR does not "
                    f"transfer across depth): n_layers {sizes}; use 'completep' with model.base_depth, or set "
                    'model.allow_depth_change=True')


def _mesh_rules(config, axis_sizes: dict) -> None:
  """Rules that need the mesh: the batch, the experts and the sequence split evenly over their mesh axes."""
  t, moe = config.train, config.model.moe
  micro = t.batch_size // t.grad_accum
  shards = shards_of(config, 'batch', axis_sizes)
  if micro % shards:
    raise UserError(f'micro-batch {micro} (train.batch_size / train.grad_accum) does not divide the '
                    f'{shards} batch shards of the mesh (data x fsdp x expert)')
  experts = shards_of(config, 'exp', axis_sizes)
  if moe.num_experts > 0 and moe.num_experts % experts:
    raise UserError(f'model.moe.num_experts={moe.num_experts} does not divide over the {experts} expert shards '
                    'of the mesh')
  context = axis_sizes.get('context', 1)  # context parallelism (sktlm/model/context.py)
  if context > 1:
    length = dict(config.sharding_rules).get('length')
    if (length if isinstance(length, str) else tuple(length or ())) not in ('context', ('context',)):
      raise UserError(f"mesh.context={context} needs the sharding rule ('length', 'context'), got ('length', "
                      f'{length!r})')
    if config.data.seq_len % context:
      raise UserError(f'data.seq_len={config.data.seq_len} does not divide the context mesh axis ({context} '
                      'devices)')


def shards_of(config, logical: str, axis_sizes: dict) -> int:
  """Devices a logical axis is split over: the product of the mesh axes its first sharding rule names."""
  for name, axes in config.sharding_rules:
    if name == logical:
      axes = axes if isinstance(axes, (tuple, list)) else (axes,)
      return math.prod(axis_sizes.get(a, 1) for a in axes if a is not None)
  return 1


def _flatten(config, prefix: str = '') -> dict:
  out = {}
  for k, v in config.items():
    key = f'{prefix}{k}'
    if hasattr(v, 'items') and key != 'sharding_rules':
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out

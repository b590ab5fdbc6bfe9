"""Value checks of a run's config and workdir, done before a run writes anything (a leaf: no jax).

Types are checked when the config is parsed (sktlm.config.load); here: ranges, and that the workdir can be one.
Each failure is one UserError line naming the key.
"""

from __future__ import annotations

import math
import os

from sktlm.errors import UserError

# (key, lowest allowed value); a key missing from the config (another experiment's schema) is skipped.
_AT_LEAST = (
    ('train.steps', 1), ('train.batch_size', 1), ('train.grad_accum', 1), ('train.log_every', 1),
    ('train.eval_every', 1), ('train.checkpoint_every', 1), ('train.eval_batches', 0),
    ('train.keep_checkpoints', 0), ('train.spike_factor', 0), ('train.spike_window', 1),
    ('train.spike_max_rollbacks', 0), ('train.resume_step', -1),
    ('model.n_layers', 1), ('model.d_model', 1), ('model.n_heads', 1), ('model.n_kv_heads', 1),
    ('model.d_ff', 1), ('model.head_dim', 0), ('model.vocab_size', 0), ('model.vocab_multiple', 1),
    ('model.init_std', 0), ('model.z_loss', 0),
    ('model.moe.num_experts', 0), ('model.moe.top_k', 1), ('model.moe.num_shared_experts', 0),
    ('model.moe.expert_d_ff', 0), ('model.moe.n_dense_layers', 0), ('model.moe.capacity_factor', 0),
    ('data.seq_len', 2), ('data.num_workers', 0),
    ('optim.peak_lr', 0), ('optim.warmup_steps', 0), ('optim.min_lr_ratio', 0), ('optim.eps', 0),
    ('optim.weight_decay', 0), ('optim.clip_norm', 0), ('optim.b1', 0), ('optim.b2', 0),
)
_BELOW_ONE = ('optim.b1', 'optim.b2')
_AT_MOST_ONE = ('optim.min_lr_ratio', 'optim.decay_fraction')
_POSITIVE = ('model.norm_eps', 'model.rope_theta')


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return None
  return node


def _number(key: str, v):
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  if not math.isfinite(v):
    raise UserError(f'{key} must be a finite number, got {v}')
  return v


def check_values(config) -> None:
  """Raises UserError for the first config value out of its range."""
  for key, low in _AT_LEAST:
    v = _number(key, _get(config, key))
    if v is not None and v < low:
      raise UserError(f'{key} must be >= {low}, got {v}')
  for key in _BELOW_ONE:
    v = _number(key, _get(config, key))
    if v is not None and v >= 1:
      raise UserError(f'{key} must be < 1, got {v}')
  for key in _AT_MOST_ONE:
    v = _number(key, _get(config, key))
    if v is not None and not 0 <= v <= 1:
      raise UserError(f'{key} must be in [0, 1], got {v}')
  for key in _POSITIVE:
    v = _number(key, _get(config, key))
    if v is not None and v <= 0:
      raise UserError(f'{key} must be > 0, got {v}')
  factor = _number('train.spike_factor', _get(config, 'train.spike_factor'))
  if factor and factor <= 1:
    raise UserError(f'train.spike_factor must be 0 (off) or > 1, got {factor}')
  experts, top_k = _get(config, 'model.moe.num_experts'), _get(config, 'model.moe.top_k')
  if experts and top_k and top_k > experts:
    raise UserError(f'model.moe.top_k={top_k} must be <= model.moe.num_experts={experts}')


def check_workdir(workdir: str) -> None:
  """The workdir is a folder or can become one."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = 'is' if probe == path else f'is below {probe}, which is'
    raise UserError(f'--workdir {workdir} {where} a file, not a folder')
  if not os.access(probe, os.W_OK):
    raise UserError(f'--workdir {workdir}: {probe} is not writable')

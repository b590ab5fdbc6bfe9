"""optax AdamW (muP: per-class LR multipliers, sktlm/model/mup.py) with a weight-decay mask, global-norm clipping
and learning-rate schedules.

Schedules (config.optim.schedule), all with linear warmup from 0 over warmup_steps:
- cosine: cosine decay from peak_lr to peak_lr * min_lr_ratio at train.steps;
- wsd (warmup-stable-decay): constant peak_lr, then a decay over the last decay_fraction of the steps (or from
  an explicit decay_start step) to peak_lr * min_lr_ratio, shaped linear | cosine | 1-sqrt;
- constant: peak_lr after warmup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sktlm.model import mup

NO_DECAY_NAMES = ('scale', 'bias')  # norm scales and biases are not weight-decayed


def lr_schedule(optim_cfg, total_steps: int):
  o = optim_cfg
  peak, floor = o.peak_lr, o.peak_lr * o.min_lr_ratio
  warmup = max(int(o.warmup_steps), 0)
  if o.schedule == 'wsd':  # schedule and decay_shape are among the schema's choices (validate)
    decay_start = o.decay_start if o.decay_start >= 0 else int(round(total_steps * (1 - o.decay_fraction)))
    decay_len = max(total_steps - decay_start, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum((step + 1) / max(warmup, 1), 1.0) if warmup > 0 else peak
    if o.schedule == 'constant':
      return jnp.asarray(warm, jnp.float32)
    if o.schedule == 'cosine':
      frac = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
      decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
      return jnp.where(step < warmup, warm, decayed)
    frac = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)
    shape = {'linear': 1 - frac, 'cosine': 0.5 * (1 + jnp.cos(jnp.pi * frac)),
             '1-sqrt': 1 - jnp.sqrt(frac)}[o.decay_shape]
    decayed = floor + (peak - floor) * shape
    return jnp.where(step < warmup, warm, jnp.where(step < decay_start, peak, decayed))

  return schedule


def decay_mask(params):
  def keep(path, _):
    # The last dict key names the parameter (boxed params add a trailing `.value` attribute key).
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return not names or names[-1] not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(keep, params)


def mup_adamw(optim_cfg, schedule, model_cfg) -> optax.GradientTransformation:
  """optax.adamw with muP's per-class LR multipliers (sktlm/model/mup.py) on the Adam direction only: the decoupled
  weight decay stays schedule x weight_decay for every class ("independent" decay, see mup.py). With all
  multipliers 1 it is optax.adamw step for step."""
  o = optim_cfg
  scales = {k: optax.scale(v) for k, v in mup.lr_multipliers(model_cfg).items()}
  return optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                     optax.multi_transform(scales, mup.param_labels),
                     optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
                     optax.scale_by_learning_rate(schedule))


def make_optimizer(optim_cfg, total_steps: int, model_cfg=None) -> tuple[optax.GradientTransformation, object]:
  """AdamW (SP), or AdamW with muP's per-parameter LR multipliers when model_cfg says parametrization='mup'."""
  o = optim_cfg
  schedule = lr_schedule(o, total_steps)
  parts = []
  if o.clip_norm and o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  if model_cfg is not None and mup.is_mup(model_cfg):
    parts.append(mup_adamw(o, schedule, model_cfg))
  else:
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
  return optax.chain(*parts), schedule

"""optax AdamW (muP: per-class LR multipliers; CompleteP / depth-muP: per-class LR, epsilon and decay multipliers;
the rules are sktlm/model/mup.py's) with a weight-decay mask, global-norm clipping and learning-rate schedules.

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


def scale_by_classwise_adamw(b1: float, b2: float, eps: float, weight_decay: float, model_cfg
                             ) -> optax.GradientTransformation:
  """Adam's direction with a per-class epsilon and LR multiplier, plus the decoupled decay with a per-class
  multiplier (mup.eps_multipliers, lr_multipliers, decay_multipliers; norms not decayed), before x -lr.

  optax.scale_by_adam has one epsilon; this is its update written out (the same optax.tree moment and bias
  correction helpers, the same state) with eps per leaf, so with every multiplier 1 it computes exactly what
  optax.adamw's scale_by_adam + add_decayed_weights compute: SP step for step (tests/test_completep.py)."""
  lr_m, eps_m, wd_m = (f(model_cfg) for f in (mup.lr_multipliers, mup.eps_multipliers, mup.decay_multipliers))

  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params):
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat, nu_hat = optax.tree.bias_correction(mu, b1, count), optax.tree.bias_correction(nu, b2, count)

    def leaf(m, v, p, cls, decayed):
      u = m / (jnp.sqrt(v + 0.0) + eps * eps_m[cls])
      if lr_m[cls] != 1.0:
        u = u * lr_m[cls]
      return u + (weight_decay * wd_m[cls]) * p if decayed and weight_decay else u

    out = jax.tree.map(leaf, mu_hat, nu_hat, params, mup.param_labels(params), decay_mask(params))
    nu = optax.tree.cast_like(nu, state.nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_cfg, total_steps: int, model_cfg=None) -> tuple[optax.GradientTransformation, object]:
  """AdamW (SP); with muP's per-parameter LR multipliers when model_cfg says parametrization='mup'; with the
  per-class LR, epsilon and decay of CompleteP / depth-muP under 'completep' / 'depth_mup'."""
  o = optim_cfg
  schedule = lr_schedule(o, total_steps)
  parts = []
  if o.clip_norm and o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  if model_cfg is not None and mup.depth_alpha(model_cfg):
    parts += [scale_by_classwise_adamw(o.b1, o.b2, o.eps, o.weight_decay, model_cfg),
              optax.scale_by_learning_rate(schedule)]
  elif model_cfg is not None and mup.is_mup(model_cfg):
    parts.append(mup_adamw(o, schedule, model_cfg))
  else:
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
  return optax.chain(*parts), schedule

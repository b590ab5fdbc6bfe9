"""Coordinate check (Yang et al. 2022, TP5 section 5 / appendix): train one config at several widths for a few
steps under SP and muP, and measure the RMS of every layer's activations and of the logits against width.

Under muP, a coordinate's typical size does not depend on width at any step (log-log slope ~0); under SP the
hidden activations grow like sqrt(width) at init (constant init_std), and after a few Adam steps the logits grow
~linearly with width (each step moves the head by ~lr per coordinate, summed over d_model inputs).

Width is d_model, with d_ff scaled in proportion and n_heads fixed (so d_head grows with width, and the attention
1/d_head rule of muP matters); depth, data, batch and seed are the config's. Training uses a constant LR with no
warmup (a warmup would hide the first steps). The model runs unscanned so that every layer is its own module;
activations are captured with Flax's capture_intermediates. It runs on one device.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sktlm import data, sharding
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.train import resolve, step


@dataclasses.dataclass
class Result:
  widths: list[int]
  steps: int
  # rms[parametrization][coordinate] = array [n_widths, steps + 1] (column t: before update t+1; 0 = init)
  rms: dict[str, dict[str, np.ndarray]]
  losses: dict[str, np.ndarray]       # [n_widths, steps] train loss per step

  def slopes(self, parametrization: str) -> dict[str, np.ndarray]:
    """d log(rms) / d log(width) per coordinate and step (least squares over the widths)."""
    x = np.log(np.asarray(self.widths, np.float64))
    out = {}
    for name, r in self.rms[parametrization].items():
      y = np.log(r)
      xc = x - x.mean()
      out[name] = (xc[:, None] * (y - y.mean(axis=0))).sum(axis=0) / (xc**2).sum()
    return out


def width_config(config, width: int, parametrization: str, base_width: int):
  """`config` at d_model = width (d_ff in proportion, rounded to a multiple of 8; heads fixed), unscanned."""
  c = config.copy_and_resolve_references()
  m = c.model
  if width % m.n_heads or (width // m.n_heads) % 2:
    raise UserError(f'width {width} must be a multiple of n_heads={m.n_heads} with an even head_dim')
  with c.unlocked():
    ratio = m.d_ff / m.d_model
    m.d_ff = max(8, int(round(width * ratio / 8)) * 8)
    m.d_model = width
    m.head_dim = 0
    m.parametrization = parametrization
    m.base_width = base_width
    m.scan_layers = False
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
  return c


def _rms(x):
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _stats_fn(setup):
  """jitted (params, batch) -> {coordinate: RMS}: embedding rows, each layer's attention / MLP output and
  residual stream, and the logits."""
  def is_call(_, method_name):
    return method_name == '__call__'

  def stats(params, batch):
    (logits, _), state = setup.model.apply({'params': params}, batch['inputs'], batch['positions'],
                                           batch['segment_ids'], capture_intermediates=is_call,
                                           mutable=['intermediates'])
    inter = state['intermediates']
    out = {'embedding': _rms(jnp.take(nn.meta.unbox(params['embedding']), batch['inputs'], axis=0))}
    for name in sorted(k for k in inter if k.startswith('layers_')):
      layer = inter[name]
      out[f'{name}/attn'] = _rms(layer['attn']['__call__'][0])
      out[f'{name}/mlp'] = _rms(layer['mlp']['__call__'][0])
      out[f'{name}/out'] = _rms(layer['__call__'][0][0])
    out['logits'] = _rms(logits)
    return out

  return jax.jit(stats)


def run(config, widths, steps: int, parametrizations=('sp', 'mup'), base_width: int = 0, log=None) -> Result:
  """Trains `config` at each width for `steps` steps per parametrization; base_width 0: the smallest width."""
  widths = sorted(int(w) for w in widths)
  if len(widths) < 2:
    raise UserError('coord-check needs at least two widths')
  if steps < 1:
    raise UserError(f'--steps must be >= 1, got {steps}')
  if config.model.moe.num_experts > 0:
    raise UserError('coord-check measures dense models (model.moe.num_experts=0)')
  base_width = base_width or widths[0]
  data.prepare(config.data)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])  # small models: one device
  with config.unlocked():
    resolve.resolve(config, mesh)  # once: the width configs copy the vocab and the platform choices
  rms: dict[str, dict[str, np.ndarray]] = {}
  losses: dict[str, np.ndarray] = {}
  for p in parametrizations:
    per_width, loss_rows = [], []
    for w in widths:
      c = width_config(config, w, p, base_width)
      validate(c, mesh)  # a new config: its width, parametrization and base width
      setup = step.build(c, mesh)
      stats = _stats_fn(setup)
      it = data.make_train_iter(c.data, batch_size=c.train.batch_size, seed=c.seed)
      state = setup.init_state(jax.random.PRNGKey(c.seed))
      rows, losses_w = [], []
      for t in range(steps + 1):
        batch = step.device_batch(next(it), setup, c.train.batch_size)
        rows.append({k: float(v) for k, v in stats(state.params, batch).items()})
        if t < steps:
          state, m = setup.train_step(state, batch)
          losses_w.append(float(m['loss']))
      per_width.append(rows)
      loss_rows.append(losses_w)
      if log:
        log(f'{p} width {w}: logits RMS ' + ' '.join(f"{r['logits']:.3g}" for r in rows)
            + f"; loss {losses_w[0]:.3f} -> {losses_w[-1]:.3f}")
    names = list(per_width[0][0])
    rms[p] = {n: np.array([[r[n] for r in rows] for rows in per_width]) for n in names}
    losses[p] = np.array(loss_rows)
  return Result(widths=widths, steps=steps, rms=rms, losses=losses)



def summary_kinds(names) -> dict[str, list[str]]:
  """Coordinates grouped by kind: embedding, attn, mlp, out (residual stream), logits."""
  kinds: dict[str, list[str]] = {}
  for n in names:
    kinds.setdefault(n.split('/')[-1], []).append(n)
  return kinds


def format_table(result: Result) -> str:
  """Per parametrisation: the log-log slope of RMS against width, per coordinate kind (layer mean) and step."""
  lines = [f"coord check: widths {', '.join(map(str, result.widths))}; slope = d log RMS / d log width "
           f'(0 = width-independent); step t = before update t+1']
  head = ' '.join(f't={t:<5d}' for t in range(result.steps + 1))
  for p in result.rms:
    sl = result.slopes(p)
    lines.append(f'{p}:{"":10s} {head}')
    for kind, names in summary_kinds(sl).items():
      s = np.mean([sl[n] for n in names], axis=0)
      lines.append(f'  {kind:<10s} ' + ' '.join(f'{v:+7.2f}' for v in s))
    lines.append(f"  {'loss':<10s} " + ' '.join(f'{v:7.3f}' for v in result.losses[p][:, -1])
                 + '  (final, per width)')
  return '\n'.join(lines)


def plot(result: Result, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  ps = list(result.rms)
  kinds = summary_kinds(result.rms[ps[0]])
  fig, axes = plt.subplots(len(ps), len(kinds), figsize=(3.2 * len(kinds), 3.0 * len(ps)), squeeze=False)
  cmap = plt.get_cmap('viridis')
  for i, p in enumerate(ps):
    for j, (kind, names) in enumerate(kinds.items()):
      ax = axes[i][j]
      r = np.exp(np.mean([np.log(result.rms[p][n]) for n in names], axis=0))  # geometric mean over layers
      for t in range(result.steps + 1):
        ax.plot(result.widths, r[:, t], 'o-', color=cmap(t / max(result.steps, 1)), label=f't={t}', ms=3)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_title(f'{p}: {kind}', fontsize=9)
      ax.set_xlabel('width (d_model)', fontsize=8)
      if j == 0:
        ax.set_ylabel('RMS', fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

"""Coordinate check (Yang et al. 2022, TP5 section 5 / appendix): train one config at several widths (or depths)
for a few steps per parametrisation, and measure the RMS of every layer's activations and of the logits against
width (or depth).

Width: under muP a coordinate's typical size does not depend on width at any step (log-log slope ~0); under SP
the hidden activations grow like sqrt(width) at init (constant init_std), and after a few Adam steps the logits
grow ~linearly with width (each step moves the head by ~lr per coordinate, summed over d_model inputs). Width is
d_model, with d_ff scaled in proportion and n_heads fixed (so d_head grows with width, and the attention 1/d_head
rule of muP matters); depth, data, batch and seed are the config's. The model runs unscanned so that every layer
is its own module; activations are captured with Flax's capture_intermediates.

Depth (`run_depth`, Dey et al. 2025, Fig. 7): n_layers varies at the config's width (base width = d_model, so
m_N = 1), base depth the smallest. Besides the activations it measures their updates: the RMS of
(activation after t steps - activation at init) on one fixed probe batch. Under mup every layer's branch moves by
O(lr) per step whatever the depth, so the residual stream and the logits move ~ L times one layer's update
(slope ~+1 against depth); under completep the branches carry m_L^-1 and the sums stay put (slope ~0). The model
runs scanned (one rolled layer: compile time does not grow with depth), the per-layer captures stacked by scan.

Training uses a constant LR with no warmup (a warmup would hide the first steps), on one device.
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
  sizes: list[int]                    # widths (d_model) or depths (n_layers)
  steps: int
  # rms[parametrization][coordinate] = array [n_sizes, steps + 1] (column t: before update t+1; 0 = init)
  rms: dict[str, dict[str, np.ndarray]]
  losses: dict[str, np.ndarray]       # [n_sizes, steps] train loss per step
  axis: str = 'width'
  # depth only: layers[parametrization][i_size][kind] = array [n_layers, steps + 1] (per-layer profiles)
  layers: dict = dataclasses.field(default_factory=dict)

  @property
  def widths(self) -> list[int]:
    return self.sizes

  def slopes(self, parametrization: str) -> dict[str, np.ndarray]:
    """d log(rms) / d log(size) per coordinate and step (least squares over the sizes; nan where a size's RMS is
    0, e.g. an update at init)."""
    x = np.log(np.asarray(self.sizes, np.float64))
    out = {}
    for name, r in self.rms[parametrization].items():
      with np.errstate(divide='ignore', invalid='ignore'):
        y = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), np.nan)
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
  mesh = _prepare(config)
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
  return Result(sizes=widths, steps=steps, rms=rms, losses=losses)


def depth_config(config, depth: int, parametrization: str, base_depth: int):
  """`config` at n_layers = depth under `parametrization` (base width = its d_model: m_N = 1), scanned with one
  layer per scan iteration (compile time independent of depth)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.model.update(n_layers=depth, parametrization=parametrization, base_width=c.model.d_model,
                   base_depth=base_depth, scan_layers=True, scan_unroll=1, allow_depth_change=True)
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
  return c


DEPTH_KINDS = ('attn', 'mlp', 'out')  # per layer: each branch's output (before m_L^-alpha) and the residual stream


def _depth_stats_fn(setup):
  """jitted (params, params at init, probe batch) -> per-layer RMS [n_layers] of each kind and of its update
  (activation now - at init, on the same batch), and the logits' RMS and update (scalars)."""
  def is_call(_, method_name):
    return method_name == '__call__'

  def acts(params, batch):
    (logits, _), state = setup.model.apply({'params': params}, batch['inputs'], batch['positions'],
                                           batch['segment_ids'], capture_intermediates=is_call,
                                           mutable=['intermediates'])
    layers = state['intermediates']['layers']  # stacked by nn.scan: [n_layers, B, T, D]
    return dict(attn=layers['attn']['__call__'][0], mlp=layers['mlp']['__call__'][0],
                out=layers['__call__'][0][0], logits=logits[None])

  def rms_per_layer(x):
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim))))

  def stats(params, params0, batch):
    now, init = acts(params, batch), acts(params0, batch)
    out = {}
    for k in now:
      out[k] = rms_per_layer(now[k])
      out[f'{k}_update'] = rms_per_layer(now[k] - init[k])
    return out

  return jax.jit(stats)


def run_depth(config, depths, steps: int, parametrizations=('mup', 'completep'), base_depth: int = 0,
              log=None) -> Result:
  """Trains `config` at each depth for `steps` steps per parametrization (base depth 0: the smallest). Coordinates
  (Result.rms): the attention and MLP branch outputs (geometric mean over the layers: each layer's own size), the
  residual stream after the last layer ('out'; a mean over layers would mix positions i / L whose share of the
  accumulated stream differs), the logits, and the update of each since init (`_update`, 0 at init);
  Result.layers keeps the per-layer profiles."""
  depths = sorted(int(d) for d in depths)
  if len(depths) < 2 or depths[0] < 1:
    raise UserError(f'coord-check needs at least two depths >= 1, got {depths}')
  if steps < 1:
    raise UserError(f'--steps must be >= 1, got {steps}')
  if config.model.moe.num_experts > 0:
    raise UserError('coord-check measures dense models (model.moe.num_experts=0)')
  base_depth = base_depth or depths[0]
  mesh = _prepare(config)
  rms: dict[str, dict[str, np.ndarray]] = {}
  losses: dict[str, np.ndarray] = {}
  layers: dict[str, list] = {}
  for p in parametrizations:
    rows_p, losses_p, layers[p] = [], [], []
    for d in depths:
      c = depth_config(config, d, p, base_depth)
      validate(c, mesh)  # a new config: its depth, parametrization and base depth
      setup = step.build(c, mesh)
      stats = _depth_stats_fn(setup)
      it = data.make_train_iter(c.data, batch_size=c.train.batch_size, seed=c.seed)
      state = setup.init_state(jax.random.PRNGKey(c.seed))
      params0 = jax.tree.map(jnp.copy, state.params)  # the train step donates the state
      probe = step.device_batch(next(it), setup, c.train.batch_size)
      per_step, losses_d = [], []
      for t in range(steps + 1):
        per_step.append({k: np.asarray(v, np.float64) for k, v in stats(state.params, params0, probe).items()})
        if t < steps:
          state, m = setup.train_step(state, step.device_batch(next(it), setup, c.train.batch_size))
          losses_d.append(float(m['loss']))
      prof = {k: np.stack([s[k] for s in per_step], axis=1) for k in per_step[0]}  # [n_layers (or 1), steps + 1]
      layers[p].append({k: v for k, v in prof.items() if not k.startswith('logits')})
      row = {}
      for k, v in prof.items():
        if k.startswith(('logits', 'out')):  # the residual stream: at the last layer, what the head reads
          row[k] = v[-1]
        else:  # each branch's own output: the geometric mean over the layers (an update of 0 stays 0)
          with np.errstate(divide='ignore'):
            row[k] = np.exp(np.mean(np.log(v), axis=0))
      rows_p.append(row)
      losses_p.append(losses_d)
      if log:
        log(f"{p} depth {d}: last-layer residual update RMS {' '.join(f'{x:.3g}' for x in row['out_update'])}"
            f"; loss {losses_d[0]:.3f} -> {losses_d[-1]:.3f}")
    rms[p] = {k: np.array([r[k] for r in rows_p]) for k in rows_p[0]}
    losses[p] = np.array(losses_p)
  return Result(sizes=depths, steps=steps, rms=rms, losses=losses, axis='depth', layers=layers)


def flat(result: Result, parametrization: str, after: int = 1, tol: float = 0.3) -> dict[str, float]:
  """The coordinates whose |d log RMS / d log size| reaches `tol` at some step >= `after`: {name: worst slope};
  empty when every coordinate is size-independent (the check passes)."""
  out = {}
  for name, s in result.slopes(parametrization).items():
    worst = s[after:][np.argmax(np.abs(np.nan_to_num(s[after:])))]
    if abs(worst) >= tol:
      out[name] = float(worst)
  return out


def _prepare(config):
  """The data and a one-device mesh (small models), and `config` resolved once: the width and depth configs
  copy its vocab and platform choices."""
  data.prepare(config.data)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  with config.unlocked():
    resolve.resolve(config, mesh)
  return mesh


def summary_kinds(names) -> dict[str, list[str]]:
  """Coordinates grouped by kind: embedding, attn, mlp, out (residual stream), logits."""
  kinds: dict[str, list[str]] = {}
  for n in names:
    kinds.setdefault(n.split('/')[-1], []).append(n)
  return kinds


def format_table(result: Result) -> str:
  """Per parametrisation: the log-log slope of RMS against width (depth), per coordinate kind (layer mean) and
  step."""
  ax = result.axis
  lines = [f"coord check: {ax}s {', '.join(map(str, result.sizes))}; slope = d log RMS / d log {ax} "
           f'(0 = {ax}-independent); step t = before update t+1'
           + ('; _update = RMS of (now - init) on one probe batch' if ax == 'depth' else '')]
  head = ' '.join(f't={t:<5d}' for t in range(result.steps + 1))
  for p in result.rms:
    sl = result.slopes(p)
    lines.append(f'{p}:{"":10s} {head}')
    for kind, names in summary_kinds(sl).items():
      s = np.mean([sl[n] for n in names], axis=0)
      lines.append(f'  {kind:<10s} ' + ' '.join(f'{v:+7.2f}' for v in s))
    lines.append(f"  {'loss':<10s} " + ' '.join(f'{v:7.3f}' for v in result.losses[p][:, -1])
                 + f'  (final, per {ax})')
  return '\n'.join(lines)


def plot(result: Result, path: str) -> None:
  """RMS against width (depth) per coordinate kind, one curve per step; a depth check also writes the per-layer
  profiles at the last step beside it (<path stem>_layers.png)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  ps = list(result.rms)
  kinds = summary_kinds(result.rms[ps[0]])
  fig, axes = plt.subplots(len(ps), len(kinds), figsize=(3.2 * len(kinds), 3.0 * len(ps)), squeeze=False,
                           sharey='col')  # one scale per coordinate: the parametrisations compare by eye
  cmap = plt.get_cmap('viridis')
  for i, p in enumerate(ps):
    for j, (kind, names) in enumerate(kinds.items()):
      ax = axes[i][j]
      with np.errstate(divide='ignore'):
        r = np.exp(np.mean([np.log(result.rms[p][n]) for n in names], axis=0))  # geometric mean over layers
      for t in range(result.steps + 1):
        if np.all(r[:, t] > 0):  # an update is 0 at init: nothing to draw on a log axis
          ax.plot(result.sizes, r[:, t], 'o-', color=cmap(t / max(result.steps, 1)), label=f't={t}', ms=3)
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_title(f'{p}: {kind}', fontsize=9)
      ax.set_xlabel('width (d_model)' if result.axis == 'width' else 'depth (n_layers)', fontsize=8)
      if j == 0:
        ax.set_ylabel('RMS', fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  if result.layers:
    _plot_layers(result, path.rsplit('.', 1)[0] + '_layers.png', plt)


def _plot_layers(result: Result, path: str, plt) -> None:
  """Per-layer RMS at the last step against the layer's relative position (i + 1) / L, one curve per depth: the
  curves lie on one another when every layer's size is depth-independent."""
  ps = list(result.layers)
  kinds = list(result.layers[ps[0]][0])
  fig, axes = plt.subplots(len(ps), len(kinds), figsize=(3.2 * len(kinds), 3.0 * len(ps)), squeeze=False,
                           sharey='col')
  cmap = plt.get_cmap('plasma')
  for i, p in enumerate(ps):
    for j, kind in enumerate(kinds):
      ax = axes[i][j]
      for k, (depth, prof) in enumerate(zip(result.sizes, result.layers[p], strict=True)):
        ax.plot((np.arange(depth) + 1) / depth, prof[kind][:, -1], 'o-', ms=2,
                color=cmap(k / max(len(result.sizes) - 1, 1)), label=f'L={depth}')
      ax.set_yscale('log')
      ax.set_title(f'{p}: {kind}, step {result.steps}', fontsize=9)
      ax.set_xlabel('layer / L', fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)

"""The learning rate behind every point: per model (a group of runs that differ only in peak LR), the best LR,
the optimum between grid points, and whether the best LR sits at the edge of its grid.

A group is one parametrisation (sp | mup, with its base width), one model shape and one token budget; its runs
may differ only in `optim.peak_lr`. For a group with >= 3 LRs, the optimal LR is the vertex of a parabola of
loss against log LR through the best grid point and up to two neighbours on each side; its interval is the
CI_LEVEL percentile interval of the vertex over residual-bootstrap refits (>= 4 points; with 3 the parabola
interpolates and the interval is the bracket between the best point's neighbours). A best LR at either end of the
grid is flagged: the optimum is outside it, and the point's loss is not its best. Across widths, the drift is
the least-squares slope of log LR* against log width per parametrisation (muP: ~0; SP with Adam: ~ -1).
Across depths (models that differ only in n_layers, e.g. sweeps/depth_lr.py), the drift is the slope of log LR*
against log depth and the ratio LR*(deepest) / LR*(shallowest), each with the percentile interval of the same
statistic over the groups' bootstrap refits (completep: within one 2x step; mup: drifts).

Reads each run's config.json (no jax), so it works on any sweep folder: `sktlm scaling` adds the section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from sktlm import runfiles
from sktlm.scaling import fit as fitlib
from sktlm.scaling import io

DEPTH_PARAMETRIZATIONS = ('completep', 'depth_mup')  # those with a model.base_depth (sktlm/model/mup.py)


@dataclasses.dataclass
class Group:
  parametrization: str
  base_width: int
  width: int
  shape: tuple              # (n_layers, d_model, n_heads, d_ff)
  tokens: float
  n: float                  # non-embedding parameters
  lrs: np.ndarray           # sorted grid of peak LRs of the done runs
  losses: np.ndarray
  names: list
  failed_lrs: list = dataclasses.field(default_factory=list)   # runs that did not finish (e.g. diverged)
  opt: dict = dataclasses.field(default_factory=dict)
  base_depth: int = 0       # completep / depth_mup

  @property
  def label(self) -> str:
    base = f', base {self.base_width}' if self.parametrization != 'sp' else ''
    base += f' x L {self.base_depth}' if self.base_depth else ''
    moe = f', MoE E {self.shape[4]} top-{self.shape[5]}' if len(self.shape) > 4 else ''
    return f'{self.parametrization}{base}, d_model {self.width}, L {self.shape[0]}{moe}'


def _moe_key(moe: dict) -> tuple:
  """MoE runs of one dense shape differ in their routed experts: (E, top_k, expert d_ff, shared), () if dense."""
  e = int(moe.get('num_experts', 0) or 0)
  if not e:
    return ()
  return (e, int(moe.get('top_k', 0)), int(moe.get('expert_d_ff', 0)), int(moe.get('num_shared_experts', 0)))


def _run_config(row) -> dict | None:
  wd = row.get('workdir') or ''
  try:
    return runfiles.load(wd, runfiles.CONFIG)
  except (OSError, json.JSONDecodeError):
    return None


def groups(rows, loss_col: str) -> list[Group]:
  """Runs grouped by everything but the LR (from their config.json); rows without one are left out."""
  found: dict[tuple, dict] = {}
  for r in rows:
    cfg = _run_config(r)
    if cfg is None:
      continue
    m, o = cfg.get('model', {}), cfg.get('optim', {})
    p = m.get('parametrization', 'sp')
    key = (p, int(m.get('base_width', 0)) if p != 'sp' else 0, int(m.get('n_layers', 0)), int(m.get('d_model', 0)),
           int(m.get('n_heads', 0)), int(m.get('d_ff', 0)), float(r.get('tokens', math.nan)),
           _moe_key(m.get('moe') or {}), int(m.get('base_depth', 0)) if p in DEPTH_PARAMETRIZATIONS else 0)
    g = found.setdefault(key, dict(points=[], failed=[], n=r.get('n_params_non_embedding', math.nan)))
    lr, loss = float(o.get('peak_lr', math.nan)), float(r.get(loss_col, math.nan))
    if r.get('status') == runfiles.DONE and math.isfinite(loss):
      g['points'].append((lr, loss, r.get('name', '?')))
    else:
      g['failed'].append(lr)
  out = []
  for (p, bw, nl, d, h, ff, tokens, moe, bd), g in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][2],
                                                                                       kv[0][7])):
    if not g['points']:  # nothing finished (pending, or every LR failed): no optimum to report
      continue
    by_lr: dict[float, list] = {}
    for lr, loss, name in g['points']:  # repeated seeds at one LR: their mean (one point per LR)
      by_lr.setdefault(lr, []).append((loss, name))
    pts = sorted((lr, float(np.mean([x[0] for x in v])), v[0][1]) for lr, v in by_lr.items())
    out.append(Group(p, bw, d, (nl, d, h, ff) + moe, tokens, g['n'], np.array([x[0] for x in pts]),
                     np.array([x[1] for x in pts]), [x[2] for x in pts], sorted(g['failed']), base_depth=bd))
  return out


def _vertex(x, y) -> float:
  a, b, _ = np.polyfit(x, y, 2)
  return -b / (2 * a) if a > 0 else math.nan


def optimum(lrs, losses, n_boot: int = 200, seed: int = 0) -> dict:
  """Optimal LR of one group: best grid LR, parabola vertex in log LR, its interval, and the edge flag."""
  lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
  i = int(np.argmin(losses))
  out = dict(best_lr=float(lrs[i]), best_loss=float(losses[i]), n_lrs=len(lrs), edge='', lr_opt=math.nan,
             ci=(math.nan, math.nan))
  if len(lrs) < 3:
    return out
  if i == 0 or i == len(lrs) - 1:
    out['edge'] = 'low' if i == 0 else 'high'
    return out
  lo, hi = max(0, i - 2), min(len(lrs), i + 3)
  x, y = np.log(lrs[lo:hi]), losses[lo:hi]
  v = _vertex(x, y)
  if not math.isfinite(v):
    return out
  v = float(np.clip(v, np.log(lrs[i - 1]), np.log(lrs[i + 1])))
  out['lr_opt'] = math.exp(v)
  if len(x) < 4 or n_boot <= 0:
    out['ci'] = (float(lrs[i - 1]), float(lrs[i + 1]))
    return out
  coef = np.polyfit(x, y, 2)
  fitted = np.polyval(coef, x)
  resid = (y - fitted) * math.sqrt(len(x) / (len(x) - 3))  # inflate for the 3 fitted coefficients
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_boot):
    vb = _vertex(x, fitted + rng.choice(resid, size=len(x), replace=True))
    if math.isfinite(vb):
      boot.append(np.clip(vb, np.log(lrs[i - 1]), np.log(lrs[i + 1])))
  lo_ci, hi_ci = fitlib.interval(np.array(boot))
  out['ci'] = (math.exp(lo_ci), math.exp(hi_ci)) if math.isfinite(lo_ci) else (float(lrs[i - 1]), float(lrs[i + 1]))
  out['_boot'] = np.array(boot)  # log LR* per refit, for the depth drift's interval (not written to the JSON)
  return out


def drift(gs: list[Group]) -> dict[str, float]:
  """Per parametrisation: slope of log(optimal LR) against log(width) over groups with an interior optimum."""
  out = {}
  for p in sorted({g.parametrization for g in gs}):
    pts = [(g.width, g.opt['lr_opt']) for g in gs if g.parametrization == p and math.isfinite(g.opt['lr_opt'])]
    if len({w for w, _ in pts}) >= 2:
      x, y = np.log([w for w, _ in pts]), np.log([v for _, v in pts])
      out[p] = float(np.polyfit(x, y, 1)[0])
  return out


def depth_drift(gs: list[Group], n_boot: int = 200, seed: int = 0) -> list[dict]:
  """Per family of groups that differ only in depth (parametrisation, base, width, tokens, MoE shape), with >= 2
  depths that have an interior optimum: the least-squares slope of log LR* against log depth and the ratio
  LR*(deepest) / LR*(shallowest), each with the percentile interval over the groups' bootstrap refits (the b-th
  refit of every depth together; a depth with no bootstrap, e.g. 3 LRs, gives no interval)."""
  fams: dict[tuple, list[Group]] = {}
  for g in gs:
    fams.setdefault((g.parametrization, g.base_width, g.base_depth, g.width, g.tokens, g.shape[2:]), []).append(g)
  rng = np.random.default_rng(seed)
  out = []
  for (p, bw, bd, width, *_), every in sorted(fams.items(), key=lambda kv: kv[0][:4]):
    if len({g.shape[0] for g in every}) < 2:
      continue
    fam = sorted((g for g in every if math.isfinite(g.opt.get('lr_opt', math.nan))), key=lambda g: g.shape[0])
    edges = sorted(g.shape[0] for g in every if not math.isfinite(g.opt.get('lr_opt', math.nan)))
    depths = np.log([g.shape[0] for g in fam])
    if len(set(depths)) < 2:
      out.append(dict(parametrization=p, base_width=bw, base_depth=bd, width=width, depths=[], lr_opt=[],
                      slope=math.nan, slope_ci=(math.nan, math.nan), ratio=math.nan, ratio_ci=(math.nan, math.nan),
                      edges=edges))
      continue
    y = np.log([g.opt['lr_opt'] for g in fam])
    slope = float(np.polyfit(depths, y, 1)[0])
    boots = [g.opt.get('_boot') for g in fam]
    slope_ci, ratio_ci = (math.nan, math.nan), (math.nan, math.nan)
    if all(b is not None and len(b) for b in boots):
      draws = np.stack([rng.choice(b, size=n_boot) for b in boots])  # [depths, n_boot]
      slopes = np.polyfit(depths, draws, 1)[0]
      slope_ci = fitlib.interval(slopes)
      ratio_ci = tuple(math.exp(v) for v in fitlib.interval(draws[-1] - draws[0]))
    out.append(dict(parametrization=p, base_width=bw, base_depth=bd, width=width,
                    depths=[g.shape[0] for g in fam], lr_opt=[g.opt['lr_opt'] for g in fam], slope=slope,
                    slope_ci=slope_ci, ratio=math.exp(y[-1] - y[0]), ratio_ci=ratio_ci, edges=edges))
  return out


def _depth_lines(lab: str, drifts: list[dict]) -> list[str]:
  lines = []
  for d in drifts:
    if not d['depths']:
      lines.append(f"- **{lab}**, {d['parametrization']} (d_model {d['width']}): no drift measured, fewer than two "
                   f"depths have an interior optimum (best LR at the grid's edge at L "
                   f"{', '.join(map(str, d['edges']))}: widen the grid)")
      continue
    lo, hi = d['ratio_ci']
    within = 'within one 2x step' if 0.5 <= d['ratio'] <= 2 else 'MORE than one 2x step'
    if math.isfinite(lo):
      within += ' (interval inside [0.5, 2])' if 0.5 <= lo and hi <= 2 else ' (interval reaches past [0.5, 2])'
    edges = (f"; EDGE (or no optimum) at L {', '.join(map(str, d['edges']))}: left out" if d['edges'] else '')
    lines.append(f"- **{lab}**, {d['parametrization']} (d_model {d['width']}): optimal LR ~ depth^{d['slope']:+.2f} "
                 f"[{_g(d['slope_ci'][0], 2)}, {_g(d['slope_ci'][1], 2)}]; L {d['depths'][0]} -> {d['depths'][-1]}: "
                 f"x{d['ratio']:.2f} [{_g(lo)}, {_g(hi)}], {within}{edges}")
  return lines


def _g(v, digits: int = 3) -> str:
  return '-' if v is None or not math.isfinite(v) else f'{v:.{digits}g}'


def plot(label_groups, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  ps = sorted({(lab, g.parametrization) for lab, gs in label_groups for g in gs if len(g.lrs) >= 2})
  fig, axes = plt.subplots(1, len(ps), figsize=(5 * len(ps), 3.8), squeeze=False)
  for ax, (lab, p) in zip(axes[0], ps, strict=True):
    gs = [g for la, gg in label_groups if la == lab for g in gg if g.parametrization == p and len(g.lrs) >= 2]
    cmap = plt.get_cmap('viridis')
    shapes = sorted({(g.width, g.shape[0]) for g in gs})
    for g in gs:
      c = cmap(shapes.index((g.width, g.shape[0])) / max(len(shapes) - 1, 1))
      ax.plot(g.lrs, g.losses, 'o-', color=c, label=f'd_model {g.width} (L {g.shape[0]})', ms=4)
      if math.isfinite(g.opt.get('lr_opt', math.nan)):
        ax.axvline(g.opt['lr_opt'], color=c, ls=':', lw=1)
    ax.set_xscale('log')
    ax.set_xlabel('peak learning rate')
    ax.set_ylabel('loss')
    ax.set_title(f'{lab}: {p}')
    finite = np.concatenate([g.losses for g in gs])
    ax.set_ylim(finite.min() - 0.05, min(finite.max(), np.percentile(finite, 80) + 0.5) + 0.05)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def analyse(sweeps, loss_col: str, n_boot: int = 200, seed: int = 0) -> list | None:
  """[(sweep label, its groups with their optimum, its depth drift or None)] of the sweeps with run configs,
  or None if none has one."""
  label_groups = [(s.label, groups(s.rows, loss_col)) for s in sweeps]
  label_groups = [(lab, gs) for lab, gs in label_groups if gs]
  for _, gs in label_groups:
    for gr in gs:
      gr.opt = optimum(gr.lrs, gr.losses, n_boot, seed)
  return [(lab, gs, depth_drift(gs, n_boot, seed)) for lab, gs in label_groups] or None


def analyse_section(analyses, opts) -> list | None:
  return analyse([a.sweep for a in analyses], io.loss_column(opts.loss_key), opts.n_boot, opts.seed)


def render_section(analysed, out: str) -> list[str]:
  """report.md lines ('## Learning rate'); writes lr_vs_loss.png and lr_transfer.json (and lr_depth.json when
  models differ in depth) under `out`."""
  label_groups = [(lab, gs) for lab, gs, _ in analysed]
  lines = ['## Learning rate', '',
           'Per model (runs that differ only in peak LR): the best grid LR, the optimum (vertex of a parabola in '
           f'log LR; {fitlib.CI_LEVEL:.0%} residual-bootstrap interval, or the bracket between the grid '
           'neighbours) and a flag when the best LR is at the edge of its grid (the optimum lies outside it, so '
           'that point of the curve is not at its best LR). One LR only: the point used that LR, untuned here.', '',
           '| sweep | model | N | LRs tried | best LR | loss | optimal LR [interval] | note |',
           '|---|---|---|---|---|---|---|---|']
  doc, depth_doc = {}, {}
  for lab, gs, depth in analysed:
    for g in gs:
      note = {'low': 'EDGE: best LR is the lowest tried', 'high': 'EDGE: best LR is the highest tried'}.get(
          g.opt['edge'], '')
      if len(g.lrs) == 1 and not g.failed_lrs:
        note = (f'one LR: muP-transferred from base width {g.base_width}' if g.parametrization == 'mup'
                else 'one LR (not tuned at this size)')
      if g.failed_lrs:
        note += ('; ' if note else '') + 'not done at LR ' + ', '.join(_g(x) for x in g.failed_lrs)
      opt = g.opt['lr_opt']
      opt_s = f"{_g(opt)} [{_g(g.opt['ci'][0])}, {_g(g.opt['ci'][1])}]" if math.isfinite(opt) else '-'
      lines.append(f"| {lab} | {g.label} | {_g(g.n)} | {', '.join(_g(x) for x in g.lrs)} | "
                   f"{_g(g.opt['best_lr'])} | {g.opt['best_loss']:.4f} | {opt_s} | {note} |")
      doc.setdefault(lab, []).append(dict(parametrization=g.parametrization, base_width=g.base_width,
                                          shape=list(g.shape), tokens=g.tokens, n_non_embedding=g.n,
                                          lrs=g.lrs.tolist(), losses=g.losses.tolist(), failed_lrs=g.failed_lrs,
                                          base_depth=g.base_depth,
                                          **{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.opt.items()
                                             if not k.startswith('_')}))
    for p, s in drift(gs).items():
      lines.append('')
      lines.append(f'- **{lab}**, {p}: optimal LR ~ width^{s:+.2f} (least squares over the interior optima; '
                   f'0 = the LR transfers across width)')
    if depth:
      lines += ['', 'Across depth (optimum against n_layers, least squares; [interval] over the bootstrap refits; '
                'the goal of CompleteP: within one 2x step):', ''] + _depth_lines(lab, depth)
      depth_doc[lab] = depth
  lines.append('')
  if any(len(g.lrs) >= 2 for _, gs in label_groups for g in gs):
    plot(label_groups, os.path.join(out, 'lr_vs_loss.png'))
    lines += ['![lr_vs_loss](lr_vs_loss.png)', '']
  for name, d in (('lr_transfer.json', doc), ('lr_depth.json', depth_doc)):
    if d or name == 'lr_transfer.json':
      with open(os.path.join(out, name), 'w') as f:
        json.dump(_finite(d), f, indent=1)
  return lines


def _finite(o):
  """nan / inf -> null, tuples -> lists: strict JSON."""
  if isinstance(o, dict):
    return {k: _finite(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_finite(v) for v in o]
  if isinstance(o, (float, np.floating)):
    return float(o) if math.isfinite(o) else None
  return o

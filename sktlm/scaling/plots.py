"""Scaling plots (matplotlib Agg, PNG + SVG): curves, loss vs N, compute frontier, IsoFLOP, residuals.

Each function takes the per-sweep analyses (sktlm.scaling.analysis.SweepAnalysis) and writes <out>/<name>.png
and .svg, returning the PNG file name, or None when nothing can be drawn. Sweeps get distinct colours
(tab10) on shared axes; within a sweep, runs are coloured by size (viridis over log N).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import ticker  # noqa: E402

from sktlm.scaling import fit as fitlib  # noqa: E402
from sktlm.scaling import laws  # noqa: E402

SWEEP_COLORS = plt.get_cmap('tab10').colors
plt.rcParams.update({'font.size': 10, 'axes.grid': True, 'grid.alpha': 0.3, 'axes.titlesize': 11})


def _save(fig, out: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out, name + '.png'), dpi=120)
  fig.savefig(os.path.join(out, name + '.svg'))
  plt.close(fig)
  return name + '.png'


def sweep_color(i: int):
  return SWEEP_COLORS[i % len(SWEEP_COLORS)]


def _log_loss_axis(ax, ys=None):
  """Log y axis with plain-number labels (losses span well under a decade: 6x10^0 is hard to read).

  ys: the values that must be visible (points, fitted lines); a wide bootstrap band is clipped to them.
  """
  ax.set_yscale('log')
  if ys is not None:
    ys = np.asarray(ys, dtype=np.float64)
    ys = ys[np.isfinite(ys) & (ys > 0)]
    if ys.size:
      ax.set_ylim(ys.min() / 1.05, ys.max() * 1.08)
  fmt = ticker.FuncFormatter(lambda v, _: f'{v:.3g}')
  ax.yaxis.set_major_formatter(fmt)
  lo, hi = ax.get_ylim()
  ax.yaxis.set_minor_formatter(fmt if hi / lo < 12 else ticker.NullFormatter())
  ax.tick_params(axis='y', which='minor', labelsize=8)


def _band(ax, fit, xs, color, d=None):
  if len(fit.boot) < 2:
    return
  preds = np.stack([fit.predict_boot(x) for x in xs], axis=1)
  q = 100 * (1 - fitlib.CI_LEVEL) / 2
  lo, hi = np.nanpercentile(preds, [q, 100 - q], axis=0)
  ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)


def _one_variable(col: str) -> list:
  """The laws of one variable `col` (N: loss_vs_n; C: frontier), drawn over it."""
  return [law for law in laws.LAWS if law.columns == (col,)]


def curves(analyses, out: str, x: str) -> str | None:
  """Loss curves of every run against tokens or FLOPs; one panel per sweep, colour by size."""
  have = [a for a in analyses if a.curves]
  if not have:
    return None
  cols = min(len(have), 3)
  rows = -(-len(have) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False, sharey=True)
  xkey = {'tokens': 'tokens', 'flops': analyses[0].flops_curve_key}[x]
  for ax, a in zip(axes.flat, have, strict=False):
    ns = np.array([n for n, _ in a.curves.values()])
    norm = mcolors.LogNorm(vmin=ns.min(), vmax=max(ns.max(), ns.min() * 1.001))
    cmap = plt.get_cmap('viridis')
    for n, c in sorted(a.curves.values(), key=lambda nc: nc[0]):
      color = cmap(norm(n))
      tr = c['train']
      ok = (tr[xkey] > 0) & (tr['loss'] > 0)
      ax.plot(tr[xkey][ok], tr['loss'][ok], color=color, lw=0.9, alpha=0.55)
      ev = c['eval']
      ok = (ev[xkey] > 0) & (ev['eval_loss'] > 0)
      ax.plot(ev[xkey][ok], ev['eval_loss'][ok], 'o-', color=color, ms=3, lw=1.4)
    ax.set_xscale('log')
    _log_loss_axis(ax)
    ax.set_xlabel('training tokens' if x == 'tokens' else f'training FLOPs ({a.opts.flops_key})')
    ax.set_ylabel('loss (nats/token)')
    ax.set_title(f'{a.label}: train (thin) and eval (dots) loss')
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=f'N ({a.opts.n_key} params)')
  for ax in list(axes.flat)[len(have):]:
    ax.set_visible(False)
  return _save(fig, out, f'curves_{x}')


def _law_figure(analyses, col: str, target, background=None) -> tuple:
  """Runs against `col` with the one-variable laws of `col`: their points, fit, band and backtest."""
  fig, ax = plt.subplots(figsize=(6.5, 4.6))
  ys = []
  for i, a in enumerate(analyses):
    color = sweep_color(i)
    d = a.data
    if not len(d[col]):
      continue
    ys += list(d['loss'])
    if background is not None:
      background(ax, a, color)
    ax.scatter(d[col], d['loss'], s=14, color=color, alpha=0.35, lw=0)
    for law in _one_variable(col):
      pts = a.points_of(law.kind)
      if pts is not None:
        ax.scatter(pts[0][col], pts[1], s=36, color=color, edgecolor='k', lw=0.5, zorder=3,
                   label=f'{a.label}: {law.points_doc}')
      if a.fits.get(law.kind) is not None:
        ys += _draw_law(ax, a.fits[law.kind], d[col], target(a), color, a.label)
      _draw_held_out(ax, a, law, color)
  ax.set_xscale('log')
  _log_loss_axis(ax, ys)
  ax.set_ylabel(f'{analyses[0].opts.loss_key} loss')
  return fig, ax


def loss_vs_n(analyses, out: str) -> str | None:
  if not any(len(a.data['N']) for a in analyses):
    return None
  fig, ax = _law_figure(analyses, 'N', lambda a: a.opts.target_params)
  ax.set_xlabel(f'N ({analyses[0].opts.n_key} parameters)')
  ax.set_title(f'Loss vs model size (band: {fitlib.CI_LEVEL:.0%} bootstrap)')
  ax.legend(fontsize=8)
  return _save(fig, out, 'loss_vs_n')


def _draw_law(ax, f, x_data, target, color, label: str) -> list[float]:
  """The fitted law (extended to the target, if any) with its bootstrap band; returns the plotted losses."""
  lo, hi = np.log10(x_data.min()), np.log10(max(x_data.max(), target or 0))
  xs = np.logspace(lo - 0.1, hi + 0.1, 120)
  ax.plot(xs, f.predict(xs), color=color, lw=1.8, label=f'{label}: {f.law.label(f.values)}')
  _band(ax, f, xs, color)
  return list(f.predict(xs))


def _draw_held_out(ax, a, law, color):
  """Backtest: the held-out points (red rings) and the law fitted without them (dotted)."""
  bt = a.backtest
  if bt is None:
    return
  var = law.columns[0]
  held = ~bt.train
  ax.scatter(a.agg[var][held], a.agg['loss'][held], s=90, facecolors='none', edgecolors='tab:red', lw=1.4,
             zorder=4, label=f'{a.label}: held out in backtest')
  f = bt.fits.get(law.kind)
  if f is not None:
    x = a.agg[var][a.agg[var] > 0]
    xs = np.logspace(np.log10(x.min()) - 0.1, np.log10(x.max()) + 0.1, 120)
    ax.plot(xs, f.predict(xs), ':', color=color, lw=1.4, label=f'{a.label}: {law.kind} fitted without them')


def _learning_curves(ax, a, color):
  """Eval curves in the background of the frontier: the frontier is their envelope."""
  for _, c in a.curves.values():
    ev = c['eval']
    ok = (ev[a.flops_curve_key] > 0) & (ev['eval_loss'] > 0)
    ax.plot(ev[a.flops_curve_key][ok], ev['eval_loss'][ok], color=color, lw=0.6, alpha=0.25)


def frontier(analyses, out: str) -> str | None:
  if not any(len(a.data['C']) for a in analyses):
    return None
  fig, ax = _law_figure(analyses, 'C', lambda a: a.opts.target_flops, background=_learning_curves)
  ax.set_xlabel(f'training FLOPs C ({analyses[0].opts.flops_key})')
  ax.set_title('Compute frontier')
  ax.legend(fontsize=8)
  return _save(fig, out, 'frontier')


def isoflop(analyses, out: str) -> str | None:
  have = [(i, a) for i, a in enumerate(analyses) if a.fits.get('isoflop') is not None]
  if not have:
    return None
  fig, axes = plt.subplots(len(have), 2, figsize=(11, 4.2 * len(have)), squeeze=False)
  for (i, a), (ax_l, ax_r) in zip(have, axes, strict=True):
    iso = a.fits['isoflop']
    d = a.agg
    cmap = plt.get_cmap('plasma')
    cs = np.array([b['C'] for b in iso.budgets])
    norm = mcolors.LogNorm(vmin=cs.min(), vmax=max(cs.max(), cs.min() * 1.001))
    for b in iso.budgets:
      color = cmap(0.85 * norm(b['C']))
      members = a.budget_members[b['C']]
      ax_l.scatter(d['N'][members], d['loss'][members], color=color, s=22, zorder=3)
      xs = np.linspace(np.log(b['N_min']) - 0.2, np.log(b['N_max']) + 0.2, 80)
      ax_l.plot(np.exp(xs), np.polyval(b['coeffs_lnN'], xs), color=color, lw=1.2, label=f"C={b['C']:.2g}")
      ax_l.plot(b['N_opt'], b['L_opt'], '*', color=color, ms=12, mec='k', mew=0.6, zorder=4)
    ax_l.set_xscale('log')
    ax_l.set_xlabel(f'N ({a.opts.n_key} parameters)')
    ax_l.set_ylabel(f'{a.opts.loss_key} loss')
    ax_l.set_title(f'{a.label}: IsoFLOP profiles (star: minimum)')
    ax_l.legend(fontsize=7, ncol=2)
    color = sweep_color(i)
    ax_r.scatter(cs, [b['N_opt'] for b in iso.budgets], color=color, edgecolor='k', s=40, zorder=3,
                 label='IsoFLOP minima')
    hi = max(cs.max(), a.opts.target_flops or 0)
    xs = np.logspace(np.log10(cs.min()) - 0.2, np.log10(hi) + 0.2, 100)
    ax_r.plot(xs, iso.n_opt(xs), color=color, lw=1.8, label=f'IsoFLOP: N_opt = {iso.k:.3g} C^{iso.a:.3f}')
    for law in laws.allocating():
      if a.fits.get(law.kind) is not None:
        n_opt = [law.optimal(a.fits[law.kind].values, x, a.fpt)[0] for x in xs]
        ax_r.plot(xs, n_opt, '--', color='k', lw=1.2, label=f'parametric {law.kind} optimum')
    ax_r.set_xscale('log')
    ax_r.set_yscale('log')
    ax_r.set_xlabel(f'C ({a.opts.flops_key} FLOPs)')
    ax_r.set_ylabel('compute-optimal N')
    ax_r.set_title(f'{a.label}: compute-optimal model size')
    ax_r.legend(fontsize=8)
  return _save(fig, out, 'isoflop')


def residuals(analyses, out: str) -> str | None:
  kinds = [law for law in laws.LAWS if any(a.fits.get(law.kind) is not None for a in analyses)]
  if not kinds:
    return None
  fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.8), squeeze=False)
  for ax, law in zip(axes[0], kinds, strict=True):
    for i, a in enumerate(analyses):
      f = a.fits.get(law.kind)
      if f is None:
        continue
      cols, loss = a.points_of(law.kind)
      ax.scatter(cols[law.columns[0]], 100 * (loss / f.predict(cols) - 1), s=16, color=sweep_color(i), label=a.label)
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xscale('log')
    ax.set_xlabel(law.columns[0])
    ax.set_ylabel('observed / fitted - 1 (%)')
    ax.set_title(f'{law.kind} residuals')
    ax.legend(fontsize=8)
  return _save(fig, out, 'residuals')


def predicted_vs_actual(analyses, out: str) -> str | None:
  """--predict: predicted against actual loss per law (95% intervals as bars), the diagonal, and each point's
  extrapolation factor in N and C."""
  pairs = [(a, t, rows) for a in analyses for t, rows in a.predicted.items() if rows]
  if not pairs:
    return None
  kinds = [law.kind for law in laws.LAWS if any(r['law'] == law.kind for _, _, rows in pairs for r in rows)]
  fig, axes = plt.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 4.4), squeeze=False)
  for ax, law in zip(axes[0], kinds, strict=True):
    lo_all, hi_all = [], []
    for i, (a, t, rows) in enumerate(pairs):
      rs = [r for r in rows if r['law'] == law]
      if not rs:
        continue
      act = np.array([r['actual'] for r in rs])
      pred = np.array([r['predicted'] for r in rs])
      ci = np.array([r['ci'] for r in rs], dtype=float)
      err = np.abs(np.stack([pred - ci[:, 0], ci[:, 1] - pred])) if np.isfinite(ci).all() else None
      ax.errorbar(act, pred, yerr=err, fmt='o', ms=4, capsize=2, color=sweep_color(i), label=f'{a.label} -> {t}')
      for r in rs:
        ax.annotate(f"N x{r['n_factor']:.2g}, C x{r['c_factor']:.2g}", (r['actual'], r['predicted']), fontsize=6,
                    xytext=(3, 3), textcoords='offset points')
      lo_all += [act.min(), pred.min()]
      hi_all += [act.max(), pred.max()]
    lo, hi = min(lo_all), max(hi_all)
    pad = 0.05 * (hi - lo + 1e-9)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color='k', lw=0.8)
    ax.set_xlabel('actual loss')
    ax.set_ylabel('predicted loss')
    ax.set_title(f'{law}: predicted vs actual')
    ax.legend(fontsize=7)
  return _save(fig, out, 'predicted_vs_actual')

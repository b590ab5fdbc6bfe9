"""The report of one or more sweeps: report.md, fits.json and plots from the analyses (sktlm.scaling.analysis).

The report is a sequence of sections that share one signature: `analyse(analyses, opts) -> result` (None:
the section has nothing to say) and `render(result, out) -> markdown lines` (writing the section's own files).
Every section analyses before any renders. Every compute quantity is in one FLOP convention, stated once at
the top of the report. If no fit at all succeeds it is an error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import analysis, compute, curve_law, io, law_report, laws, lr_transfer, moe_report, options, plots
from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import fit as fitlib
from sktlm.scaling import predict as predictlib
from sktlm.scaling.law_report import g as _g


def _seed_lines(analyses) -> list[str]:
  lines = []
  for a in analyses:
    g = a.agg
    if g is None or not (g['n_seeds'] > 1).any():
      continue
    if not lines:
      lines = ['Runs that differ only in their seed are one configuration: fits use the seed mean, and the '
               'bootstrap resamples configurations (sizes), not seeds.', '',
               '| sweep | configuration | N | seeds | mean loss | sd | min | max |',
               '|---|---|---|---|---|---|---|---|']
    for i in np.flatnonzero(g['n_seeds'] > 1):
      lines.append(f"| {a.label} | {g['name'][i]} | {_g(g['N'][i], 3)} | {g['n_seeds'][i]} | {_g(g['loss'][i])} | "
                   f"{_g(g['loss_std'][i], 2)} | {_g(g['loss_min'][i])} | {_g(g['loss_max'][i])} |")
  return lines


def _runs_table(a: analysis.SweepAnalysis) -> list[str]:
  o = a.opts
  lines = [f'| run | status | N ({o.n_key}) | tokens | C | {o.loss_key} loss | in fits |',
           '|---|---|---|---|---|---|---|']
  sel = {int(i): j for j, i in enumerate(a.data['index'])}
  group_of = {}
  if a.agg is not None:
    for gi, members in enumerate(a.agg['members']):
      for j in members:
        group_of[j] = gi
  fitted_on = {law.kind: set(a.selected[law.kind].tolist()) for law in laws.LAWS
               if a.fits.get(law.kind) is not None}
  held = set(np.flatnonzero(~a.backtest.train).tolist()) if a.backtest is not None else set()
  for i, r in enumerate(a.sweep.rows):
    j = sel.get(i)
    marks = []
    if j is not None:
      n, c, loss = a.data['N'][j], a.data['C'][j], a.data['loss'][j]
      gi = group_of[j]
      marks += [kind for kind, on in fitted_on.items() if gi in on]
      marks += ['held out in backtest'] if gi in held else []
    else:
      n, c, loss = r[io.N_COLUMNS[o.n_key]], r[io.FLOPS_COLUMNS[o.flops_key]], r[io.loss_column(o.loss_key)]
    lines.append(f"| {r['name']} | {r['status']} | {_g(n, 3)} | {_g(r['tokens'], 3)} | {_g(c, 3)} | "
                 f"{_g(loss)} | {' '.join(marks) if j is not None else '-'} |")
  return lines


def document(analyses: list[analysis.SweepAnalysis], opts: analysis.Options, curve: dict | None = None) -> dict:
  """The fits.json content (JSON-ready: nan -> null)."""
  warnings = [w for a in analyses for w in a.warnings]
  settings = {**options.settings(opts), 'ci_level': fitlib.CI_LEVEL}
  doc = dict(settings=settings, convention=compute.DESCRIPTION[opts.flops_key], warnings=warnings, sweeps={
      a.label: dict(path=a.sweep.path, source=a.sweep.source, n_runs=len(a.sweep.rows), n_used=len(a.data['N']),
                    flops_per_token=a.fpt.to_json() if a.fpt is not None else None,
                    fits={k: (f.to_json() if f is not None else None) for k, f in a.fits.items()},
                    predictions=a.predictions,
                    backtest=a.backtest.to_json() if a.backtest is not None else None,
                    predicted=a.predicted, e_sensitivity=a.sensitivity) for a in analyses},
             backtest_summary=[line for a in analyses if a.backtest is not None
                               for line in backtestlib.headline(a.label, a.backtest)],
             predict_summary=[line for a in analyses for t, rows in a.predicted.items()
                              for line in predictlib.summary_lines(a.label, t, rows)],
             curve_law=curve)
  if curve:
    doc['warnings'] += curve['warnings']
  return _finite(doc)


def _analyses(analyses, opts):
  return analyses


def _seeds_section(analyses, out: str) -> list[str]:
  seeds = _seed_lines(analyses)
  return ['## Seeds', ''] + seeds + [''] if seeds else []


def _plots_section(analyses, out: str) -> list[str]:
  figs = [plots.curves(analyses, out, 'tokens'), plots.curves(analyses, out, 'flops'),
          plots.loss_vs_n(analyses, out), plots.frontier(analyses, out), plots.isoflop(analyses, out),
          plots.residuals(analyses, out), plots.predicted_vs_actual(analyses, out)]
  return ['## Plots', ''] + [f'![{f[:-4]}]({f})\n' for f in figs if f]


def _runs_section(analyses, out: str) -> list[str]:
  md = ['## Runs', '']
  for a in analyses:
    md += [f'### {a.label} ({len(a.sweep.rows)} runs, {len(a.data["N"])} used, from {a.sweep.source})', '']
    md += _runs_table(a) + ['']
  return md


# In report order: (analyse(analyses, opts) -> result or None, render(result, out) -> markdown lines).
SECTIONS = (
    (law_report.analyse_section, law_report.render_section),        # Fits .. Predicted versus actual
    (curve_law.analyse_section, curve_law.render_section),          # Loss-curve law (Tissue et al. 2024)
    (_analyses, _seeds_section),
    (lr_transfer.analyse_section, lr_transfer.render_section),      # Learning rate
    (moe_report.analyse_section, moe_report.render_section),        # Mixture of experts
    (_analyses, _plots_section),
    (_analyses, _runs_section),
)


def _header(analyses, opts) -> list[str]:
  md = ['# Scaling report', '',
        f"Generated {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} by `sktlm scaling` "
        f"from {', '.join(f'`{a.sweep.path}`' for a in analyses)}.", '',
        f'**FLOP convention: {compute.DESCRIPTION[opts.flops_key]}.** Every compute quantity in this report '
        '(C, L(C), IsoFLOP budgets, FLOPs per token, compute-optimal N and D, target budgets) is in this '
        'convention; allocations solve D = C / f(N) with f the FLOPs per token of the sizes run.', '',
        f'N = {opts.n_key} parameters, D = training tokens, loss = {opts.loss_key}. Fits minimise the summed '
        f'Huber loss (delta={opts.delta:g}) of log-space residuals (Hoffmann et al. 2022); intervals are '
        f'{fitlib.CI_LEVEL:.0%} percentile intervals over {opts.n_boot} bootstrap refits (seed {opts.seed}) '
        'resampling the fitted points (per-configuration seed means).', '']
  return md + law_report.fix_e_paragraph(analyses, opts)


def write(out: str, analyses: list[analysis.SweepAnalysis], opts: analysis.Options) -> dict:
  """Every section analysed, then fits.json, then report.md (and each section's files) under `out`; returns
  the fits.json content."""
  results = [(analyse(analyses, opts), render) for analyse, render in SECTIONS]
  curve = next(r for (r, render) in results if render is curve_law.render_section)
  os.makedirs(out, exist_ok=True)
  doc = document(analyses, opts, curve)
  with open(os.path.join(out, 'fits.json'), 'w') as f:
    json.dump(doc, f, indent=1, allow_nan=False)
  md = _header(analyses, opts) + ['## Warnings', ''] + ([f'- {w}' for w in doc['warnings']] or ['none']) + ['']
  for result, render in results:
    md += render(result, out) if result is not None else []
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write('\n'.join(md))
  return doc


def _finite(o):
  """JSON-ready copy: numpy values to Python, nan/inf (e.g. intervals without bootstrap) to null."""
  if isinstance(o, dict):
    return {str(k): _finite(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_finite(v) for v in o]
  if isinstance(o, np.ndarray):
    return _finite(o.tolist())
  if isinstance(o, np.generic):
    o = o.item()
  if isinstance(o, float) and not math.isfinite(o):
    return None
  return o


def run(paths: list[str], out: str, opts: analysis.Options, labels: list[str] | None = None) -> dict:
  if not paths:
    raise UserError('give at least one sweep directory (with results.csv or run workdirs)')
  if labels and len(labels) != len(paths):
    raise UserError(f'--labels has {len(labels)} names for {len(paths)} sweeps')
  sweeps = [io.load_sweep(p, labels[i] if labels else None) for i, p in enumerate(paths)]
  seen: dict[str, int] = {}
  for s in sweeps:  # distinct labels: a second 'results' becomes 'results-2'
    seen[s.label] = seen.get(s.label, 0) + 1
    if seen[s.label] > 1:
      s.label = f'{s.label}-{seen[s.label]}'
  analyses = [analysis.analyze(s, opts) for s in sweeps]
  if not opts.curve_fit and not any(f is not None for a in analyses for f in a.fits.values()):
    raise UserError('no scaling law could be fitted: ' + '; '.join(w for a in analyses for w in a.warnings))
  doc = write(out, analyses, opts)
  for w in doc['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  return doc

"""The report of one or more sweeps: report.md, fits.json and plots from the analyses (sktlm.scaling.analysis).

Every compute quantity is in one FLOP convention, stated once at the top of the report. If no fit at all
succeeds it is an error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import analysis, compute, curve_law, io, lr_transfer, moe_report, plots
from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import fit as fitlib
from sktlm.scaling import predict as predictlib


def _g(v, digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return '-'
  return f'{v:.{digits}g}'


def _with_ci(v, ci) -> str:
  if ci is None or not all(math.isfinite(x) for x in ci):
    return _g(v)
  return f'{_g(v)} [{_g(ci[0])}, {_g(ci[1])}]'


def _fit_table(analyses) -> list[str]:
  lines = ['| sweep | law | E | A | alpha | B | beta | points | Huber objective | converged |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for a in analyses:
    for kind in ('L(N)', 'L(C)', 'L(N,D)'):
      f = a.fits.get(kind)
      if f is None:
        continue
      cell = lambda n, f=f: _with_ci(f.values[n], f.ci(n)) if n in f.names else ''
      lines.append(f"| {a.label} | {kind} | {cell('E')} | {cell('A')} | {cell('alpha')} | {cell('B')} | "
                   f"{cell('beta')} | {f.n_points} | {f.objective:.6g} | {'yes' if f.converged else 'NO'} |")
  return lines


def _optimal_lines(analyses) -> list[str]:
  lines = []
  for a in analyses:
    f, iso, fpt = a.fits.get('L(N,D)'), a.fits.get('isoflop'), a.fpt
    k = fpt.k if fpt is not None else 6.0
    if f is not None and not fitlib.allocation_defined(f.values):
      lines.append(f'- **{a.label}**, from L(N,D): not defined (an exponent is <= 0: see the warnings)')
    elif f is not None and k is not None:
      v = f.values
      s = v['alpha'] + v['beta']
      g = (v['alpha'] * v['A'] / (v['beta'] * v['B'])) ** (1 / s)
      lines.append(f"- **{a.label}**, from L(N,D), closed form (C = {_g(k)} N D): N_opt = {_g(g)} "
                   f"(C/{_g(k)})^{_g(v['beta'] / s)}, D_opt = C/({_g(k)} N_opt) = {_g(1 / g)} "
                   f"(C/{_g(k)})^{_g(v['alpha'] / s)}")
    elif f is not None:
      lines.append(f'- **{a.label}**, from L(N,D), solved numerically along D = C / f(N), f = FLOPs per token '
                   f'of the sizes run ({_g(fpt.fpt[0] / fpt.n[0], 3)} N at N = {_g(fpt.n[0], 3)} .. '
                   f'{_g(fpt.fpt[-1] / fpt.n[-1], 3)} N at N = {_g(fpt.n[-1], 3)}):')
      c_max = float(np.nanmax(a.agg['C'])) if a.agg is not None else math.nan
      for c in ([c_max, 10 * c_max, 100 * c_max] if math.isfinite(c_max) else []):
        n_opt, d_opt, l_opt = fitlib.compute_optimal(f.values, c, fpt)
        lines.append(f'  - C = {_g(c, 3)}: N_opt = {_g(n_opt, 3)}, D_opt = {_g(d_opt, 3)} '
                     f'(D/N = {_g(d_opt / n_opt, 3)}), loss {_g(l_opt)}')
    if iso is not None:
      d_rule = f'C/({_g(k)} N_opt) = {_g(1 / (k * iso.k))} C^{_g(1 - iso.a)}' if k is not None else 'C / f(N_opt)'
      lines.append(f"- **{a.label}**, IsoFLOP ({len(iso.budgets)} budgets): N_opt = {_g(iso.k)} C^"
                   f"{_with_ci(iso.a, iso.ci('a'))}, D_opt = {d_rule}")
      for b in iso.budgets:
        lines.append(f"  - C = {_g(b['C'], 3)}: N_opt = {_g(b['N_opt'], 3)}, D_opt = {_g(iso.d_opt(b['C']), 3)}, "
                     f"loss {_g(b['L_opt'])} ({b['n_runs']} runs, N {_g(b['N_min'], 3)}..{_g(b['N_max'], 3)})")
  return lines


def _backtest_lines(analyses) -> list[str]:
  rows = [(a, r) for a in analyses if a.backtest is not None for r in a.backtest.rows]
  if not rows:
    return []
  lines = []
  for a in analyses:
    bt = a.backtest
    if bt is not None:
      held = ', '.join(_g(v, 3) for v in bt.held_out)
      lines.append(f"- **{a.label}**: laws fitted without the {bt.k} largest {bt.unit}(s) "
                   f"({'N' if bt.unit == 'size' else 'C'} = {held}), then asked for the held-out runs:")
      lines += [f'  - {line}' for line in backtestlib.headline(a.label, bt)]
  lines += ['', '| sweep | law | held-out run | N | D | C | predicted loss [95% CI] | actual loss '
            '(seed sd) | error | covered |', '|---|---|---|---|---|---|---|---|---|---|']
  for a, r in rows:
    spread = f" ({_g(r['seed_std'], 2)}, {r['n_seeds']} seeds)" if r['n_seeds'] > 1 else ''
    law = r['law'] if r.get('target', True) else f"{r['law']} (diagnostic)"
    lines.append(f"| {a.label} | {law} | {r['run']} | {_g(r['N'], 3)} | {_g(r['D'], 3)} | {_g(r['C'], 3)} | "
                 f"{_with_ci(r['predicted'], r['ci'])} | {_g(r['actual'])}{spread} | "
                 f"{100 * r['rel_error']:+.2f}% | {_covered(r)} |")
  lines += _sensitivity_lines(analyses, 'backtest')
  return lines


def _covered(r) -> str:
  return '-' if r.get('covered') is None else ('yes' if r['covered'] else 'NO')


def _sensitivity_lines(analyses, key: str) -> list[str]:
  lines = []
  for a in analyses:
    s = a.sensitivity.get(key)
    if not s or not s['rows']:
      continue
    parts = '; '.join(f"E = {_g(r['E'])}: {_g(r['predicted'])} (objective {r['objective']:.3g})" for r in s['rows'])
    lines += ['', f"E sensitivity ({a.label}, L(N,D) with E fixed; predicted loss of {s['run']}, actual "
              f"{_g(s['actual'])}): {parts}."]
  return lines


def _predict_lines(analyses) -> list[str]:
  lines = []
  for a in analyses:
    for target, rows in a.predicted.items():
      lines += [f'Laws fitted on **{a.label}** (all its runs) predict every configuration of **{target}**; '
                'N x and C x: the extrapolation factor over the largest N and C fitted.', '']
      lines += [f'- {line}' for line in predictlib.summary_lines(a.label, target, rows)] + ['']
      lines += ['| law | run | N | D | C | N x | C x | predicted loss [95% CI] | actual (seed sd) | error | '
                'covered |', '|---|---|---|---|---|---|---|---|---|---|---|']
      for r in rows:
        spread = f" ({_g(r['seed_std'], 2)}, {r['n_seeds']} seeds)" if r['n_seeds'] > 1 else ''
        lines.append(f"| {r['law']} | {r['run']} | {_g(r['N'], 3)} | {_g(r['D'], 3)} | {_g(r['C'], 3)} | "
                     f"{_g(r['n_factor'], 3)} | {_g(r['c_factor'], 3)} | {_with_ci(r['predicted'], r['ci'])} | "
                     f"{_g(r['actual'])}{spread} | {100 * r['rel_error']:+.2f}% | {_covered(r)} |")
      lines += _sensitivity_lines([a], target) + ['']
  return lines


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
  ln = set(a.ln_index.tolist()) if a.ln_index is not None else set()
  lc = set(a.lc_index.tolist()) if a.lc_index is not None else set()
  held = set(np.flatnonzero(~a.backtest.train).tolist()) if a.backtest is not None else set()
  for i, r in enumerate(a.sweep.rows):
    j = sel.get(i)
    marks = []
    if j is not None:
      n, c, loss = a.data['N'][j], a.data['C'][j], a.data['loss'][j]
      gi = group_of[j]
      marks += ['L(N)'] if gi in ln and a.fits.get('L(N)') is not None else []
      marks += ['L(C)'] if gi in lc and a.fits.get('L(C)') is not None else []
      marks += ['L(N,D)'] if a.fits.get('L(N,D)') is not None else []
      marks += ['held out in backtest'] if gi in held else []
    else:
      n, c, loss = r[io.N_COLUMNS[o.n_key]], r[io.FLOPS_COLUMNS[o.flops_key]], r[io.loss_column(o.loss_key)]
    lines.append(f"| {r['name']} | {r['status']} | {_g(n, 3)} | {_g(r['tokens'], 3)} | {_g(c, 3)} | "
                 f"{_g(loss)} | {' '.join(marks) if j is not None else '-'} |")
  return lines


def document(analyses: list[analysis.SweepAnalysis], opts: analysis.Options, curve: dict | None = None) -> dict:
  """The fits.json content (JSON-ready: nan -> null)."""
  warnings = [w for a in analyses for w in a.warnings]
  settings = dict(n=opts.n_key, loss=opts.loss_key, flops=opts.flops_key, bootstrap=opts.n_boot, seed=opts.seed,
                  huber_delta=opts.delta, ci_level=fitlib.CI_LEVEL, isoflop_gap=opts.isoflop_gap,
                  target_params=opts.target_params, target_tokens=opts.target_tokens,
                  target_flops=opts.target_flops, backtest=opts.backtest, fix_E=opts.fix_E)
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


def write(out: str, analyses: list[analysis.SweepAnalysis], opts: analysis.Options) -> dict:
  """Plots, fits.json and report.md under `out`; returns the fits.json content."""
  curve = None
  if opts.curve_fit:
    rows = {r['name']: r for a in analyses for r in a.sweep.rows}
    try:
      curve = curve_law.analyse(rows, list(opts.curve_fit), list(opts.curve_predict), opts.curve_skip_steps)
    except fitlib.FitError as e:
      for a in analyses[:1]:
        a.warnings.append(f'loss-curve law not fitted: {e}')
  os.makedirs(out, exist_ok=True)
  figs = [plots.curves(analyses, out, 'tokens'), plots.curves(analyses, out, 'flops'),
          plots.loss_vs_n(analyses, out), plots.frontier(analyses, out), plots.isoflop(analyses, out),
          plots.residuals(analyses, out), plots.predicted_vs_actual(analyses, out)]
  doc = document(analyses, opts, curve)
  with open(os.path.join(out, 'fits.json'), 'w') as f:
    json.dump(doc, f, indent=1, allow_nan=False)
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
  if opts.fix_E is not None:
    md += [f'**E is fixed at {opts.fix_E:g}** in L(N,D) and L(C) (`--fix_E`; L(C) keeps it free on a grid whose '
           'sizes share their largest token budget, where its frontier ends D-limited), not fitted: intervals do not '
           'include its uncertainty; the E sensitivity lines show how the predictions move with it. L(N) keeps its '
           'own asymptote (at the sweep\'s token budgets it is E + B/D^beta).'
           + (f' Why this value: {opts.fix_E_why}' if opts.fix_E_why else ''), '']
  md += ['## Warnings', ''] + ([f'- {w}' for w in doc['warnings']] or ['none']) + ['']
  md += ['## Fits', '', 'L(N) and L(C): L = E + A / X^alpha (L(N): best run per N; L(C): compute-frontier runs). '
         'L(N,D) = E + A/N^alpha + B/D^beta (all runs).', ''] + _fit_table(analyses) + ['']
  opt = _optimal_lines(analyses)
  if opt:
    md += ['## Compute-optimal allocation', ''] + opt + ['']
  preds = [(a, p) for a in analyses for p in a.predictions]
  if preds:
    md += ['## Predictions', '', '| sweep | quantity | value | interval |', '|---|---|---|---|']
    md += [f"| {a.label} | {p['what']} | {_g(p['value'])} | [{_g(p['ci'][0])}, {_g(p['ci'][1])}] |"
           for a, p in preds] + ['']
  bt = _backtest_lines(analyses)
  if bt:
    md += ['## Backtest', ''] + bt + ['']
  pv = _predict_lines(analyses)
  if pv:
    md += ['## Predicted versus actual', ''] + pv
  if curve:
    md += ['## Loss-curve law (Tissue et al. 2024)', ''] + curve_law.report_lines(curve) + ['']
  seeds = _seed_lines(analyses)
  if seeds:
    md += ['## Seeds', ''] + seeds + ['']
  md += lr_transfer.section([a.sweep for a in analyses], out, io.LOSS_COLUMNS[opts.loss_key], opts.n_boot, opts.seed)
  md += moe_report.section([a.sweep for a in analyses], out, io.loss_column(opts.loss_key),
                           io.FLOPS_COLUMNS[opts.flops_key], opts.n_boot, opts.seed, opts.delta, opts.moe_target,
                           opts.target_tokens, opts.flops_key)
  md += ['## Plots', ''] + [f'![{f[:-4]}]({f})\n' for f in figs if f]
  md += ['## Runs', '']
  for a in analyses:
    md += [f'### {a.label} ({len(a.sweep.rows)} runs, {len(a.data["N"])} used, from {a.sweep.source})', '']
    md += _runs_table(a) + ['']
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

"""The report's scaling-law sections (Fits, Compute-optimal allocation, Predictions, Backtest, Predicted versus
actual): every table iterates the registry (sktlm.scaling.laws) over the analyses (sktlm.scaling.analysis).
"""

from __future__ import annotations

import math

import numpy as np

from sktlm.scaling import analysis, laws, points
from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import fit as fitlib
from sktlm.scaling import predict as predictlib


def g(v, digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return '-'
  return f'{v:.{digits}g}'


def with_ci(v, ci) -> str:
  if ci is None or not all(math.isfinite(x) for x in ci):
    return g(v)
  return f'{g(v)} [{g(ci[0])}, {g(ci[1])}]'


def predicted(r) -> str:
  """A prediction with its interval, or with why it has none."""
  if all(math.isfinite(x) for x in r['ci']) or not r.get('interval_note'):
    return with_ci(r['predicted'], r['ci'])
  return f"{g(r['predicted'])} ({r['interval_note']})"


def covered(r) -> str:
  return '-' if r.get('covered') is None else ('yes' if r['covered'] else 'NO')


def _naive(r, key: str) -> str:
  v = r.get(key, math.nan)
  return '-' if not math.isfinite(v) else f"{g(v)} ({100 * r[key + '_error']:+.2f}%)"


def _join(names: list[str]) -> str:
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def attempted(analyses) -> list:
  """The laws some sweep's data let the analysis attempt, in registry order."""
  return [law for law in laws.LAWS if any(law.kind in a.fits for a in analyses)]


def fix_e_paragraph(analyses, opts) -> list[str]:
  """What --fix_E does to each attempted law: held ('fixed', then 'grid' with its condition), or its own."""
  tried = attempted(analyses)
  held = [law for law in tried if law.e_policy == 'fixed'] + [law for law in tried if law.e_policy == 'grid']
  if opts.fix_E is None or not held:
    return []
  cond = '; '.join(law.asymptote_doc for law in held if law.e_policy == 'grid')
  own = ''.join(f' {law.asymptote_doc}' for law in tried if law.e_policy == 'own')
  return [f"**E is fixed at {opts.fix_E:g}** in {_join([law.kind for law in held])} (`--fix_E`"
          + (f'; {cond}' if cond else '') + '), not fitted: intervals do not include its uncertainty; the E '
          'sensitivity lines show how the predictions move with it.' + own
          + (f' Why this value: {opts.fix_E_why}' if opts.fix_E_why else ''), '']


def _formulas(analyses) -> str:
  """One sentence per formula: laws that share one (L(N) and L(C)) share a sentence."""
  groups: dict[str, list] = {}
  for law in attempted(analyses):
    groups.setdefault(law.formula, []).append(law)
  out = []
  for formula, group in groups.items():
    if len(group) == 1:
      out.append(f'{group[0].kind} = {formula} ({group[0].points_doc}).')
    else:
      out.append(f"{_join([law.kind for law in group])}: L = {formula} "
                 f"({'; '.join(f'{law.kind}: {law.points_doc}' for law in group)}).")
  return ' '.join(out)


def param(f, name: str) -> str:
  """A fitted parameter with its interval, or 'not identified by these runs' with the interval (fitlib.MAX_SPAN)."""
  lo, hi = f.ci(name)
  if not fitlib.identified(lo, hi):
    return f'not identified by these runs [{g(lo)}, {g(hi)}]'
  return with_ci(f.values[name], (lo, hi))


def _fit_table(analyses) -> list[str]:
  fitted = [law for law in laws.LAWS if any(a.fits.get(law.kind) is not None for a in analyses)]
  names = list(dict.fromkeys(n for law in (fitted or laws.LAWS) for n in law.names))
  lines = [f"| sweep | law | {' | '.join(names)} | points | Huber objective | converged |",
           '|' + '---|' * (len(names) + 5)]
  for a in analyses:
    for law in laws.LAWS:
      f = a.fits.get(law.kind)
      if f is None:
        continue
      cells = ' | '.join(param(f, n) if n in f.names else '' for n in names)
      lines.append(f"| {a.label} | {law.kind} | {cells} | {f.n_points} | {f.objective:.6g} | "
                   f"{'yes' if f.converged else 'NO'} |")
  return lines


def _optimal_lines(analyses) -> list[str]:
  lines = []
  for a in analyses:
    iso, fpt = a.fits.get('isoflop'), a.fpt
    k = fpt.k if fpt is not None else 6.0
    for law in laws.allocating():
      f = a.fits.get(law.kind)
      if f is not None and not law.allocation_defined(f.values):
        lines.append(f'- **{a.label}**, from {law.kind}: not defined (an exponent is <= 0: see the warnings)')
      elif f is not None and k is not None:
        v = f.values
        s = v['alpha'] + v['beta']
        gg = (v['alpha'] * v['A'] / (v['beta'] * v['B'])) ** (1 / s)
        span = points.frontier_range(a.agg)
        where = (f'; measured where the compute frontier runs, C = {g(span[0], 3)} .. {g(span[1], 3)}: beyond, an '
                 'extrapolation' if span else '')
        lines.append(f"- **{a.label}**, from {law.kind}, closed form (C = {g(k)} N D): N_opt = {g(gg)} "
                     f"(C/{g(k)})^{g(v['beta'] / s)}, D_opt = C/({g(k)} N_opt) = {g(1 / gg)} "
                     f"(C/{g(k)})^{g(v['alpha'] / s)}{where}")
      elif f is not None:
        lines.append(f'- **{a.label}**, from {law.kind}, solved numerically along D = C / f(N), f = FLOPs per '
                     f'token of the sizes run ({g(fpt.fpt[0] / fpt.n[0], 3)} N at N = {g(fpt.n[0], 3)} .. '
                     f'{g(fpt.fpt[-1] / fpt.n[-1], 3)} N at N = {g(fpt.n[-1], 3)}):')
        c_max = float(np.nanmax(a.agg['C'])) if a.agg is not None else math.nan
        for c in ([c_max, 10 * c_max, 100 * c_max] if math.isfinite(c_max) else []):
          n_opt, d_opt, l_opt = law.optimal(f.values, c, fpt)
          lines.append(f'  - C = {g(c, 3)}{analysis.beyond_frontier(a.agg, c)}: N_opt = {g(n_opt, 3)}, '
                       f'D_opt = {g(d_opt, 3)} (D/N = {g(d_opt / n_opt, 3)}), loss {g(l_opt)}')
    if iso is not None:
      d_rule = f'C/({g(k)} N_opt) = {g(1 / (k * iso.k))} C^{g(1 - iso.a)}' if k is not None else 'C / f(N_opt)'
      lines.append(f"- **{a.label}**, IsoFLOP ({len(iso.budgets)} budgets): N_opt = {g(iso.k)} C^"
                   f"{with_ci(iso.a, iso.ci('a'))}, D_opt = {d_rule}")
      for b in iso.budgets:
        lines.append(f"  - C = {g(b['C'], 3)}: N_opt = {g(b['N_opt'], 3)}, D_opt = {g(iso.d_opt(b['C']), 3)}, "
                     f"loss {g(b['L_opt'])} ({b['n_runs']} runs, N {g(b['N_min'], 3)}..{g(b['N_max'], 3)})")
  return lines


def _sensitivity_lines(analyses, key: str) -> list[str]:
  lines = []
  for a in analyses:
    for s in a.sensitivity.get(key) or []:
      if not s['rows']:
        continue
      parts = '; '.join(f"E = {g(r['E'])}: objective {r['objective']:.3g}"
                        + (f", predictions move by up to {100 * r['max_move']:+.2f}% ({r['max_move_run']})"
                           if r['max_move'] and math.isfinite(r['max_move']) else '') for r in s['rows'])
      lines += ['', f"E sensitivity ({a.label}, {s['law']} refitted with E fixed at each value, over its "
                f"{len(s['runs'])} predicted point(s); moves relative to its prediction at the E used): {parts}."]
  return lines


def _backtest_lines(analyses) -> list[str]:
  rows = [(a, r) for a in analyses if a.backtest is not None for r in a.backtest.rows]
  if not rows:
    return []
  lines = []
  for a in analyses:
    bt = a.backtest
    if bt is not None:
      held = ', '.join(g(v, 3) for v in bt.held_out)
      lines.append(f"- **{a.label}**: laws fitted without the {bt.k} largest {bt.unit}(s) "
                   f"({'N' if bt.unit == 'size' else 'C'} = {held}), then asked for the held-out runs:")
      lines += [f'  - {line}' for line in backtestlib.headline(a.label, bt)]
  lines += ['', 'copy: the loss of the largest fitted size at the nearest token budget; C-trend: a pure power law in C '
            'fitted on the fitted runs\' compute frontier (predictors that know nothing about scale; error: '
            'predicted / actual - 1).', '',
            '| sweep | law | held-out run | N | D | C | predicted loss [95% CI] | actual loss '
            '(seed sd) | error | covered | copy (error) | C-trend (error) |', '|' + '---|' * 12]
  for a, r in rows:
    spread = f" ({g(r['seed_std'], 2)}, {r['n_seeds']} seeds)" if r['n_seeds'] > 1 else ''
    law = r['law'] if r.get('target', True) else f"{r['law']} (diagnostic)"
    lines.append(f"| {a.label} | {law} | {r['run']} | {g(r['N'], 3)} | {g(r['D'], 3)} | {g(r['C'], 3)} | "
                 f"{predicted(r)} | {g(r['actual'])}{spread} | "
                 f"{100 * r['rel_error']:+.2f}% | {covered(r)} | {_naive(r, 'copy')} | {_naive(r, 'ctrend')} |")
  lines += _sensitivity_lines(analyses, 'backtest')
  return lines


def _predict_lines(analyses) -> list[str]:
  lines = []
  for a in analyses:
    for target, rows in a.predicted.items():
      lines += [f'Laws fitted on **{a.label}** (all its runs) predict every configuration of **{target}**; '
                'N x and C x: the extrapolation factor over the largest N and C fitted; copy: the loss of the largest '
                f'size of {a.label} at the nearest token budget; C-trend: a pure power law in C fitted on its compute '
                'frontier.', '']
      lines += [f'- {line}' for line in predictlib.summary_lines(a.label, target, rows)] + ['']
      lines += ['| law | run | N | D | C | N x | C x | predicted loss [95% CI] | actual (seed sd) | error | '
                'covered | copy (error) | C-trend (error) |', '|' + '---|' * 13]
      for r in rows:
        spread = f" ({g(r['seed_std'], 2)}, {r['n_seeds']} seeds)" if r['n_seeds'] > 1 else ''
        lines.append(f"| {r['law']} | {r['run']} | {g(r['N'], 3)} | {g(r['D'], 3)} | {g(r['C'], 3)} | "
                     f"{g(r['n_factor'], 3)} | {g(r['c_factor'], 3)} | {predicted(r)} | "
                     f"{g(r['actual'])}{spread} | {100 * r['rel_error']:+.2f}% | {covered(r)} | "
                     f"{_naive(r, 'copy')} | {_naive(r, 'ctrend')} |")
      lines += _sensitivity_lines([a], target) + ['']
  return lines


def analyse_section(analyses, opts):
  """The laws are fitted per sweep by sktlm.scaling.analysis.analyze; this section renders them."""
  return analyses


def render_section(analyses, out: str) -> list[str]:
  md = ['## Fits', '', _formulas(analyses), ''] + _fit_table(analyses) + ['']
  md += [f'A parameter whose {fitlib.CI_LEVEL:.0%} interval spans more than a factor {fitlib.MAX_SPAN:g} (upper / '
         'lower for a positive parameter) or crosses 0 is reported as "not identified by these runs", with its '
         'interval: the runs do not pin it, and its fitted value is not a measurement.', '']
  opt = _optimal_lines(analyses)
  if opt:
    md += ['## Compute-optimal allocation', ''] + opt + ['']
  preds = [(a, p) for a in analyses for p in a.predictions]
  if preds:
    md += ['## Predictions', '', '| sweep | quantity | value | interval |', '|---|---|---|---|']
    md += [f"| {a.label} | {p['what']} | {g(p['value'])} | [{g(p['ci'][0])}, {g(p['ci'][1])}] |"
           for a, p in preds] + ['']
  bt = _backtest_lines(analyses)
  if bt:
    md += ['## Backtest', ''] + bt + ['']
  pv = _predict_lines(analyses)
  if pv:
    md += ['## Predicted versus actual', ''] + pv
  return md

"""Analysis of one or more sweeps: fits, predictions, plots, report.md and fits.json.

Which runs feed which fit:
- L(N): per distinct N, the run with the lowest loss (the best the sweep reached at that size).
- L(C): the compute frontier: runs with a lower loss than every run using less compute.
- L(N, D): every done run. IsoFLOP: every done run, grouped into compute budgets.
A fit the data cannot support is skipped with a warning; if no fit at all succeeds it is an error.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys

import numpy as np

from sktlm.errors import UserError
from sktlm.scaling import fit as fitlib
from sktlm.scaling import io, plots


@dataclasses.dataclass
class Options:
  n_key: str = 'non_embedding'      # non_embedding | total | active
  loss_key: str = 'best_eval'       # best_eval | final_eval | final_train
  flops_key: str = 'exact'          # exact | 6N
  n_boot: int = 200
  seed: int = 0
  delta: float = 1e-3
  isoflop_gap: float = 1.25
  target_params: float | None = None
  target_tokens: float | None = None
  target_flops: float | None = None
  curves: bool = True


@dataclasses.dataclass
class SweepAnalysis:
  label: str
  opts: Options
  sweep: io.Sweep
  data: dict
  fits: dict = dataclasses.field(default_factory=dict)
  ln_points: tuple | None = None
  lc_points: tuple | None = None
  budget_members: dict = dataclasses.field(default_factory=dict)
  curves: dict = dataclasses.field(default_factory=dict)     # run name -> (N, curves)
  predictions: list = dataclasses.field(default_factory=list)
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def flops_curve_key(self) -> str:
    return 'flops' if self.opts.flops_key == 'exact' else 'flops_6n'


def best_per_x(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  xs = np.unique(x)
  return xs, np.array([loss[x == v].min() for v in xs])


def frontier_points(c: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.lexsort((loss, c))
  keep, best = [], math.inf
  for i in order:
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return c[keep], loss[keep]


def _try(a: SweepAnalysis, kind: str, fn):
  try:
    a.fits[kind] = fn()
    a.warnings += [f'{a.label}: {w}' for w in a.fits[kind].warnings]
  except fitlib.FitError as e:
    a.fits[kind] = None
    a.warnings.append(f'{a.label}: {kind} not fitted: {e}')


def analyze(sweep: io.Sweep, opts: Options) -> SweepAnalysis:
  data, warns = io.select(sweep, opts.n_key, opts.loss_key, opts.flops_key)
  a = SweepAnalysis(label=sweep.label, opts=opts, sweep=sweep, data=data, warnings=sweep.warnings + warns)
  if opts.curves:
    for i, name in zip(data['index'], data['name'], strict=True):
      c = io.read_curves(sweep.rows[i]['workdir'])
      if c is not None:
        a.curves[name] = (sweep.rows[i][io.N_COLUMNS[opts.n_key]], c)
    if len(data['N']) and not a.curves:
      a.warnings.append(f'{a.label}: no metrics.jsonl found for any run: no loss-curve plots')
  n, d, c, loss = data['N'], data['D'], data['C'], data['loss']
  common = dict(n_boot=opts.n_boot, seed=opts.seed)
  if len(loss):
    a.ln_points = best_per_x(n, loss)
    _try(a, 'L(N)', lambda: fitlib.fit_power_law(*a.ln_points, kind='L(N)', delta=opts.delta, **common))
    c_ok = c > 0
    if (~c_ok).any():
      a.warnings.append(f'{a.label}: {int((~c_ok).sum())} run(s) without FLOPs left out of L(C) and IsoFLOP')
    if c_ok.any():
      a.lc_points = frontier_points(c[c_ok], loss[c_ok])
      _try(a, 'L(C)', lambda: fitlib.fit_power_law(*a.lc_points, kind='L(C)', delta=opts.delta, **common))
    d_ok = d > 0
    _try(a, 'L(N,D)', lambda: fitlib.fit_parametric(n[d_ok], d[d_ok], loss[d_ok], delta=opts.delta, **common))
    # IsoFLOP only where the sweep has budgets shared by several sizes (not, e.g., a plain size ladder).
    declared = data['budget'][c_ok]
    ids, budgets = fitlib.group_budgets(c[c_ok], declared, opts.isoflop_gap)
    idx = np.flatnonzero(c_ok)
    if any(len(np.unique(n[idx[ids == g]])) >= 3 for g in range(len(budgets))):
      _try(a, 'isoflop', lambda: fitlib.fit_isoflop(n[c_ok], c[c_ok], loss[c_ok], declared_budgets=declared,
                                                     gap=opts.isoflop_gap, **common))
      a.budget_members = {float(b): idx[ids == g] for g, b in enumerate(budgets)}
  else:
    a.warnings.append(f'{a.label}: no done runs with usable values: nothing to fit')
  a.predictions = predictions(a)
  return a


def _pred(law: str, quantity: str, at: dict, value, boot=None, note: str = '') -> dict:
  lo, hi = fitlib.interval(boot) if boot is not None else (math.nan, math.nan)
  where = ', '.join(f'{k}={v:.3g}' for k, v in at.items())
  what = f"{quantity} at {where} ({law}{', ' + note if note else ''})"
  return dict(what=what, law=law, quantity=quantity, at=at, value=float(value), ci=(lo, hi))


def predictions(a: SweepAnalysis) -> list[dict]:
  """Extrapolations to the --target_* config / budget, each with its bootstrap interval."""
  o, out = a.opts, []
  f_n, f_c, f_p, iso = (a.fits.get(k) for k in ('L(N)', 'L(C)', 'L(N,D)', 'isoflop'))
  c_target = o.target_flops
  if o.target_params and o.target_tokens:
    c_target = c_target or 6.0 * o.target_params * o.target_tokens
    if f_p is not None:
      n, d = o.target_params, o.target_tokens
      out.append(_pred('L(N,D)', 'loss', dict(N=n, D=d), f_p.predict(n, d), f_p.predict_boot(n, d)))
  if o.target_params and f_n is not None:
    n = o.target_params
    out.append(_pred('L(N)', 'loss', dict(N=n), f_n.predict(n), f_n.predict_boot(n),
                     note='at the token budgets of the sweep'))
  if c_target:
    at = dict(C=c_target)
    if f_c is not None:
      out.append(_pred('L(C)', 'loss', at, f_c.predict(c_target), f_c.predict_boot(c_target)))
    if f_p is not None and fitlib.allocation_defined(f_p.values):
      n_opt, d_opt, l_opt = fitlib.compute_optimal(f_p.values, c_target)
      nb, db, lb = fitlib.compute_optimal(f_p.boot, c_target)
      out.append(_pred('L(N,D)', 'compute-optimal N', at, n_opt, nb))
      out.append(_pred('L(N,D)', 'compute-optimal D', at, d_opt, db))
      out.append(_pred('L(N,D)', 'compute-optimal loss', at, l_opt, lb))
    if iso is not None:
      out.append(_pred('IsoFLOP', 'compute-optimal N', at, iso.n_opt(c_target), iso.n_opt_boot(c_target)))
      out.append(_pred('IsoFLOP', 'compute-optimal D', at, iso.d_opt(c_target),
                       c_target / (6.0 * iso.n_opt_boot(c_target))))
  for p in out:
    if not math.isfinite(p['value']):
      a.warnings.append(f"{a.label}: prediction '{p['what']}' is not finite")
  return out


# --------------------------------------------------------------------------------------------- writing

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
    f, iso = a.fits.get('L(N,D)'), a.fits.get('isoflop')
    if f is not None and not fitlib.allocation_defined(f.values):
      lines.append(f'- **{a.label}**, from L(N,D): not defined (an exponent is <= 0: see the warnings)')
    elif f is not None:
      v = f.values
      s = v['alpha'] + v['beta']
      g = (v['alpha'] * v['A'] / (v['beta'] * v['B'])) ** (1 / s)
      lines.append(f"- **{a.label}**, from L(N,D): N_opt = {_g(g)} (C/6)^{_g(v['beta'] / s)}, "
                   f"D_opt = (C/6)/N_opt = {_g(1 / g)} (C/6)^{_g(v['alpha'] / s)}")
    if iso is not None:
      lines.append(f"- **{a.label}**, IsoFLOP ({len(iso.budgets)} budgets): N_opt = {_g(iso.k)} C^"
                   f"{_with_ci(iso.a, iso.ci('a'))}, D_opt = C/(6 N_opt) = {_g(1 / (6 * iso.k))} C^{_g(1 - iso.a)}")
      for b in iso.budgets:
        lines.append(f"  - C = {_g(b['C'], 3)}: N_opt = {_g(b['N_opt'], 3)}, loss {_g(b['L_opt'])} "
                     f"({b['n_runs']} runs, N {_g(b['N_min'], 3)}..{_g(b['N_max'], 3)})")
  return lines


def _runs_table(a: SweepAnalysis) -> list[str]:
  o = a.opts
  used_n = set(a.ln_points[0].tolist()) if a.ln_points is not None else set()
  lines = [f'| run | status | N ({o.n_key}) | tokens | C ({o.flops_key}) | {o.loss_key} loss | in fits |',
           '|---|---|---|---|---|---|---|']
  sel = {int(i): j for j, i in enumerate(a.data['index'])}
  front = set(zip(*a.lc_points, strict=True)) if a.lc_points is not None else set()
  for i, r in enumerate(a.sweep.rows):
    j = sel.get(i)
    marks = []
    if j is not None:
      n, c, loss = a.data['N'][j], a.data['C'][j], a.data['loss'][j]
      if n in used_n and loss == a.ln_points[1][list(a.ln_points[0]).index(n)]:
        marks.append('L(N)')
      if (c, loss) in front:
        marks.append('L(C)')
      marks.append('L(N,D)')
    else:
      n, c, loss = r[io.N_COLUMNS[o.n_key]], r[io.FLOPS_COLUMNS[o.flops_key]], r[io.LOSS_COLUMNS[o.loss_key]]
    lines.append(f"| {r['name']} | {r['status']} | {_g(n, 3)} | {_g(r['tokens'], 3)} | {_g(c, 3)} | "
                 f"{_g(loss)} | {' '.join(marks) if j is not None else '-'} |")
  return lines


def write(out: str, analyses: list[SweepAnalysis], opts: Options) -> dict:
  """Plots, fits.json and report.md under `out`; returns the fits.json content."""
  os.makedirs(out, exist_ok=True)
  figs = [plots.curves(analyses, out, 'tokens'), plots.curves(analyses, out, 'flops'),
          plots.loss_vs_n(analyses, out), plots.frontier(analyses, out), plots.isoflop(analyses, out),
          plots.residuals(analyses, out)]
  warnings = [w for a in analyses for w in a.warnings]
  settings = dict(n=opts.n_key, loss=opts.loss_key, flops=opts.flops_key, bootstrap=opts.n_boot, seed=opts.seed,
                  huber_delta=opts.delta, ci_level=fitlib.CI_LEVEL, isoflop_gap=opts.isoflop_gap,
                  target_params=opts.target_params, target_tokens=opts.target_tokens,
                  target_flops=opts.target_flops)
  doc = dict(settings=settings, warnings=warnings, sweeps={
      a.label: dict(path=a.sweep.path, source=a.sweep.source, n_runs=len(a.sweep.rows), n_used=len(a.data['N']),
                    fits={k: (f.to_json() if f is not None else None) for k, f in a.fits.items()},
                    predictions=a.predictions) for a in analyses})
  with open(os.path.join(out, 'fits.json'), 'w') as f:
    json.dump(_finite(doc), f, indent=1, allow_nan=False)
  md = ['# Scaling report', '',
        f"Generated {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} by `sktlm scaling` "
        f"from {', '.join(f'`{a.sweep.path}`' for a in analyses)}.", '',
        f'N = {opts.n_key} parameters, D = training tokens, C = {opts.flops_key} training FLOPs, loss = '
        f'{opts.loss_key}. Fits minimise the summed Huber loss (delta={opts.delta:g}) of log-space residuals '
        f'(Hoffmann et al. 2022); intervals are {fitlib.CI_LEVEL:.0%} percentile intervals over {opts.n_boot} '
        f'bootstrap refits (seed {opts.seed}) resampling the fitted runs.', '']
  md += ['## Warnings', ''] + ([f'- {w}' for w in warnings] or ['none']) + ['']
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


def run(paths: list[str], out: str, opts: Options, labels: list[str] | None = None) -> dict:
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
  analyses = [analyze(s, opts) for s in sweeps]
  if not any(f is not None for a in analyses for f in a.fits.values()):
    raise UserError('no scaling law could be fitted: ' + '; '.join(w for a in analyses for w in a.warnings))
  doc = write(out, analyses, opts)
  for w in doc['warnings']:
    print(f'warning: {w}', file=sys.stderr)
  return doc

"""Analysis of one sweep: every law of the registry fitted on its points, IsoFLOP, the backtest, --predict and
the --target_* predictions.

Runs that differ only in their seed are first averaged into one configuration (sktlm.scaling.points); each law
(sktlm.scaling.laws) then picks its points (e.g. L(N): the best configuration per N; L(C): the compute
frontier; L(N,D): every configuration) and says whether a fixed E applies to it. IsoFLOP: every configuration,
grouped into compute budgets. Every compute quantity is in one FLOP convention (Options.flops_key,
sktlm.scaling.compute). A fit the data cannot support is skipped with a warning; a law whose columns the sweep
does not record is not attempted. Rendering is sktlm.scaling.report.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import compute, io, isoflop, laws, points
from sktlm.scaling import fit as fitlib
from sktlm.scaling import predict as predictlib
from sktlm.scaling.options import Options


@dataclasses.dataclass
class SweepAnalysis:
  label: str
  opts: Options
  sweep: io.Sweep
  data: dict                        # per run (io.select, with the laws' further columns)
  agg: dict | None = None           # per configuration: seeds averaged (points.aggregate)
  fpt: compute.FlopsPerToken | None = None
  fits: dict = dataclasses.field(default_factory=dict)      # law kind (attempted) -> Fit or None; 'isoflop'
  selected: dict = dataclasses.field(default_factory=dict)  # law kind -> agg indices it is fitted on
  budget_members: dict = dataclasses.field(default_factory=dict)   # budget C -> agg indices
  curves: dict = dataclasses.field(default_factory=dict)     # run name -> (N, curves)
  predictions: list = dataclasses.field(default_factory=list)
  backtest: backtestlib.Backtest | None = None
  predicted: dict = dataclasses.field(default_factory=dict)  # --predict sweep label -> predicted-vs-actual rows
  sensitivity: dict = dataclasses.field(default_factory=dict)  # 'backtest' / target label -> [per law E sensitivity]
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def flops_curve_key(self) -> str:
    return 'flops' if self.opts.flops_key == 'exact' else 'flops_6n'

  def points_of(self, kind: str) -> tuple[dict, np.ndarray] | None:
    """(columns, losses) of the points law `kind` is fitted on, or None."""
    idx = self.selected.get(kind)
    if idx is None:
      return None
    return laws.BY_KIND[kind].cols(self.agg, idx), self.agg['loss'][idx]


def _try(a: SweepAnalysis, kind: str, fn):
  fitlib.try_fit(a.fits, a.warnings, kind, fn, f'{a.label}: ')


def analyze(sweep: io.Sweep, opts: Options) -> SweepAnalysis:
  data, warns = io.select(sweep, opts.n_key, opts.loss_key, opts.flops_key)
  data = points.with_row_columns(data, sweep.rows, laws.ROW_COLUMNS)
  a = SweepAnalysis(label=sweep.label, opts=opts, sweep=sweep, data=data, warnings=sweep.warnings + warns)
  if opts.curves:
    for i, name in zip(data['index'], data['name'], strict=True):
      c = io.read_curves(sweep.rows[i]['workdir'])
      if c is not None:
        a.curves[name] = (sweep.rows[i][io.N_COLUMNS[opts.n_key]], c)
    if len(data['N']) and not a.curves:
      a.warnings.append(f'{a.label}: no metrics.jsonl found for any run: no loss-curve plots')
  if not len(data['loss']):
    a.warnings.append(f'{a.label}: no done runs with usable values: nothing to fit')
    return a
  a.fpt = compute.FlopsPerToken.from_runs(data['N'], data['D'], data['C'], opts.flops_key)
  g = a.agg = points.aggregate(data, sweep.rows)
  n, c, loss = g['N'], g['C'], g['loss']
  common = dict(n_boot=opts.n_boot, seed=opts.seed, delta=opts.delta)
  every = np.arange(len(loss))
  c_ok = c > 0
  if (~c_ok).any():
    a.warnings.append(f'{a.label}: {int((~c_ok).sum())} run(s) without FLOPs left out of L(C) and IsoFLOP')
  for law in laws.LAWS:
    if not law.applies(g):
      continue
    idx = a.selected[law.kind] = law.select(g, every)
    fix = opts.fix_E if law.takes_fixed_e(g, every) else None
    _try(a, law.kind, lambda law=law, idx=idx, fix=fix: law.fit(law.cols(g, idx), loss[idx], fix_E=fix, **common))
  # IsoFLOP only where the sweep has budgets shared by several sizes (not, e.g., a plain size ladder).
  declared = g['budget'][c_ok]
  ids, budgets = isoflop.group_budgets(c[c_ok], declared, opts.isoflop_gap)
  idx = np.flatnonzero(c_ok)
  # A WSD ladder (branches: runs with a parent) is not an IsoFLOP sweep even where runs of several sizes
  # happen to share compute (fixed token budgets); it is one where it declares budgets.
  wsd_family = any(str(r.get('parent') or '').strip() for r in sweep.rows)
  iso_design = np.isfinite(declared).any() or not wsd_family
  if iso_design and any(len(np.unique(n[idx[ids == b]])) >= 3 for b in range(len(budgets))):
    _try(a, 'isoflop', lambda: isoflop.fit_isoflop(n[c_ok], c[c_ok], loss[c_ok], declared_budgets=declared,
                                                   gap=opts.isoflop_gap, f=a.fpt, n_boot=opts.n_boot,
                                                   seed=opts.seed))
    a.budget_members = {float(b): idx[ids == k] for k, b in enumerate(budgets)}
  by_budget = bool(a.budget_members)
  k = backtestlib.choose_k(opts.backtest, len(backtestlib.units(g, by_budget, opts.isoflop_gap)[1]))
  try:
    fitted = tuple(kind for kind, f in a.fits.items() if f is not None)
    a.backtest = backtestlib.run(g, k, by_budget=by_budget, gap=opts.isoflop_gap, kinds=fitted, fix_E=opts.fix_E,
                                 **common)
  except fitlib.FitError as e:
    a.warnings.append(f'{a.label}: backtest not run: {e}')
  if a.backtest is not None:
    a.warnings += [f'{a.label}: {w}' for w in a.backtest.warnings]
    if opts.fix_E is not None:
      a.sensitivity['backtest'] = _sensitivity(a, a.backtest.fits, np.flatnonzero(a.backtest.train),
                                               [r for r in a.backtest.rows], g)
  for path in opts.predict:
    target = io.load_sweep(path)
    tg, warns = predictlib.target_points(target, opts.n_key, opts.loss_key, opts.flops_key)
    a.warnings += warns
    if tg is None:
      continue
    rows = a.predicted[target.label] = predictlib.compare(a.fits, g, tg, opts.delta)
    if opts.fix_E is not None:
      a.sensitivity[target.label] = _sensitivity(a, a.fits, every, rows, tg)
  a.predictions = predictions(a)
  return a


def _sensitivity(a: SweepAnalysis, fits: dict, train_idx: np.ndarray, rows: list[dict], pts: dict) -> list[dict]:
  """With E fixed: per law that holds it, refitted at E x 0.75, 1, 1.25, its predictions at every point it
  predicted (`rows`: a backtest's held-out points or a --predict sweep's) and the largest move among them
  (sktlm.scaling.predict.sensitivity)."""
  o, out = a.opts, []
  names = list(pts['name'])
  for law in laws.LAWS:
    f = fits.get(law.kind)
    mine = [r for r in rows if r['law'] == law.kind]
    if f is None or f.fixed_E is None or not mine:
      continue
    idx = law.select(a.agg, train_idx)
    cols, loss = law.cols(a.agg, idx), a.agg['loss'][idx]
    at = [(r['run'], law.cols(pts, names.index(r['run']))) for r in mine]
    out.append(dict(law=law.kind, runs=[r['run'] for r in mine], actual=[r['actual'] for r in mine],
                    rows=predictlib.sensitivity(lambda e, law=law, cols=cols, loss=loss: law.fit(
                        cols, loss, delta=o.delta, n_boot=0, fix_E=e), o.fix_E, at)))
  return out


def beyond_frontier(agg: dict | None, c: float) -> str:
  """'' for a budget inside the range of C the compute frontier covers; else the label of the extrapolation,
  with its factor (an allocation there is the law's, not the runs')."""
  span = points.frontier_range(agg)
  if span is None or span[0] * (1 - 1e-9) <= c <= span[1] * (1 + 1e-9):
    return ''
  factor, where = (c / span[1], 'beyond the largest') if c > span[1] else (span[0] / c, 'below the smallest')
  return f' ({factor:.3g}x {where} C on the compute frontier: an extrapolation)'


def _pred(law: str, quantity: str, at: dict, value, boot=None, note: str = '') -> dict:
  lo, hi = fitlib.interval(boot) if boot is not None else (math.nan, math.nan)
  where = ', '.join(f'{k}={v:.3g}' for k, v in at.items())
  what = f"{quantity} at {where} ({law}{', ' + note if note else ''})"
  return dict(what=what, law=law, quantity=quantity, at=at, value=float(value), ci=(lo, hi))


def predictions(a: SweepAnalysis) -> list[dict]:
  """Extrapolations to the --target_* config / budget, each with its bootstrap interval: every law whose
  columns the targets give, the compute-optimal allocation of the laws that give one, and IsoFLOP's. Every C
  is in the report's convention: a target config's C is f(N) x D with f the sweep's FLOPs per token
  (compute.py)."""
  o, out = a.opts, []
  iso = a.fits.get('isoflop')
  c_target = o.target_flops
  if o.target_params and o.target_tokens and not c_target and a.fpt is not None:
    c_target = float(a.fpt(o.target_params)) * o.target_tokens
    if not a.fpt.in_range(o.target_params):
      a.warnings.append(f'{a.label}: the target N={o.target_params:.3g} lies outside the sizes run '
                        f'({a.fpt.n[0]:.3g}..{a.fpt.n[-1]:.3g}): its FLOPs per token are taken at the nearest '
                        'size\'s FLOPs/N ratio; give --target_flops to state its budget exactly')
  given = {k: v for k, v in (('N', o.target_params), ('D', o.target_tokens if o.target_params else None),
                             ('C', c_target)) if v}
  for law in laws.LAWS:
    f = a.fits.get(law.kind)
    if f is not None and all(col in given for col in law.columns):
      at = {col: given[col] for col in law.columns}
      out.append(_pred(law.kind, 'loss', at, f.predict(at), f.predict_boot(at), note=law.target_note))
  if c_target:
    at = dict(C=c_target)
    for law in laws.allocating():
      f = a.fits.get(law.kind)
      if f is not None and law.allocation_defined(f.values):
        n_opt, d_opt, l_opt = law.optimal(f.values, c_target, a.fpt)
        nb, db, lb = law.optimal(f.boot, c_target, a.fpt)
        note = beyond_frontier(a.agg, c_target).strip(' ()')
        out.append(_pred(law.kind, 'compute-optimal N', at, n_opt, nb, note))
        out.append(_pred(law.kind, 'compute-optimal D', at, d_opt, db, note))
        out.append(_pred(law.kind, 'compute-optimal loss', at, l_opt, lb, note))
    if iso is not None:
      nb = iso.n_opt_boot(c_target)
      out.append(_pred('IsoFLOP', 'compute-optimal N', at, iso.n_opt(c_target), nb))
      out.append(_pred('IsoFLOP', 'compute-optimal D', at, iso.d_opt(c_target), c_target / iso.fpt(nb)))
  for p in out:
    if not math.isfinite(p['value']):
      a.warnings.append(f"{a.label}: prediction '{p['what']}' is not finite")
  return out

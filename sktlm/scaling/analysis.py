"""Analysis of one sweep: which runs feed which fit, the fits, the backtest and the --target_* predictions.

Which runs feed which fit (runs that differ only in their seed are first averaged into one configuration,
sktlm.scaling.points):
- L(N): per distinct N, the configuration with the lowest loss (the best the sweep reached at that size).
- L(C): the compute frontier: configurations with a lower loss than every one using less compute.
- L(N, D): every configuration. IsoFLOP: every configuration, grouped into compute budgets.
Every compute quantity is in one FLOP convention (Options.flops_key, sktlm.scaling.compute). A fit the data
cannot support is skipped with a warning. Rendering is sktlm.scaling.report.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sktlm.scaling import backtest as backtestlib
from sktlm.scaling import compute, io, points
from sktlm.scaling import fit as fitlib
from sktlm.scaling import predict as predictlib


@dataclasses.dataclass
class Options:
  n_key: str = 'non_embedding'      # non_embedding | total | active
  loss_key: str = 'best_eval'       # best_eval | final_eval | final_train
  flops_key: str = 'exact'          # exact | 6n (sktlm.scaling.compute.CONVENTIONS)
  n_boot: int = 200
  seed: int = 0
  delta: float = 1e-3
  isoflop_gap: float = 1.25
  target_params: float | None = None
  target_tokens: float | None = None
  target_flops: float | None = None
  curves: bool = True
  backtest: int = -1                # hold out the K largest sizes / budgets; -1: 1 when >= 4 of them, else 0
  curve_fit: tuple = ()             # run names: fit the Tissue et al. loss-curve law on their curves
  curve_predict: tuple = ()         # run names: predict their final train loss with it
  moe_target: str = ''              # config (experiments/flagship.py) the MoE section predicts
  curve_skip_steps: int = -1        # loss-curve law: records at or before this step are not fitted; -1: warmup end
  fix_E: float | None = None        # hold the asymptote E of every law at this value (None: fitted)
  fix_E_why: str = ''               # the reason for that value, quoted in the report
  predict: tuple = ()               # sweep paths: fit on the positional sweeps, predict every run of these


@dataclasses.dataclass
class SweepAnalysis:
  label: str
  opts: Options
  sweep: io.Sweep
  data: dict                        # per run (io.select)
  agg: dict | None = None           # per configuration: seeds averaged (points.aggregate)
  fpt: compute.FlopsPerToken | None = None
  fits: dict = dataclasses.field(default_factory=dict)
  ln_index: np.ndarray | None = None   # agg points of L(N): best configuration per N
  lc_index: np.ndarray | None = None   # agg points of L(C): the compute frontier
  budget_members: dict = dataclasses.field(default_factory=dict)   # budget C -> agg indices
  curves: dict = dataclasses.field(default_factory=dict)     # run name -> (N, curves)
  predictions: list = dataclasses.field(default_factory=list)
  backtest: backtestlib.Backtest | None = None
  predicted: dict = dataclasses.field(default_factory=dict)  # --predict sweep label -> predicted-vs-actual rows
  sensitivity: dict = dataclasses.field(default_factory=dict)  # 'backtest' / target label -> E sensitivity rows
  warnings: list = dataclasses.field(default_factory=list)

  @property
  def flops_curve_key(self) -> str:
    return 'flops' if self.opts.flops_key == 'exact' else 'flops_6n'

  @property
  def ln_points(self):
    return None if self.ln_index is None else (self.agg['N'][self.ln_index], self.agg['loss'][self.ln_index])

  @property
  def lc_points(self):
    return None if self.lc_index is None else (self.agg['C'][self.lc_index], self.agg['loss'][self.lc_index])


def _try(a: SweepAnalysis, kind: str, fn):
  fitlib.try_fit(a.fits, a.warnings, kind, fn, f'{a.label}: ')


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
  if not len(data['loss']):
    a.warnings.append(f'{a.label}: no done runs with usable values: nothing to fit')
    return a
  a.fpt = compute.FlopsPerToken.from_runs(data['N'], data['D'], data['C'], opts.flops_key)
  g = a.agg = points.aggregate(data, sweep.rows)
  n, d, c, loss = g['N'], g['D'], g['C'], g['loss']
  common = dict(n_boot=opts.n_boot, seed=opts.seed, fix_E=opts.fix_E)
  a.ln_index = points.best_index_per_x(n, loss)
  # L(N) is fitted at the sweep's token budgets: its asymptote is E + B/D^beta, not E, so --fix_E leaves it free.
  free = {**common, 'fix_E': None}
  _try(a, 'L(N)', lambda: fitlib.fit_power_law(*a.ln_points, kind='L(N)', delta=opts.delta, **free))
  c_ok = c > 0
  if (~c_ok).any():
    a.warnings.append(f'{a.label}: {int((~c_ok).sum())} run(s) without FLOPs left out of L(C) and IsoFLOP')
  if c_ok.any():
    a.lc_index = np.flatnonzero(c_ok)[points.frontier_index(c[c_ok], loss[c_ok])]
    # On a fixed-budget grid the frontier's top is D-limited: its asymptote is not E (sktlm.scaling.backtest).
    lc = free if backtestlib.shared_largest_budget(n, d) else common
    _try(a, 'L(C)', lambda: fitlib.fit_power_law(*a.lc_points, kind='L(C)', delta=opts.delta, **lc))
  d_ok = d > 0
  _try(a, 'L(N,D)', lambda: fitlib.fit_parametric(n[d_ok], d[d_ok], loss[d_ok], delta=opts.delta, **common))
  # IsoFLOP only where the sweep has budgets shared by several sizes (not, e.g., a plain size ladder).
  declared = g['budget'][c_ok]
  ids, budgets = fitlib.group_budgets(c[c_ok], declared, opts.isoflop_gap)
  idx = np.flatnonzero(c_ok)
  # A WSD ladder (branches: runs with a parent) is not an IsoFLOP sweep even where runs of several sizes
  # happen to share compute (fixed token budgets); it is one where it declares budgets.
  wsd_family = any(str(r.get('parent') or '').strip() for r in sweep.rows)
  iso_design = np.isfinite(declared).any() or not wsd_family
  if iso_design and any(len(np.unique(n[idx[ids == b]])) >= 3 for b in range(len(budgets))):
    _try(a, 'isoflop', lambda: fitlib.fit_isoflop(n[c_ok], c[c_ok], loss[c_ok], declared_budgets=declared,
                                                   gap=opts.isoflop_gap, f=a.fpt, n_boot=opts.n_boot,
                                                   seed=opts.seed))
    a.budget_members = {float(b): idx[ids == k] for k, b in enumerate(budgets)}
  by_budget = bool(a.budget_members)
  k = backtestlib.choose_k(opts.backtest, len(backtestlib.units(g, by_budget, opts.isoflop_gap)[1]))
  try:
    fitted = tuple(kind for kind, f in a.fits.items() if f is not None)
    a.backtest = backtestlib.run(g, k, by_budget=by_budget, gap=opts.isoflop_gap, delta=opts.delta, kinds=fitted,
                                 **common)
  except fitlib.FitError as e:
    a.warnings.append(f'{a.label}: backtest not run: {e}')
  if a.backtest is not None:
    a.warnings += [f'{a.label}: {w}' for w in a.backtest.warnings]
    if opts.fix_E is not None and a.backtest.fits.get('L(N,D)') is not None:
      t = a.backtest.train & (d > 0)
      held = [r for r in a.backtest.rows if r['law'] == 'L(N,D)']
      r = max(held, key=lambda r: (r['N'], r['D']))
      a.sensitivity['backtest'] = dict(run=r['run'], actual=r['actual'], rows=predictlib.sensitivity(
          lambda e: fitlib.fit_parametric(n[t], d[t], loss[t], delta=opts.delta, n_boot=0, fix_E=e), opts.fix_E,
          (r['N'], r['D'])))
  for path in opts.predict:
    target = io.load_sweep(path)
    tg, warns = predictlib.target_points(target, opts.n_key, opts.loss_key, opts.flops_key)
    a.warnings += warns
    if tg is None:
      continue
    a.predicted[target.label] = predictlib.compare(a.fits, g, tg)
    if opts.fix_E is not None and a.fits.get('L(N,D)') is not None:
      i = int(np.lexsort((tg['D'], tg['N']))[-1])
      a.sensitivity[target.label] = dict(run=tg['name'][i], actual=float(tg['loss'][i]), rows=predictlib.sensitivity(
          lambda e: fitlib.fit_parametric(n[d_ok], d[d_ok], loss[d_ok], delta=opts.delta, n_boot=0, fix_E=e),
          opts.fix_E, (tg['N'][i], tg['D'][i])))
  a.predictions = predictions(a)
  return a


def _pred(law: str, quantity: str, at: dict, value, boot=None, note: str = '') -> dict:
  lo, hi = fitlib.interval(boot) if boot is not None else (math.nan, math.nan)
  where = ', '.join(f'{k}={v:.3g}' for k, v in at.items())
  what = f"{quantity} at {where} ({law}{', ' + note if note else ''})"
  return dict(what=what, law=law, quantity=quantity, at=at, value=float(value), ci=(lo, hi))


def predictions(a: SweepAnalysis) -> list[dict]:
  """Extrapolations to the --target_* config / budget, each with its bootstrap interval. Every C is in the
  report's convention: a target config's C is f(N) x D with f the sweep's FLOPs per token (compute.py)."""
  o, out = a.opts, []
  f_n, f_c, f_p, iso = (a.fits.get(k) for k in ('L(N)', 'L(C)', 'L(N,D)', 'isoflop'))
  c_target = o.target_flops
  if o.target_params and o.target_tokens:
    if not c_target and a.fpt is not None:
      c_target = float(a.fpt(o.target_params)) * o.target_tokens
      if not a.fpt.in_range(o.target_params):
        a.warnings.append(f'{a.label}: the target N={o.target_params:.3g} lies outside the sizes run '
                          f'({a.fpt.n[0]:.3g}..{a.fpt.n[-1]:.3g}): its FLOPs per token are taken at the nearest '
                          'size\'s FLOPs/N ratio; give --target_flops to state its budget exactly')
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
      n_opt, d_opt, l_opt = fitlib.compute_optimal(f_p.values, c_target, a.fpt)
      nb, db, lb = fitlib.compute_optimal(f_p.boot, c_target, a.fpt)
      out.append(_pred('L(N,D)', 'compute-optimal N', at, n_opt, nb))
      out.append(_pred('L(N,D)', 'compute-optimal D', at, d_opt, db))
      out.append(_pred('L(N,D)', 'compute-optimal loss', at, l_opt, lb))
    if iso is not None:
      nb = iso.n_opt_boot(c_target)
      out.append(_pred('IsoFLOP', 'compute-optimal N', at, iso.n_opt(c_target), nb))
      out.append(_pred('IsoFLOP', 'compute-optimal D', at, iso.d_opt(c_target), c_target / iso.fpt(nb)))
  for p in out:
    if not math.isfinite(p['value']):
      a.warnings.append(f"{a.label}: prediction '{p['what']}' is not finite")
  return out

"""The report's "Mixture of experts" section: dense and MoE runs of one sweep side by side.

Per configuration (runs that differ only in the peak LR keep their best loss):
- loss against active and total non-embedding N per routed-expert ratio X = routed experts / top_k (the E of
  Ludziejewski et al. 2025 for top-1 routing; Krajewski et al.'s expansion rate at any granularity);
- the joint MoE law fitted on all of them (sktlm.scaling.moe_laws): the full law when the runs vary D
  independently of N, else its merged form along the ladder's D = r N_act line;
- the compute multiplier of each MoE configuration over dense at equal loss: C_dense(L) / C_moe, where the
  dense model of equal loss comes from the fitted law at X = 1 on the same D/N line and its compute from the
  dense runs' C(N) (ln C linear in ln N); its interval over the law's bootstrap refits. Also, without any law,
  the dense runs' ln C interpolated at the MoE loss (blank outside the dense loss range);
- a backtest: the law refitted without the largest size (all its X), asked for that size;
- a target (a config such as experiments/flagship.py): the law's loss at its active N and X, with the
  bootstrap interval and the extrapolation factors in N_act and C, labelled as the extrapolation it is.
Compute is in the report's FLOP convention (active FLOPs per token: routed top-k experts, shared experts and
the router, sktlm/config/accounting.py).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from scipy import optimize

from sktlm import runfiles
from sktlm.errors import UserError
from sktlm.scaling import fit as fitlib
from sktlm.scaling import io
from sktlm.scaling import moe_laws as ml

MAX_ND_CORRELATION = 0.98


def _f(v) -> float:
  return io._float(v)  # noqa: SLF001 - the one numeric parser of result rows


def points(sweep: io.Sweep, loss_col: str, c_col: str) -> dict | None:
  """Best loss per (size, X, G, shared, D) among done runs that record their MoE shape; None if no MoE run."""
  best: dict[tuple, dict] = {}
  for r in sweep.rows:
    e, loss = _f(r.get('moe_experts')), _f(r.get(loss_col))
    if r.get('status') != runfiles.DONE or not (e >= 1 and loss > 0):
      continue
    k, g = _f(r.get('moe_top_k')) if e > 1 else 1.0, _f(r.get('moe_granularity'))
    n_act = _f(r.get('n_params_active_non_embedding'))
    n_tot = _f(r.get('n_params_non_embedding'))
    p = dict(name=r['name'], size=str(r.get('size') or ''), N_act=n_act if n_act > 0 else n_tot, N_total=n_tot,
             D=_f(r.get('tokens')), C=_f(r.get(c_col)), loss=loss, experts=e, X=e / max(k, 1.0),
             G=g if g > 0 else 1.0, shared=_f(r.get('moe_shared_experts')) or 0.0,
             dropped=_f(r.get('moe_dropped_frac')))
    key = (p['size'] or round(p['N_act'], -2), p['X'], p['G'], p['shared'], p['D'])
    p['n_runs'] = best.get(key, {}).get('n_runs', 0) + 1
    if key not in best or loss < best[key]['loss']:
      best[key] = p
    best[key]['n_runs'] = p['n_runs']
  pts = list(best.values())
  if not any(p['X'] > 1 for p in pts) or not any(p['X'] == 1 for p in pts):
    return None
  pts.sort(key=lambda p: (p['X'], p['N_act']))
  out = {k: np.array([p[k] for p in pts]) for k in pts[0]}
  return out


def law_for(pts: dict):
  """The full joint law when D varies apart from N, else the merged law along D = r N_act."""
  corr = np.corrcoef(np.log(pts['N_act']), np.log(pts['D']))[0, 1] if np.ptp(np.log(pts['D'])) > 0 else 1.0
  if abs(corr) < MAX_ND_CORRELATION and len(pts['loss']) > 12:
    return ml.joint_law(), dict(N=pts['N_act'], D=pts['D'], E=pts['X'])
  return ml.joint_line_law(), dict(N=pts['N_act'], E=pts['X'])


def _cols(law: ml.Law, n, d, x):
  return dict(N=n, D=d, E=x) if 'D' in law.columns else dict(N=n, E=x)


def dense_equivalent_n(law: ml.Law, theta, n, d, x) -> float:
  """N' of the dense model (X = 1, same D/N) the law gives the same loss as (n, d, x); nan if none in 1..1e16."""
  target = law.log_predict(theta, ml._cols(_cols(law, n, d, x)))[0]  # noqa: SLF001
  r = d / n

  def h(u):
    return law.log_predict(theta, ml._cols(_cols(law, math.exp(u), r * math.exp(u), 1.0)))[0] - target  # noqa: SLF001
  lo, hi = 0.0, math.log(1e16)
  try:
    if h(lo) * h(hi) > 0:
      return math.nan
    return math.exp(optimize.brentq(h, lo, hi, xtol=1e-10))
  except (ValueError, FloatingPointError):
    return math.nan


def dense_compute(pts: dict):
  """ln C = p0 + p1 ln N over the dense points (exact for a tokens-per-parameter ladder)."""
  dense = pts['X'] == 1
  p1, p0 = np.polyfit(np.log(pts['N_act'][dense]), np.log(pts['C'][dense]), 1)
  return lambda n: math.exp(p0 + p1 * math.log(n))


def interpolated_multiplier(pts: dict, loss: float, c: float) -> float:
  """ln C of the dense runs interpolated at `loss` (no law), over c; nan outside the dense loss range."""
  dense = pts['X'] == 1
  lo, lc = pts['loss'][dense], np.log(pts['C'][dense])
  order = np.argsort(lo)
  if not lo.min() <= loss <= lo.max():
    return math.nan
  return math.exp(np.interp(loss, lo[order], lc[order])) / c


def multipliers(pts: dict, fit: ml.LawFit) -> list[dict]:
  c_of = dense_compute(pts)
  rows = []
  for i in np.flatnonzero(pts['X'] > 1):
    n, d, x, c = pts['N_act'][i], pts['D'][i], pts['X'][i], pts['C'][i]
    n_eq = dense_equivalent_n(fit.law, fit.theta, n, d, x)
    boot = np.array([c_of(v) / c if v > 0 else math.nan
                     for v in (dense_equivalent_n(fit.law, t, n, d, x) for t in fit.boot)])
    rows.append(dict(name=pts['name'][i], size=pts['size'][i], X=float(x), N_act=float(n), C=float(c),
                     loss=float(pts['loss'][i]), N_dense_equal=n_eq,
                     multiplier=c_of(n_eq) / c if n_eq > 0 else math.nan, ci=fitlib.interval(boot),
                     interpolated=interpolated_multiplier(pts, pts['loss'][i], c)))
  return rows


def per_x(rows: list[dict]) -> dict:
  """Geometric mean multiplier over sizes per X."""
  out = {}
  for x in sorted({r['X'] for r in rows}):
    m = [r['multiplier'] for r in rows if r['X'] == x and r['multiplier'] > 0]
    out[x] = math.exp(np.mean(np.log(m))) if m else math.nan
  return out


def backtest(pts: dict, n_boot: int, seed: int, delta: float) -> dict | None:
  """Refit without the largest size (every X of it) and predict it."""
  sizes = pts['size'] if all(pts['size']) else np.round(pts['N_act'][pts['X'] == 1], -2)
  dense_n = {s: n for s, n, x in zip(pts['size'], pts['N_act'], pts['X'], strict=True) if x == 1}
  if len(dense_n) < 3:
    return None
  largest = max(dense_n, key=dense_n.get)
  held = np.array([s == largest for s in sizes])
  train = {k: v[~held] for k, v in pts.items()}
  law, cols = law_for(train)
  try:
    f = ml.fit_law(law, cols, train['loss'], n_boot=n_boot, seed=seed, delta=delta)
  except fitlib.FitError as e:
    return dict(size=largest, error=str(e))
  rows = []
  for i in np.flatnonzero(held):
    c = _cols(law, pts['N_act'][i], pts['D'][i], pts['X'][i])
    pred = float(f.predict(c)[0])
    rows.append(dict(name=pts['name'][i], X=float(pts['X'][i]), actual=float(pts['loss'][i]), predicted=pred,
                     ci=fitlib.interval(f.predict_boot(c)[:, 0]), rel_error=pred / pts['loss'][i] - 1))
  return dict(size=largest, law=law.kind, rows=rows, n_train=int((~held).sum()), warnings=f.warnings)


def target_prediction(spec: str, tokens: float | None, fit: ml.LawFit, pts: dict, flops_key: str) -> dict:
  """The fitted law at a target config (e.g. experiments/flagship.py): its active N, X, planned tokens."""
  from sktlm.config import accounting, load  # no jax

  cfg = load.load_config(spec, {})
  mc = cfg.model
  if not mc.vocab_size:
    raise UserError(f'--moe_target {spec}: the config must set model.vocab_size to count its parameters')
  counts = accounting.param_counts(mc)
  moe = mc.moe
  x = moe.num_experts / moe.top_k if moe.num_experts > 0 else 1.0
  n_act = counts['active_non_embedding']
  planned = float(cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len)
  d = float(tokens) if tokens else planned
  fpt = accounting.flops_per_token(mc, cfg.data.seq_len)['exact' if flops_key == 'exact' else '6N']
  r_sweep = float(np.exp(np.mean(np.log(pts['D'] / pts['N_act']))))
  line = 'D' not in fit.law.columns
  c = _cols(fit.law, n_act, d, x)
  pred = float(fit.predict(c)[0])
  return dict(config=spec, N_act=float(n_act), N_total=float(counts['non_embedding']), X=float(x),
              experts=int(moe.num_experts), top_k=int(moe.top_k), tokens=d, tokens_planned=planned, C=fpt * d,
              loss=pred, ci=fitlib.interval(fit.predict_boot(c)[:, 0]),
              extrapolation_C=fpt * d / float(np.max(pts['C'])),
              extrapolation_N=float(n_act / np.max(pts['N_act'])), law=fit.law.kind,
              at_sweep_ratio=line, sweep_tokens_per_param=r_sweep)


def analyse(sweep: io.Sweep, loss_col: str, c_col: str, n_boot: int, seed: int, delta: float,
            target: str = '', target_tokens: float | None = None, flops_key: str = 'exact') -> dict | None:
  pts = points(sweep, loss_col, c_col)
  if pts is None:
    return None
  out = dict(label=sweep.label, points={k: v.tolist() for k, v in pts.items()}, warnings=[])
  law, cols = law_for(pts)
  try:
    fit = ml.fit_law(law, cols, pts['loss'], n_boot=n_boot, seed=seed, delta=delta)
  except fitlib.FitError as e:
    out['warnings'].append(f'MoE law not fitted: {e}')
    return out
  out['fit'] = fit.to_json()
  out['warnings'] += fit.warnings
  out['multipliers'] = multipliers(pts, fit)
  out['multiplier_by_X'] = per_x(out['multipliers'])
  out['backtest'] = backtest(pts, n_boot, seed, delta)
  if target:
    out['target'] = target_prediction(target, target_tokens, fit, pts, flops_key)
  out['_fit'], out['_pts'] = fit, pts
  return out


def _g(v, digits=4) -> str:
  return 'n/a' if v is None or not np.isfinite(v) else f'{v:.{digits}g}'


def _ci(ci) -> str:
  return f'[{_g(ci[0], 3)}, {_g(ci[1], 3)}]'


def lines(res: dict, figs: list) -> list[str]:
  pts = res['points']
  md = [f"### {res['label']}", '']
  md += ['| run | X = E/top_k | G | shared | N_act | N_total | D | C | loss | LR runs | dropped frac |',
         '|---|---|---|---|---|---|---|---|---|---|---|']
  for i in range(len(pts['name'])):
    md.append(f"| {pts['name'][i]} | {_g(pts['X'][i])} | {_g(pts['G'][i])} | {int(pts['shared'][i])} | "
              f"{_g(pts['N_act'][i], 3)} | {_g(pts['N_total'][i], 3)} | {_g(pts['D'][i], 3)} | {_g(pts['C'][i], 3)} | "
              f"{pts['loss'][i]:.4f} | {int(pts['n_runs'][i])} | {_g(pts['dropped'][i], 2)} |")
  md.append('')
  for w in res['warnings']:
    md.append(f'- warning: {w}')
  if 'fit' not in res:
    return md + ['']
  f = res['fit']
  law = ('L = a Ê^delta N_act^(alpha + gamma ln Ê) + c (the joint law along the ladder\'s D = r N_act line: '
         'its two terms merged)' if f['kind'] == 'joint_line' else
         'L = a Ê^delta N_act^(alpha + gamma ln Ê) + b Ê^omega D^(beta + zeta ln Ê) + c')
  md += [f'**Fitted law** (Ludziejewski et al. 2025, Ê of Clark et al. with the published E_start, E_max; '
         f"{f['n_points']} configurations): {law}", '',
         '| parameter | value | 95% interval |', '|---|---|---|']
  md += [f"| {k} | {_g(v)} | {_ci(f['ci'][k])} |" for k, v in f['values'].items()] + ['']
  md += ['**Compute multiplier over dense at equal loss** (C of the dense model the law gives the same loss '
         'on the same D/N line, over the MoE run\'s C; interval over the law\'s bootstrap; "interpolated": the '
         'dense runs\' ln C interpolated at the MoE loss, no law):', '',
         '| run | X | loss | multiplier | 95% interval | interpolated |', '|---|---|---|---|---|---|']
  md += [f"| {m['name']} | {_g(m['X'])} | {m['loss']:.4f} | {_g(m['multiplier'], 3)} | {_ci(m['ci'])} | "
         f"{_g(m['interpolated'], 3)} |" for m in res['multipliers']]
  md += ['', 'Geometric mean over sizes: ' + ', '.join(f'X={_g(x)}: {_g(v, 3)}x'
                                                    for x, v in res['multiplier_by_X'].items()), '']
  bt = res.get('backtest')
  if bt and 'rows' in bt:
    md += [f"**Backtest**: the law ({bt['law']}) refitted on {bt['n_train']} configurations without size "
           f"{bt['size']}, asked for it:", '', '| run | X | actual | predicted | 95% interval | error |',
           '|---|---|---|---|---|---|']
    md += [f"| {r['name']} | {_g(r['X'])} | {r['actual']:.4f} | {r['predicted']:.4f} | {_ci(r['ci'])} | "
           f"{100 * r['rel_error']:+.2f}% |" for r in bt['rows']] + ['']
    md += [f'- backtest fit: {w}' for w in bt['warnings']] + ([''] if bt['warnings'] else [])
  elif bt:
    md += [f"Backtest not run: {bt['error']}", '']
  t = res.get('target')
  if t:
    where = (f"at this sweep's D/N_act = {t['sweep_tokens_per_param']:.3g} (the merged law cannot move off the "
             f"ladder's line; the config plans {t['tokens_planned']:.3g} tokens, D/N_act = "
             f"{t['tokens_planned'] / t['N_act']:.3g})" if t['at_sweep_ratio'] else f"at {t['tokens']:.3g} tokens")
    md += [f"**Target {t['config']}** ({t['experts']} routed experts, top-{t['top_k']}: X = {_g(t['X'])}; "
           f"N_act {t['N_act']:.3g}, N_total {t['N_total']:.3g}): predicted loss {t['loss']:.4f} "
           f"{_ci(t['ci'])} {where}. **Extrapolation**: {t['extrapolation_N']:.3g}x the largest active N run "
           f"and {t['extrapolation_C']:.3g}x its compute (C = {t['C']:.3g}); a law fitted at these scales on "
           'this corpus says little about that model, and the interval covers only the fit\'s noise.', '']
  md += [f'![{name[:-4]}]({name})\n' for name in figs if name]
  return md


def plots(res: dict, out: str, tag: str) -> list[str]:
  from sktlm.scaling import plots as plotlib
  plt = plotlib.plt
  pts, fit = res['_pts'], res.get('_fit')
  xs = sorted(set(pts['X'].tolist()))
  cmap = plt.get_cmap('viridis')
  col = {x: cmap(i / max(1, len(xs) - 1)) for i, x in enumerate(xs)}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, key, title in ((axes[0], 'N_act', 'active'), (axes[1], 'N_total', 'total')):
    for x in xs:
      m = pts['X'] == x
      lab = 'dense' if x == 1 else f'X = {x:g}'
      ax.plot(pts[key][m], pts['loss'][m], 'o', color=col[x], label=lab)
      if fit is not None and 'D' not in fit.law.columns:
        n = np.geomspace(pts['N_act'][m].min() / 1.5, pts['N_act'][m].max() * 1.5, 50)
        curve = fit.predict(dict(N=n, E=np.full_like(n, x)))
        ax.plot(n * (pts[key][m].mean() / pts['N_act'][m].mean()) if key == 'N_total' else n, curve, '-',
                color=col[x], alpha=0.6)
    ax.set_xscale('log')
    ax.set_xlabel(f'{title} non-embedding parameters')
    ax.set_title(f'loss vs {title} N per expert ratio')
  axes[0].set_ylabel('loss')
  axes[0].legend(fontsize=8)
  names = [plotlib._save(fig, out, f'moe_loss_{tag}')]  # noqa: SLF001
  rows = res.get('multipliers') or []
  if rows:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for x in xs[1:]:
      rs = [r for r in rows if r['X'] == x]
      n = np.array([r['N_act'] for r in rs])
      m = np.array([r['multiplier'] for r in rs])
      lo = np.array([r['ci'][0] for r in rs])
      hi = np.array([r['ci'][1] for r in rs])
      ax.errorbar(n, m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], fmt='o-', color=col[x],
                  capsize=3, label=f'X = {x:g}')
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_xscale('log')
    ax.set_xlabel('active non-embedding parameters')
    ax.set_ylabel('compute multiplier over dense')
    ax.set_title('dense compute for the same loss / MoE compute')
    ax.legend(fontsize=8)
    names.append(plotlib._save(fig, out, f'moe_multiplier_{tag}'))  # noqa: SLF001
  return names


def analyse_section(analyses, opts) -> list | None:
  """[(sweep position, its analysis)] of the sweeps with dense and MoE runs, or None when there is none."""
  results = []
  for i, a in enumerate(analyses):
    res = analyse(a.sweep, io.loss_column(opts.loss_key), io.FLOPS_COLUMNS[opts.flops_key], opts.n_boot, opts.seed,
                  opts.delta, opts.moe_target, opts.target_tokens, opts.flops_key)
    if res is not None:
      results.append((i, res))
  return results or None


def render_section(results: list, out: str) -> list[str]:
  """Markdown lines of the section; writes moe.json and the plots."""
  md = ['## Mixture of experts', '',
        'X = routed experts / top_k (the E of the joint MoE law for top-1 routing); N_act and N_total are active and '
        'total non-embedding parameters; C is in the report\'s convention with the active FLOPs per token '
        '(router included); runs differing only in LR keep their best. See sktlm/scaling/moe_report.py.', '']
  for i, res in results:
    md += lines(res, plots(res, out, str(i)))
  doc = [{k: v for k, v in res.items() if not k.startswith('_')} for _, res in results]
  with open(os.path.join(out, 'moe.json'), 'w') as f:
    json.dump(_finite(doc), f, indent=1, allow_nan=False)
  return md


def _finite(o):
  if isinstance(o, dict):
    return {str(k): _finite(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_finite(v) for v in o]
  if isinstance(o, np.generic):
    o = o.item()
  if isinstance(o, float) and not math.isfinite(o):
    return None
  return o

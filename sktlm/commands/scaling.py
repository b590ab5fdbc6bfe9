"""`sktlm scaling --sweep_dir=SWEEP [--sweep_dir=SWEEP2 ...] --out=report/` (or the folders alone): fit scaling
laws, write report.md, plots, fits.json.

A SWEEP_DIR holds results.csv (from `sktlm sweep`) or run workdirs (summary.json); several sweeps are
fitted separately and drawn on shared figures (e.g. two architectures). See docs/scaling.md.
Never imports jax: runs on any machine that has the result files.
"""

from __future__ import annotations

from absl import flags

from sktlm.errors import UserError

_SWEEP_DIRS = flags.DEFINE_multi_string('sweep_dir', None, 'a sweep folder (repeat for several)')
_OUT = flags.DEFINE_string('out', None, 'output folder for report.md, fits.json and the plots')
_N = flags.DEFINE_enum('n', 'non_embedding', ['non_embedding', 'total', 'active'],
                       'parameter count used as N (non_embedding: Kaplan et al.; active: MoE per-token)')
_LOSS = flags.DEFINE_string('loss', 'best_eval', 'loss per run: best_eval | final_eval | final_train | eval:NAME '
                            '(the `sktlm eval` record RUN/evals/NAME.json)')
_FLOPS = flags.DEFINE_enum('flops', 'exact', ['exact', '6n'], 'FLOP convention of every compute quantity in the '
                           'report: exact (model FLOPs: 6N + full TxT attention, as MFU) or 6n (see '
                           'sktlm/config/accounting.py)', case_sensitive=False)
_BACKTEST = flags.DEFINE_integer('backtest', -1, 'fit on all but the K largest sizes (or compute budgets) and '
                                 'predict those; -1: 1 when there are >= 4 sizes (budgets), else none; 0: none')
_TARGET_PARAMS = flags.DEFINE_float('target_params', None, 'predict the loss of a model with this N')
_TARGET_TOKENS = flags.DEFINE_float('target_tokens', None, 'with --target_params: trained on this many tokens')
_TARGET_FLOPS = flags.DEFINE_float('target_flops', None,
                                   'predict loss and compute-optimal N, D at this budget (default: the target '
                                   'config\'s FLOPs per token x tokens, in the --flops convention)')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'bootstrap resamples for the intervals (0: none)')
_SEED = flags.DEFINE_integer('seed', 0, 'bootstrap seed')
_LABELS = flags.DEFINE_list('labels', None, 'names of the sweeps in plots and tables (default: folder names)')
_DELTA = flags.DEFINE_float('huber_delta', 1e-3, 'Huber delta on log-loss residuals (Hoffmann et al.: 1e-3)')
_GAP = flags.DEFINE_float('isoflop_gap', 1.25,
                          'runs without a declared budget are grouped while sorted compute grows by <= this factor')
_CURVE_FIT = flags.DEFINE_list('curve_fit', [], 'runs (names) of one size: fit the loss-curve law of Tissue et '
                                'al. 2024, L = L0 + A S1^-alpha - C S2, on their metrics.jsonl')
_CURVE_PREDICT = flags.DEFINE_list('curve_predict', [], 'runs (names) whose final train loss the loss-curve law '
                                   'predicts from their own LR schedule (e.g. WSD decay branches)')
_MOE_TARGET = flags.DEFINE_string('moe_target', '', 'config (e.g. experiments/flagship.py) whose loss the '
                                  'MoE section predicts with the fitted MoE law (tokens: planned, or --target_tokens)')
_CURVE_SKIP = flags.DEFINE_integer('curve_skip_steps', -1, 'loss-curve law: leave out logged losses at or before '
                                   'this step (the early transient); -1: the end of the LR warmup')
_PREDICT = flags.DEFINE_list('predict', [], 'sweep folders whose every run the laws fitted on the positional '
                             'sweeps predict: a predicted-vs-actual table and plot with intervals and '
                             'extrapolation factors')
_FIX_E = flags.DEFINE_float('fix_E', None, 'hold the asymptote E of every law at this value (E is often '
                            'unidentified on small ladders); the report shows the predictions at E +- 25%')
_FIX_E_WHY = flags.DEFINE_string('fix_E_why', '', 'why E has the --fix_E value (quoted in the report)')
_CURVES = flags.DEFINE_bool('curves', True, 'read metrics.jsonl of each run for the loss-curve plots')


def main(argv):
  from sktlm.scaling import analysis, compute, report  # numpy/scipy/matplotlib only

  paths = list(_SWEEP_DIRS.value or []) + argv[1:]
  if not _OUT.value:
    raise UserError('--out=<folder> is required')
  for name, v in (('target_params', _TARGET_PARAMS.value), ('target_tokens', _TARGET_TOKENS.value),
                  ('target_flops', _TARGET_FLOPS.value), ('huber_delta', _DELTA.value)):
    if v is not None and not v > 0:
      raise UserError(f'--{name} must be > 0, got {v}')
  if _LOSS.value not in ('best_eval', 'final_eval', 'final_train') and not _LOSS.value.startswith('eval:'):
    raise UserError(f'--loss must be best_eval, final_eval, final_train or eval:NAME, got {_LOSS.value!r}')
  if _TARGET_TOKENS.value and not (_TARGET_PARAMS.value or _MOE_TARGET.value):
    raise UserError('--target_tokens needs --target_params or --moe_target')
  if _BOOTSTRAP.value < 0:
    raise UserError(f'--bootstrap must be >= 0, got {_BOOTSTRAP.value}')
  if not _GAP.value > 1:
    raise UserError(f'--isoflop_gap must be > 1, got {_GAP.value}')
  if _FIX_E.value is not None and not _FIX_E.value > 0:
    raise UserError(f'--fix_E must be > 0, got {_FIX_E.value}')
  if _FIX_E_WHY.value and _FIX_E.value is None:
    raise UserError('--fix_E_why needs --fix_E')
  if _CURVE_SKIP.value < -1:
    raise UserError(f'--curve_skip_steps must be >= 0 (or -1: the warmup end), got {_CURVE_SKIP.value}')
  if _BACKTEST.value < -1:
    raise UserError(f'--backtest must be >= 0 (or -1: automatic), got {_BACKTEST.value}')
  opts = analysis.Options(n_key=_N.value, loss_key=_LOSS.value, flops_key=compute.convention(_FLOPS.value),
                        backtest=_BACKTEST.value, n_boot=_BOOTSTRAP.value,
                        seed=_SEED.value, delta=_DELTA.value, isoflop_gap=_GAP.value,
                        target_params=_TARGET_PARAMS.value, target_tokens=_TARGET_TOKENS.value,
                        target_flops=_TARGET_FLOPS.value, curves=_CURVES.value,
                        curve_fit=tuple(_CURVE_FIT.value), curve_predict=tuple(_CURVE_PREDICT.value),
                        moe_target=_MOE_TARGET.value,
                        curve_skip_steps=_CURVE_SKIP.value, fix_E=_FIX_E.value, fix_E_why=_FIX_E_WHY.value,
                        predict=tuple(_PREDICT.value))
  if _CURVE_PREDICT.value and not _CURVE_FIT.value:
    raise UserError('--curve_predict needs --curve_fit (the runs to fit the loss-curve law on)')
  doc = report.run(paths, _OUT.value, opts, labels=_LABELS.value)
  print(f'wrote {_OUT.value}/report.md, fits.json and plots')
  for p in (doc.get('curve_law') or {}).get('predictions', []):
    print(f"loss-curve law: predicts {p['run']} at step {p['step']}: {p['predicted']:.4g}, actual "
          f"{p['actual']:.4g}: error {100 * p['rel_error']:+.2f}%")
  for line in doc['predict_summary'] + doc['backtest_summary']:  # last: what `make main` ends with
    print(line)
  return 0

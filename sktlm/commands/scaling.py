"""`sktlm scaling --sweep_dir=SWEEP [--sweep_dir=SWEEP2 ...] --out=report/` (or the folders alone): fit scaling
laws, write report.md, plots, fits.json.

A SWEEP_DIR holds results.csv (from `sktlm sweep`) or run workdirs (summary.json); several sweeps are
fitted separately and drawn on shared figures (e.g. two architectures). See docs/scaling.md; every option,
its default and its rule: docs/scaling_cli.md (generated from sktlm/scaling/options.py, where they are defined).
Never imports jax: runs on any machine that has the result files.
"""

from __future__ import annotations

from absl import flags

from sktlm.scaling import options

_FLAGS = options.define_flags(flags, __name__)


def main(argv):
  from sktlm.scaling import report  # numpy/scipy/matplotlib only

  values = {name: holder.value for name, holder in _FLAGS.items()}
  opts = options.from_flags(values)
  paths = list(values['sweep_dir'] or []) + argv[1:]
  doc = report.run(paths, values['out'], opts, labels=values['labels'])
  print(f"wrote {values['out']}/report.md, fits.json and plots")
  for p in (doc.get('curve_law') or {}).get('predictions', []):
    print(f"loss-curve law: predicts {p['run']} at step {p['step']}: {p['predicted']:.4g}, actual "
          f"{p['actual']:.4g}: error {100 * p['rel_error']:+.2f}%")
  for line in doc['predict_summary'] + doc['backtest_summary']:  # last: what `make main` ends with
    print(line)
  return 0

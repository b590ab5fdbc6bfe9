"""The options of `sktlm scaling`, defined once: OPTIONS (flag, type, default, doc, rule). From this table come
the absl flags (sktlm/commands/scaling.py), their checks (`from_flags`: one clear line per bad value),
`Options` (what the analysis reads), the settings recorded in fits.json (`settings`) and docs/scaling_cli.md
(`python -m sktlm.scaling.options`; tests/test_scaling_options.py fails when the file drifts).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from sktlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI_MD = os.path.join(ROOT, 'docs', 'scaling_cli.md')
LOSSES = ('best_eval', 'final_eval', 'final_train')


def _loss_ok(v: str) -> bool:
  return v in LOSSES or v.startswith('eval:')


@dataclasses.dataclass(frozen=True)
class Opt:
  flag: str                       # --flag
  field: str | None               # its Options attribute (None: the command reads it: sweeps, --out, --labels)
  kind: str                       # string | integer | float | bool | enum | list (comma-separated) | multi_string
  default: object
  doc: str
  rule: str = ''                  # the rule a given value must meet, as the error and the docs state it
  ok: object = None               # value -> bool: the rule (checked only for a given value, not None)
  choices: tuple = ()             # enum values
  needs: tuple = ()               # flags at least one of which must be given with this one
  needs_why: str = ''
  required: str = ''              # required: the placeholder of its value ('folder')

  @property
  def value_default(self):
    """The Options default: lists are tuples."""
    return tuple(self.default or ()) if self.kind == 'list' else self.default


def _positive(v) -> bool:
  return v > 0


OPTIONS = (
    Opt('sweep_dir', None, 'multi_string', None, 'a sweep folder (repeat for several; folders may also be given '
        'as positional arguments)'),
    Opt('out', None, 'string', None, 'output folder for report.md, fits.json and the plots', required='folder'),
    Opt('labels', None, 'list', None, 'names of the sweeps in plots and tables (default: folder names)'),
    Opt('n', 'n_key', 'enum', 'non_embedding', 'parameter count used as N (non_embedding: Kaplan et al.; active: '
        'MoE per-token)', choices=('non_embedding', 'total', 'active')),
    Opt('loss', 'loss_key', 'string', 'best_eval', 'loss per run: best_eval | final_eval | final_train | eval:NAME '
        '(the `sktlm eval` record RUN/evals/NAME.json)', rule='best_eval, final_eval, final_train or eval:NAME',
        ok=_loss_ok),
    Opt('flops', 'flops_key', 'enum', 'exact', 'FLOP convention of every compute quantity in the report: exact '
        '(model FLOPs: 6N + full TxT attention, as MFU) or 6n (see sktlm/config/accounting.py); case-insensitive',
        choices=('exact', '6n')),
    Opt('backtest', 'backtest', 'integer', -1, 'fit on all but the K largest sizes (or compute budgets) and predict '
        'those; -1: 1 when there are >= 4 sizes (budgets), else none; 0: none', rule='>= 0 (or -1: automatic)',
        ok=lambda v: v >= -1),
    Opt('target_params', 'target_params', 'float', None, 'predict the loss of a model with this N', rule='> 0',
        ok=_positive),
    Opt('target_tokens', 'target_tokens', 'float', None, 'with --target_params: trained on this many tokens',
        rule='> 0', ok=_positive, needs=('target_params', 'moe_target')),
    Opt('target_flops', 'target_flops', 'float', None, 'predict loss and compute-optimal N, D at this budget '
        "(default: the target config's FLOPs per token x tokens, in the --flops convention)", rule='> 0',
        ok=_positive),
    Opt('bootstrap', 'n_boot', 'integer', 200, 'bootstrap resamples for the intervals (0: none)', rule='>= 0',
        ok=lambda v: v >= 0),
    Opt('seed', 'seed', 'integer', 0, 'bootstrap seed'),
    Opt('huber_delta', 'delta', 'float', 1e-3, 'Huber delta on log-loss residuals (Hoffmann et al.: 1e-3)',
        rule='> 0', ok=_positive),
    Opt('isoflop_gap', 'isoflop_gap', 'float', 1.25, 'runs without a declared budget are grouped while sorted '
        'compute grows by <= this factor', rule='> 1', ok=lambda v: v > 1),
    Opt('curve_fit', 'curve_fit', 'list', [], 'runs (names) of one size: fit the loss-curve law of Tissue et al. '
        '2024, L = L0 + A S1^-alpha - C S2, on their metrics.jsonl'),
    Opt('curve_predict', 'curve_predict', 'list', [], 'runs (names) whose final train loss the loss-curve law '
        'predicts from their own LR schedule (e.g. WSD decay branches)', needs=('curve_fit',),
        needs_why='the runs to fit the loss-curve law on'),
    Opt('curve_skip_steps', 'curve_skip_steps', 'integer', -1, 'loss-curve law: leave out logged losses at or '
        'before this step (the early transient); -1: the end of the LR warmup',
        rule='>= 0 (or -1: the warmup end)', ok=lambda v: v >= -1),
    Opt('moe_target', 'moe_target', 'string', '', 'config (e.g. experiments/flagship.py) whose loss the MoE section '
        'predicts with the fitted MoE law (tokens: planned, or --target_tokens)'),
    Opt('predict', 'predict', 'list', [], 'sweep folders whose every run the laws fitted on the positional sweeps '
        'predict: a predicted-vs-actual table and plot with intervals and extrapolation factors'),
    Opt('fix_E', 'fix_E', 'float', None, 'hold the asymptote E of every law that takes it at this value (E is often '
        'unidentified on small ladders); the report shows how the predictions move at E +- 25%', rule='> 0',
        ok=_positive),
    Opt('fix_E_why', 'fix_E_why', 'string', '', 'why E has the --fix_E value (quoted in the report)',
        needs=('fix_E',)),
    Opt('curves', 'curves', 'bool', True, 'read metrics.jsonl of each run for the loss-curve plots'),
)
BY_FLAG = {o.flag: o for o in OPTIONS}

_TYPES = {'string': str, 'integer': int, 'float': float, 'bool': bool, 'enum': str, 'list': tuple,
          'multi_string': list}
Options = dataclasses.make_dataclass(
    'Options', [(o.field, _TYPES[o.kind] if o.default is not None else _TYPES[o.kind] | None,
                 dataclasses.field(default=o.value_default)) for o in OPTIONS if o.field],
    namespace={'__doc__': 'What the analysis reads: one field per option of OPTIONS with a field.'})
Options.__module__ = __name__


def define_flags(flags_module, module_name: str) -> dict:
  """The absl flags of OPTIONS, declared as the command module `module_name`'s (its --help lists them):
  {flag: FlagHolder}."""
  out = {}
  for o in OPTIONS:
    f, kw = flags_module, dict(name=o.flag, default=o.default, help=o.doc, module_name=module_name)
    if o.kind == 'enum':
      out[o.flag] = f.DEFINE_enum(enum_values=list(o.choices), case_sensitive=False, **kw)
    else:
      out[o.flag] = getattr(f, f'DEFINE_{o.kind}')(**kw)
  return out


def from_flags(values: dict):
  """Options from {flag: value} (absl's parsed values); UserError naming the first bad value."""
  for o in OPTIONS:
    if o.required and not values.get(o.flag):
      raise UserError(f'--{o.flag}=<{o.required}> is required')
  for o in OPTIONS:
    v = values.get(o.flag)
    if v is not None and o.ok is not None and not o.ok(v):
      raise UserError(f'--{o.flag} must be {o.rule}, got {v!r}' if isinstance(v, str) else
                      f'--{o.flag} must be {o.rule}, got {v}')
  for o in OPTIONS:
    if o.needs and values.get(o.flag) and not any(values.get(n) for n in o.needs):
      why = f' ({o.needs_why})' if o.needs_why else ''
      raise UserError(f"--{o.flag} needs {' or '.join(f'--{n}' for n in o.needs)}{why}")
  return Options(**{o.field: (tuple(values[o.flag] or ()) if o.kind == 'list' else values[o.flag])
                    for o in OPTIONS if o.field and o.flag in values})


def settings(opts) -> dict:
  """What fits.json records of the options: every option with a field, under its flag name."""
  return {o.flag: getattr(opts, o.field) for o in OPTIONS if o.field}


def _cell(v) -> str:
  return '' if v is None or v == '' else f'`{v}`'


def cli_md() -> str:
  lines = ['<!-- Generated by `python -m sktlm.scaling.options` from sktlm/scaling/options.py: edit the table '
           'there, then regenerate. -->', '', '# `sktlm scaling` options', '',
           '`sktlm scaling SWEEP [SWEEP ...] --out=FOLDER [options]` (see docs/scaling.md for what the report holds). '
           'A bad value stops the command with one line naming the option. Lists are comma-separated.', '',
           '| option | type | default | rule | what it does |', '|---|---|---|---|---|']
  for o in OPTIONS:
    kind = f"one of {', '.join(o.choices)}" if o.kind == 'enum' else o.kind.replace('_', ' ')
    rule = '; '.join(x for x in (o.rule, f"needs {' or '.join(f'`--{n}`' for n in o.needs)}" if o.needs else '',
                                 'required' if o.required else '') if x)
    default = _cell(','.join(o.default) if isinstance(o.default, list) else o.default)
    doc = o.doc.replace('|', '\\|')
    lines.append(f'| `--{o.flag}` | {kind} | {default} | {rule} | {doc} |')
  return '\n'.join(lines) + '\n'


def main(argv) -> int:
  text = cli_md()
  have = open(CLI_MD).read() if os.path.exists(CLI_MD) else None
  if have == text:
    print('docs/scaling_cli.md up to date')
    return 0
  if '--check' in argv[1:]:
    print('stale: docs/scaling_cli.md (run python -m sktlm.scaling.options)', file=sys.stderr)
    return 1
  with open(CLI_MD, 'w') as f:
    f.write(text)
  print('wrote docs/scaling_cli.md')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))

"""`sktlm scaling`'s options are one table (sktlm/scaling/options.py): the flags, their checks, Options, the
settings of fits.json and docs/scaling_cli.md all come from it, and the docs fail this test when they drift."""

import dataclasses

import pytest
from absl import flags

from sktlm.errors import UserError
from sktlm.scaling import analysis, options

# A value each rule refuses, and the start of the one line that says so.
BAD = {'loss': ('train', "--loss must be best_eval, final_eval, final_train or eval:NAME, got 'train'"),
       'backtest': (-2, '--backtest must be >= 0 (or -1: automatic), got -2'),
       'target_params': (0.0, '--target_params must be > 0'), 'target_tokens': (-1.0, '--target_tokens must be > 0'),
       'target_flops': (0.0, '--target_flops must be > 0'), 'bootstrap': (-1, '--bootstrap must be >= 0'),
       'huber_delta': (0.0, '--huber_delta must be > 0'), 'isoflop_gap': (1.0, '--isoflop_gap must be > 1'),
       'curve_skip_steps': (-2, '--curve_skip_steps must be >= 0 (or -1: the warmup end)'),
       'fix_E': (-1.0, '--fix_E must be > 0')}


def _defaults(**over):
  return {**{o.flag: o.default for o in options.OPTIONS}, 'out': 'report', **over}


def test_generated_docs_are_checked_in():
  with open(options.CLI_MD) as f:
    assert f.read() == options.cli_md(), 'docs/scaling_cli.md is stale: run python -m sktlm.scaling.options'
  for o in options.OPTIONS:
    assert f'| `--{o.flag}` |' in options.cli_md() and o.rule in options.cli_md()


def test_flags_options_and_settings_come_from_the_table():
  import sktlm.commands.scaling  # noqa: F401 - defines the flags
  declared = {f.name for f in flags.FLAGS.get_flags_for_module('sktlm.commands.scaling')}
  assert declared == {o.flag for o in options.OPTIONS}
  assert analysis.Options is options.Options
  assert [f.name for f in dataclasses.fields(options.Options)] == [o.field for o in options.OPTIONS if o.field]
  # The flags' defaults give the Options defaults, and fits.json records every option under its flag.
  opts = options.from_flags(_defaults())
  assert opts == options.Options()
  assert set(options.settings(opts)) == {o.flag for o in options.OPTIONS if o.field}
  assert options.from_flags(_defaults(curve_fit=['a', 'b'])).curve_fit == ('a', 'b')


def test_every_rule_refuses_a_bad_value_in_one_line():
  assert set(BAD) == {o.flag for o in options.OPTIONS if o.ok}, 'a new rule needs a bad value here'
  for flag, (value, message) in BAD.items():
    with pytest.raises(UserError) as e:
      options.from_flags(_defaults(**{flag: value}))
    assert str(e.value).startswith(message) and '\n' not in str(e.value), (flag, str(e.value))
  with pytest.raises(UserError, match='^--out=<folder> is required$'):
    options.from_flags(_defaults(out=None))
  with pytest.raises(UserError, match='^--fix_E_why needs --fix_E$'):
    options.from_flags(_defaults(fix_E_why='because'))
  with pytest.raises(UserError, match='^--target_tokens needs --target_params or --moe_target$'):
    options.from_flags(_defaults(target_tokens=1e9))
  assert options.from_flags(_defaults(target_tokens=1e9, moe_target='experiments/flagship.py')).target_tokens == 1e9
  assert options.from_flags(_defaults(loss='eval:wiki')).loss_key == 'eval:wiki'

"""Sweep definitions: the big_vision-style DSL, deterministic run names, and loading sweep files.

A sweep file (sweeps/*.py) names a base experiment config and returns its runs:

  BASE = 'experiments/lm.py:runlocal'             # config file[:argument string]
  COMMON = {'config.train.batch_size': 8}           # optional: applied to every run, not part of names
  def get_sweep(arg):
    return product([sweep('arg.size', ['pico', 'nano']), sweep('config.optim.peak_lr', [1e-3, 3e-3])])

A run's settings are `arg.<name>` keys (arguments of the config string, e.g. size) and `config.<key>`
keys (the `--config.<key>=value` overrides). get_sweep returns dicts of settings or `Run`s (planners
return Runs with chosen name keys or a parent checkpoint to start from).
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Any

from sktlm.config import load
from sktlm.config.validate import validate
from sktlm.errors import UserError

MAX_NAME_LEN = 120


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep.

  settings: {'arg.size': 'pico', 'config.train.steps': 300, ...}.
  name: explicit run name ('' -> derived from the settings named by `name_keys`, default all).
  parent, parent_step: start from the checkpoint at `parent_step` of run `parent` of the same sweep
    (sets --config.train.init_from/init_step; the run waits until that checkpoint exists).
  common: the common settings a planner sized this run with (its `common=`): the run trains with them, like
    the sweep file's COMMON (not part of the name); they may not contradict COMMON.
  planned: what the planner assumed ({'tokens_per_step', 'params', 'param_kind'}); resolving the run checks
    that its config still gives those, so the planned D (and D/N) is the trained one.
  """
  settings: dict[str, Any]
  name: str = ''
  name_keys: tuple[str, ...] | None = None
  parent: str = ''
  parent_step: int = -1
  common: dict[str, Any] = dataclasses.field(default_factory=dict)
  planned: dict[str, Any] = dataclasses.field(default_factory=dict)


def sweep(key: str, values) -> list[dict[str, Any]]:
  """One axis: [{key: v} for v in values]."""
  _check_key(key)
  values = list(values)
  if not values:
    raise UserError(f"sweep('{key}', ...) has no values")
  return [{key: v} for v in values]


def product(axes) -> list[dict[str, Any]]:
  """Cartesian product of axes (lists of settings dicts); the first axis varies slowest."""
  out = []
  for combo in itertools.product(*[list(a) for a in axes]):
    out.append(_merge(combo))
  return out


def zip(axes) -> list[dict[str, Any]]:  # noqa: A001 - the big_vision name, used as sweep.zip
  """Element-wise combination of equally long axes."""
  axes = [list(a) for a in axes]
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise UserError(f'zip() of axes with different lengths {sorted(lengths)}')
  return [_merge(combo) for combo in builtins.zip(*axes, strict=False)]


def _merge(dicts) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for d in dicts:
    for k, v in d.items():
      if k in out and out[k] != v:
        raise UserError(f"setting '{k}' given twice with different values ({out[k]!r}, {v!r})")
      out[k] = v
  return out


def _check_key(key: str):
  if not isinstance(key, str) or not (key.startswith('arg.') or key.startswith('config.')) \
      or len(key.split('.')) < 2 or not all(key.split('.')):
    raise UserError(f"sweep key '{key}' must be 'arg.<name>' (config string argument) or "
                    "'config.<key>' (override)")


# ---------------------------------------------------------------------------------------------- naming

def format_value(v: Any) -> str:
  """A readable, filesystem-safe rendering of one setting value."""
  if isinstance(v, bool):
    s = 'true' if v else 'false'
  elif isinstance(v, float):
    s = repr(v)  # shortest exact form: 0.003, 3e-05
  elif isinstance(v, (list, tuple)):
    s = '+'.join(format_value(x) for x in v)
  else:
    s = str(v)
  s = re.sub(r'[^A-Za-z0-9.+=-]+', '-', s).strip('-.')
  return s or 'empty'


def _short_keys(keys: list[str]) -> dict[str, str]:
  """Last path component of each key, longer suffixes where two keys would collide."""
  out = {}
  for k in keys:
    parts = k.split('.')[1:]  # drop 'arg' / 'config'
    n = 1
    while True:
      short = '.'.join(parts[-n:])
      clash = [o for o in keys if o != k and '.'.join(o.split('.')[1:][-n:]) == short]
      if not clash or n >= len(parts):
        break
      n += 1
    out[k] = short
  return out


def run_name(settings: dict[str, Any], keys=None) -> str:
  """{'arg.size': 'tiny', 'config.optim.peak_lr': 0.003} -> 'size-tiny_peak_lr-0.003'."""
  keys = list(settings) if keys is None else list(keys)
  if not keys:
    return 'default'
  short = _short_keys(keys)
  name = '_'.join(f'{short[k]}-{format_value(settings[k])}' for k in keys)
  if len(name) > MAX_NAME_LEN:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = name[:MAX_NAME_LEN - 9] + '~' + digest
  return name


def check_name(name: str):
  if not name or name in ('.', '..') or not re.fullmatch(r'[A-Za-z0-9._+=~-]+', name) or name.startswith('_'):
    raise UserError(f"bad run name '{name}' (letters, digits and . _ + = ~ - only; not starting with _)")


# ------------------------------------------------------------------------------------------ sweep files

@dataclasses.dataclass
class SweepDef:
  path: str
  arg: str
  base: str                 # 'experiments/lm.py[:arg]'
  common: dict[str, Any]
  runs: list[Run]
  resources: Any  # {'CPU': 1, 'GPU': 1, 'TPU': 4}, or a function config -> such a dict


def load_sweep_file(spec: str) -> SweepDef:
  """Loads 'sweeps/x.py[:arg]' and normalises its runs (names checked unique)."""
  path, _, arg = spec.partition(':')
  module = load._import_file(path)  # noqa: SLF001 - the shared file importer (UserError if missing)
  for attr in ('BASE', 'get_sweep'):
    if not hasattr(module, attr):
      raise UserError(f'sweep file {path} defines no {attr} (see docs/sweeps.md)')
  common = dict(getattr(module, 'COMMON', {}) or {})
  for k in common:
    _check_key(k)
  raw = module.get_sweep(arg or None)
  runs = [normalise(r) for r in raw]
  if not runs:
    raise UserError(f'sweep file {path} returned no runs')
  seen: dict[str, Run] = {}
  for r in runs:
    if r.name in seen:
      raise UserError(f"two runs of {path} are both named '{r.name}' ({seen[r.name].settings} and "
                      f'{r.settings}); give them distinct settings or names')
    seen[r.name] = r
  for r in runs:
    if r.parent and r.parent not in seen:
      raise UserError(f"run '{r.name}' starts from unknown run '{r.parent}'")
    clash = {k: (v, common[k]) for k, v in r.common.items() if k in common and common[k] != v}
    if clash:
      k, (planner_v, module_v) = next(iter(clash.items()))
      raise UserError(f"{path}: run '{r.name}' was planned with {k}={planner_v!r} (the planner's common=) but "
                      f'COMMON sets {module_v!r}; state common settings once (pass common=COMMON)')
  base = module.BASE
  if not os.path.isabs(base.partition(':')[0]) and not os.path.exists(base.partition(':')[0]):
    # Relative to the sweep file's repository root as a fallback (sweeps/ sits next to experiments/).
    alt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), base)
    if os.path.exists(alt.partition(':')[0]):
      base = alt
  return SweepDef(path=path, arg=arg, base=base, common=common, runs=runs,
                  resources=getattr(module, 'RESOURCES', None) or {})


def normalise(r) -> Run:
  if isinstance(r, dict):
    r = Run(settings=dict(r))
  if not isinstance(r, Run):
    raise UserError(f'get_sweep returned {type(r).__name__}, expected a dict of settings or a Run')
  for k in list(r.settings) + list(r.common):
    _check_key(k)
  keys = r.name_keys
  if keys is not None:
    missing = [k for k in keys if k not in r.settings]
    if missing:
      raise UserError(f'name keys {missing} are not settings of run {r.settings}')
  name = r.name or run_name(r.settings, keys)
  check_name(name)
  return dataclasses.replace(r, name=name, settings=dict(r.settings), common=dict(r.common))


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """-> (config-string arguments {'size': 'pico'}, overrides {'train.steps': 300})."""
  args, overrides = {}, {}
  for k, v in settings.items():
    if k.startswith('arg.'):
      args[k[4:]] = v
    else:
      overrides[k[len('config.'):]] = v
  return args, overrides


def config_spec(base: str, args: dict[str, Any]) -> str:
  """'experiments/lm.py:runlocal' + {'size': 'pico'} -> 'experiments/lm.py:runlocal,size=pico'."""
  path, _, base_arg = base.partition(':')
  parts = [p for p in base_arg.split(',') if p.strip()]
  base_keys = {p.partition('=')[0].strip(): i for i, p in enumerate(parts)}
  for k, v in args.items():
    s = ('true' if v else 'false') if isinstance(v, bool) else str(v)
    if ',' in s or ':' in s:
      raise UserError(f"config argument {k}={s!r} may not contain ',' or ':'")
    item = f'{k}={s}'
    if k in base_keys:
      parts[base_keys[k]] = item
    else:
      parts.append(item)
  return f'{path}:{",".join(parts)}' if parts else path


def override_flag(key: str, value: Any) -> str:
  """One `--config.<key>=<value>` flag as absl config_flags parses it."""
  if isinstance(value, bool):
    s = 'true' if value else 'false'
  elif isinstance(value, str):
    s = value
  else:
    s = repr(value)
  return f'--config.{key}={s}'


def load_run_config(base: str, settings: dict[str, Any]):
  """The resolved ConfigDict of one run (no jax): base config + arg.* arguments + config.* overrides."""
  args, overrides = split_settings(settings)
  config = load.load_config(config_spec(base, args), overrides)
  validate(config)  # the dry run refuses what `sktlm train` would
  return config

"""Config helpers: big_vision-style argument strings, loading config files, JSON, and config diffs.

A leaf module (no jax): used by the CLI, the sweep wing and tests alike.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any

import ml_collections

from sktlm.config import schema
from sktlm.errors import UserError


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses 'size=small,runlocal' into a ConfigDict, typed by the defaults in `spec`.

  A bare name is a boolean switch set to True. Unknown names are an error unless lazy=True.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  for part in arg.split(','):
    part = part.strip()
    if not part:
      continue
    key, sep, raw = part.partition('=')
    key = key.strip()
    if key not in spec and not lazy:
      raise UserError(f"unknown config argument '{key}' (known: {', '.join(sorted(spec)) or 'none'})")
    if not sep:
      value: Any = True
    elif key in spec and isinstance(spec[key], bool):
      value = raw.lower() in ('1', 'true', 'yes', 'on')
    elif key in spec and spec[key] is not None and not isinstance(spec[key], str):
      try:
        value = type(spec[key])(ast.literal_eval(raw))
      except (ValueError, SyntaxError) as e:
        raise UserError(f"config argument '{key}={raw}' is not a {type(spec[key]).__name__}") from e
    else:
      value = raw
    with out.unlocked():
      out[key] = value
  return out


def _import_file(path: str):
  if not os.path.isfile(path):
    raise UserError(f'config file not found: {path}')
  name = '_sktlm_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(syntax_error_line(e)) from None
  return module


def syntax_error_line(e: SyntaxError) -> str:
  return f'{e.filename}:{e.lineno}: syntax error: {e.msg}'


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' and applies {'train.steps': 10, ...} overrides (keys checked)."""
  path, _, arg = spec.partition(':')
  module = _import_file(path)
  if not hasattr(module, 'get_config'):
    raise UserError(f'{path} has no get_config(arg)')
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides or {})
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  for key, value in overrides.items():
    key = key.removeprefix('config.')
    parent = config
    *path, leaf = key.split('.')
    try:
      for p in path:
        parent = parent[p]
      if leaf not in parent:
        raise KeyError(leaf)
      if isinstance(value, str) and not isinstance(parent[leaf], str):
        value = _parse_value(value, parent[leaf])
      parent[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      if isinstance(e, TypeError):
        raise UserError(f"config key '{key}': wrong type for value {value!r} ({e})") from e
      raise UserError(f"unknown config key '{key}'") from e


def _parse_value(raw: str, current: Any) -> Any:
  if isinstance(current, bool):
    if raw.lower() in ('true', '1', 'yes'):
      return True
    if raw.lower() in ('false', '0', 'no'):
      return False
    raise TypeError(f'expected a bool, got {raw!r}')
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw
    raise TypeError(f'cannot parse {raw!r} as {type(current).__name__}') from None


def to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def diff_configs(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """Returns (breaking, harmless) lists of 'key: old -> new' strings between two config dicts; which is which
  is the schema's restart rule of the key (sktlm/config/schema.py)."""
  fo, fn = flatten(old), flatten(new)
  breaking, harmless = [], []
  for key in sorted(set(fo) | set(fn)):
    a, b = fo.get(key, '<absent>'), fn.get(key, '<absent>')
    if a == b or (key not in fo and _is_default(key, b)):  # a run from before the key ran with its default
      continue
    line = f'{key}: {a!r} -> {b!r}'
    (breaking if schema.breaks_on_restart(key) else harmless).append(line)
  return breaking, harmless


def _is_default(key: str, value) -> bool:
  entry = schema.BY_KEY.get(key)
  return entry is not None and not isinstance(entry.default, schema.FromSizeTable) and value == entry.default

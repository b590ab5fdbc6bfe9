"""`sktlm coord-check --config=experiments/lm.py:size=pico --widths=64,128,256,512 --steps=5 [--out=DIR]`
`sktlm coord-check --config=experiments/lm.py:size=pico --depths=2,4,8,16,32 --steps=5 [--out=DIR]`

Width (the default): trains the config at each width (d_model; d_ff in proportion, heads fixed) for a few steps
under SP and muP and prints the log-log slope of each activation's RMS against width, per step: ~0 under muP at
every step, growing under SP. Depth (--depths): at the config's width, each depth under mup and completep (base
depth: the smallest, or --base_depth); slopes against depth of the activations and of their updates since init:
~0 under completep, the residual stream's growing ~L under mup; a line per parametrisation names what is not flat.
--out writes coord_check[_depth].png (RMS against the size, per step), for depth also coord_check_depth_layers.png
(per-layer profiles), and the numbers as .json. See sktlm/model/mup.py and sktlm/tools/coord_check.py.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=False)
_WIDTHS = flags.DEFINE_list('widths', ['64', '128', '256', '512'], 'd_model values (multiples of n_heads)')
_DEPTHS = flags.DEFINE_list('depths', [], 'n_layers values: a depth check at the config\'s width instead of a '
                            'width check')
_STEPS = flags.DEFINE_integer('steps', 5, 'training steps per size (constant LR, no warmup)')
_PARAM = flags.DEFINE_list('parametrization', None, 'parametrisations to compare (default: sp,mup for widths, '
                           'mup,completep for depths)')
_BASE = flags.DEFINE_integer('base_width', 0, 'muP base width (0: the smallest width)')
_BASE_DEPTH = flags.DEFINE_integer('base_depth', 0, 'depth check: the base depth (0: the smallest depth)')
_OUT = flags.DEFINE_string('out', '', 'folder for the plots and the .json (optional)')


def _ints(name, values):
  from sktlm.errors import UserError
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise UserError(f'--{name} must be integers: {values}') from e


def _finite(o):
  """nan (a slope at a step where an update is still 0) -> null: the file stays strict JSON."""
  if isinstance(o, dict):
    return {k: _finite(v) for k, v in o.items()}
  if isinstance(o, list):
    return [_finite(v) for v in o]
  return None if isinstance(o, float) and o != o else o


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required (e.g. --config=experiments/lm.py:size=pico)')
  depth = bool(_DEPTHS.value)
  if depth and flags.FLAGS['widths'].present:
    raise UserError('give --widths or --depths, not both')
  sizes = _ints('depths' if depth else 'widths', _DEPTHS.value if depth else _WIDTHS.value)
  from sktlm.model import mup
  from sktlm.tools import coord_check
  params = _PARAM.value or (['mup', 'completep'] if depth else ['sp', 'mup'])
  bad = [p for p in params if p not in mup.PARAMETRIZATIONS]
  if bad:
    raise UserError(f"--parametrization: unknown {bad} (known: {', '.join(mup.PARAMETRIZATIONS)})")
  if depth:
    result = coord_check.run_depth(_CONFIG.value, sizes, _STEPS.value, tuple(params), _BASE_DEPTH.value, log=print)
  else:
    result = coord_check.run(_CONFIG.value, sizes, _STEPS.value, tuple(params), _BASE.value, log=print)
  print(coord_check.format_table(result))
  for p in result.rms:
    off = coord_check.flat(result, p)
    print(f'{p}: ' + (f'every coordinate {result.axis}-independent (|slope| < 0.3 from step 1)' if not off else
                      f'{len(off)} coordinate(s) drift with {result.axis}: '
                      + ', '.join(f'{k} {v:+.2f}' for k, v in sorted(off.items(), key=lambda kv: -abs(kv[1])))))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    stem = os.path.join(_OUT.value, 'coord_check' + ('_depth' if depth else ''))
    coord_check.plot(result, stem + '.png')
    doc = dict(axis=result.axis, sizes=result.sizes, steps=result.steps,
               rms={p: {k: v.tolist() for k, v in r.items()} for p, r in result.rms.items()},
               slopes={p: {k: v.tolist() for k, v in result.slopes(p).items()} for p in result.rms},
               loss={p: v.tolist() for p, v in result.losses.items()},
               layers={p: [{k: v.tolist() for k, v in prof.items()} for prof in profs]
                       for p, profs in result.layers.items()})
    if not depth:
      doc['widths'] = result.sizes
    with open(stem + '.json', 'w') as f:
      json.dump(_finite(doc), f)
    print(f'wrote {stem}.png' + (f', {stem}_layers.png' if depth else '') + f' and {stem}.json')
  return 0

"""`sktlm coord-check --config=experiments/lm.py:size=pico --widths=64,128,256,512 --steps=5 [--out=DIR]`

Trains the config at each width (d_model; d_ff in proportion, heads fixed) for a few steps under SP and muP and
prints the log-log slope of each activation's RMS against width, per step: ~0 under muP at every step, growing
under SP. --out writes coord_check.png (RMS against width, per step) and coord_check.json. See sktlm/model/mup.py.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=False)
_WIDTHS = flags.DEFINE_list('widths', ['64', '128', '256', '512'], 'd_model values (multiples of n_heads)')
_STEPS = flags.DEFINE_integer('steps', 5, 'training steps per width (constant LR, no warmup)')
_PARAM = flags.DEFINE_list('parametrization', ['sp', 'mup'], 'parametrisations to compare')
_BASE = flags.DEFINE_integer('base_width', 0, 'muP base width (0: the smallest width)')
_OUT = flags.DEFINE_string('out', '', 'folder for coord_check.png and coord_check.json (optional)')


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required (e.g. --config=experiments/lm.py:size=pico)')
  try:
    widths = [int(w) for w in _WIDTHS.value]
  except ValueError as e:
    raise UserError(f'--widths must be integers: {_WIDTHS.value}') from e
  from sktlm.model import mup
  from sktlm.tools import coord_check
  bad = [p for p in _PARAM.value if p not in mup.PARAMETRIZATIONS]
  if bad:
    raise UserError(f"--parametrization: unknown {bad} (known: {', '.join(mup.PARAMETRIZATIONS)})")
  result = coord_check.run(_CONFIG.value, widths, _STEPS.value, tuple(_PARAM.value), _BASE.value, log=print)
  print(coord_check.format_table(result))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    coord_check.plot(result, os.path.join(_OUT.value, 'coord_check.png'))
    doc = dict(widths=result.widths, steps=result.steps,
               rms={p: {k: v.tolist() for k, v in r.items()} for p, r in result.rms.items()},
               slopes={p: {k: v.tolist() for k, v in result.slopes(p).items()} for p in result.rms},
               loss={p: v.tolist() for p, v in result.losses.items()})
    with open(os.path.join(_OUT.value, 'coord_check.json'), 'w') as f:
      json.dump(doc, f, indent=1)
    print(f'wrote {_OUT.value}/coord_check.png and coord_check.json')
  return 0

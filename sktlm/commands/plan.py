"""`sktlm plan --config=<file[:arg]> (--topology=v5p:8x16x16 | --devices=cpu:8) [--chip=h100] [--search=batch]`

Counts, bytes per device, an AOT compile of the real train step for the target and a fit verdict, without
allocating any parameter. See sktlm/plan/ (planner.py assembles targets, counters, aot, report) and docs/plan.md.
"""

import json
import re
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=True)
VALIDATES_ON_MESH = True  # cli.py: the planner validates --config once, with the target's mesh
_TOPOLOGY = flags.DEFINE_string('topology', '', 'TPU topology <v4|v5e|v5p|v6e>:AxB[xC] (needs libtpu), or cpu:N')
_DEVICES = flags.DEFINE_string('devices', '', 'cpu:N simulated host devices (same as --topology=cpu:N)')
_CHIP = flags.DEFINE_string('chip', '', 'chip for the memory verdict and step time (v4, v5e, v5p, v6e, a100, '
                            'h100, h200); default: the TPU topology\'s chip, none for cpu:N')
_HBM = flags.DEFINE_float('hbm_gib', 0.0, 'memory per chip in GiB for the verdict (default: the chip table)')
_SEARCH_MAX = flags.DEFINE_integer('search_max', 1024, 'largest per-device batch --search=batch tries')
_MFU = flags.DEFINE_float('mfu', 0.4, 'model FLOPs utilisation assumed for the step-time estimate')
_SEARCH = flags.DEFINE_enum('search', 'none', ['none', 'batch'],
                            'batch: find the largest per-device batch that fits, by repeated compiles')
_NO_COMPILE = flags.DEFINE_bool('no_compile', False, 'counts and state bytes only (no AOT compile)')
_JSON = flags.DEFINE_string('json', '', 'also write the report as JSON to this path')
_LADDER = flags.DEFINE_string('ladder', '', 'a sweep file (e.g. sweeps/model_sizes.py): print how far this model '
                              'lies beyond its runs in N, depth and C (the extrapolation factors)')


def _prepare_host_devices(n: int):
  """Simulated CPU devices must be requested before jax initialises its backends. Through jax.config, not
  os.environ: the environment, which anything this process starts inherits, stays as it was."""
  already = 'jax' in sys.modules
  import jax
  if not already:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)
    return
  if len(jax.devices('cpu')) < n:
    from sktlm.errors import UserError
    raise UserError(f'jax is already initialised with {len(jax.devices("cpu"))} CPU devices; need {n} '
                    f'(run with XLA_FLAGS=--xla_force_host_platform_device_count={n})')


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required (e.g. --config=experiments/flagship.py)')
  if bool(_TOPOLOGY.value) == bool(_DEVICES.value):
    raise UserError('give exactly one of --topology=<tpu topology|cpu:N> or --devices=cpu:N')
  spec = _TOPOLOGY.value or _DEVICES.value
  m = re.fullmatch(r'cpu:(\d+)', spec)
  if _DEVICES.value and not m:
    raise UserError(f"--devices must be cpu:N, got '{spec}' (TPU slices go in --topology)")
  _prepare_host_devices(int(m.group(1)) if m else 1)

  from sktlm.plan import planner
  config = _CONFIG.value
  config_name = flags.FLAGS['config'].serialize().split('=', 1)[-1]
  target = planner.get_target(spec, _CHIP.value, _HBM.value)
  if _SEARCH.value == 'batch':
    if not target.chip:
      raise UserError('--search needs a memory limit: use a TPU topology or --chip (e.g. --chip=h100)')
    print(f'searching the largest per-device batch that fits {target.name} '
          f'({target.hbm_per_device / planner.GiB:.2f} GiB per device) ...', flush=True)
    with config.unlocked():
      res = planner.search_batch(config, target, max_per_device=_SEARCH_MAX.value, log=lambda s: print(s, flush=True))
    if res['per_device_batch'] == 0:
      print(f'even a per-device batch of 1 does not fit {target.name}: use more devices, a larger '
            'fsdp/expert axis, remat, or a smaller model')
      return 1
    print(f"largest per-device batch that fits: {res['per_device_batch']} "
          f"(global {res['global_batch']} sequences over {res['batch_shards']} batch shards, peak "
          f"{res['peak_bytes'] / planner.GiB:.2f} GiB of {res['hbm_per_device'] / planner.GiB:.2f} GiB)")
    _write_json(res)
    return 0
  rep = planner.plan(config, target, mfu=_MFU.value, compile=not _NO_COMPILE.value)
  if _LADDER.value:
    _add_ladder_reach(rep, config, _LADDER.value)
  print(planner.format_report(rep, config_name))
  _write_json(rep)
  return 0 if rep.get('fits', True) else 1


def _add_ladder_reach(rep: dict, config, sweep_file: str) -> None:
  """rep['ladder_reach']: this config against the runs of a sweep file (resolved as its dry run does)."""
  from sktlm.plan import report
  from sktlm.sweep import schedule, spec
  runs = schedule.resolve(spec.load_sweep_file(sweep_file))
  points = [dict(n=r.params['active_non_embedding'], depth=int(r.model.n_layers), c=r.flops['exact']) for r in runs]
  tokens = int(config.train.steps) * rep['tokens_per_step']
  rep['ladder'] = dict(name=sweep_file, runs=len(runs), steps=int(config.train.steps), tokens=tokens)
  rep['ladder_reach'] = report.ladder_reach(points, dict(n=rep['params']['active_non_embedding'],
                                                         depth=int(config.model.n_layers),
                                                         c=rep['flops_per_token']['exact'] * tokens))


def _write_json(obj):
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(obj, f, indent=1)

"""`sktlm train --config=experiments/lm.py:size=tiny --workdir=runs/tiny [--config.key=value ...]`"""

import atexit
import os

from absl import flags
from ml_collections import config_flags

from sktlm.sweep import locks

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (created; a restart resumes from it)')
FAST_EXIT = True  # cli.py: every file the run writes is closed when main returns
VALIDATES_ON_MESH = True  # cli.py: train/start.py validates --config once, with its mesh


def _release_sweep_lock():
  """Started by a sweep that may be gone (killed): the run's lock names this process; release it however the
  process ends, a config the CLI refuses before main included."""
  lock = os.environ.get(locks.LOCK_ENV)
  if lock:
    locks.release_if_held_by(lock, os.getpid())


atexit.register(_release_sweep_lock)


def main(argv):
  from sktlm import timeline
  from sktlm.errors import UserError
  timeline.mark('config')  # the interpreter, the CLI and the config file with its overrides
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required (e.g. --config=experiments/lm.py:size=tiny)')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  from sktlm import hostmem
  from sktlm.sweep import cores
  cores.pin_from_env()  # $SKTLM_CPUS (set by a sweep), before jax sizes its thread pool
  malloc = hostmem.tune_malloc()  # before jax starts its threads
  from sktlm.train import loop
  timeline.mark('imports')
  return loop.run(_CONFIG.value, _WORKDIR.value, malloc=malloc)

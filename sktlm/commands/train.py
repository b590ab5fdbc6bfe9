"""`sktlm train --config=experiments/lm.py:size=tiny --workdir=runs/tiny [--config.key=value ...]`"""

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (created; a restart resumes from it)')


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required (e.g. --config=experiments/lm.py:size=tiny)')
  if not _WORKDIR.value:
    raise UserError('--workdir is required')
  from sktlm import hostmem
  malloc = hostmem.tune_malloc()  # before jax starts its threads
  import os

  from sktlm.sweep import locks
  from sktlm.train import loop
  try:
    return loop.run(_CONFIG.value, _WORKDIR.value, malloc=malloc)
  finally:
    # Started by a sweep that may be gone (killed): the run's lock names this process; release it.
    lock = os.environ.get(locks.LOCK_ENV)
    if lock:
      locks.release_if_held_by(lock, os.getpid())

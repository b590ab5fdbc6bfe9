"""`sktlm sweep sweeps/model_sizes.py[:arg] --sweep_dir=runs/sizes [--parallel=2] [--backend=local|ray]`

Runs every run of a sweep file as its own `sktlm train` process under <sweep_dir>/<run name>/ and writes
<sweep_dir>/results.csv and results.json. Rerunning the same command skips finished runs and resumes the
others. `--dry_run` prints the plan (N, D, C, estimated time) and starts nothing. See docs/sweeps.md.
"""

import shlex
import signal

from absl import flags

_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'sweep directory: one sub-directory (a --workdir) per run, '
                               'results.csv')
flags.DEFINE_alias('workdir', 'sweep_dir')  # the old spelling
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'print the plan (runs, N, D, C, estimated time) and exit')
_PARALLEL = flags.DEFINE_integer('parallel', 0, 'runs at once (0: local: by the cores and the runs\' sizes, '
                                 'see --threads; ray: as many as the cluster fits)')
_THREADS = flags.DEFINE_integer('threads', 0, 'local: cores per run; below the core count each run is pinned '
                                'to its own (0: every run may use every core; sktlm/sweep/cores.py)')
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'ray'], 'local processes or Ray tasks')
_RAY_ADDRESS = flags.DEFINE_string('ray_address', '', "join this Ray cluster ('auto', 'ray://host:10001'); "
                                   "'' starts a local one")
_RAY_NUM_CPUS = flags.DEFINE_integer('ray_num_cpus', 0, 'CPUs of a locally started Ray cluster (0: all)')
_RETRY_FAILED = flags.DEFINE_bool('retry_failed', True, 'rerun runs that failed before (they resume from '
                                  'their checkpoints); false keeps their failure')
_FLOPS_PER_S = flags.DEFINE_float('flops_per_s', 0.0, 'throughput for --dry_run time estimates (default: '
                                  'measured from finished runs in --sweep_dir, else an assumed CPU figure)')
_FLOPS = flags.DEFINE_enum('flops', 'exact', ['exact', '6n'], 'FLOP convention of C in the --dry_run plan '
                           '(exact: model FLOPs, as `sktlm scaling` and MFU; see sktlm/config/accounting.py)',
                           case_sensitive=False)
_TRAIN_COMMAND = flags.DEFINE_string('train_command', '', "command that trains one run (default: this "
                                     "python's `-m sktlm.cli train`); run flags are appended")
_LOCK_TIMEOUT = flags.DEFINE_float('lock_timeout', 0.0, 'seconds to wait for a run locked by another live '
                                   'process before recording it as locked (0: as long as that process lives)')
_STATUS = flags.DEFINE_bool('status', False, 'print the status table of --sweep_dir and exit (starts nothing)')


def main(argv):
  from sktlm import runfiles
  from sktlm.errors import UserError
  from sktlm.sweep import schedule, spec
  if len(argv) != 2:
    raise UserError('give one sweep file, e.g. `sktlm sweep sweeps/model_sizes.py --sweep_dir=runs/sizes`'
                    + (f' (got: {" ".join(argv[1:])})' if len(argv) > 2 else ''))
  sd = spec.load_sweep_file(argv[1])
  runs = schedule.resolve(sd)
  if _DRY_RUN.value:
    rate, source = schedule.throughput(_SWEEP_DIR.value, _FLOPS_PER_S.value)
    print(f'sweep {argv[1]}: base config {sd.base}' + (f', common {sd.common}' if sd.common else ''))
    print(schedule.plan_table(runs, rate, source, max(1, _PARALLEL.value), _FLOPS.value))
    return 0
  if not _SWEEP_DIR.value:
    raise UserError('--sweep_dir is required (or --dry_run)')
  from sktlm.sweep import progress, runner
  if _STATUS.value:
    import os

    from sktlm.sweep import execute
    views = [progress.run_view(r.name, execute.run_status(os.path.join(_SWEEP_DIR.value, r.name)), r.steps,
                               os.path.join(_SWEEP_DIR.value, r.name), None) for r in runs]
    progress.Display(tty=False).final(views, f'sweep {_SWEEP_DIR.value}')
    return 0
  if _PARALLEL.value < 0 or _THREADS.value < 0:
    raise UserError('--parallel and --threads must be >= 0')
  if _LOCK_TIMEOUT.value < 0:
    raise UserError('--lock_timeout must be >= 0')
  if _BACKEND.value == 'ray':
    from sktlm.sweep.ray_backend import RayBackend
    backend = RayBackend(_RAY_ADDRESS.value, _PARALLEL.value, _RAY_NUM_CPUS.value or None)
  else:
    from sktlm.sweep import cores
    parallel, slots = cores.plan(runs, cores.available(), _PARALLEL.value, _THREADS.value)
    print(f'local: {parallel} run(s) at once, on cores ' + ' | '.join(cores.fmt(c) for c in slots), flush=True)
    backend = runner.LocalBackend(parallel, slots)
  train_cmd = shlex.split(_TRAIN_COMMAND.value) if _TRAIN_COMMAND.value else None
  signal.signal(signal.SIGTERM, _raise_interrupt)
  rows = runner.run_sweep(runs, _SWEEP_DIR.value, backend, common=sd.common, train_cmd=train_cmd,
                          retry_failed=_RETRY_FAILED.value, lock_timeout_s=_LOCK_TIMEOUT.value)
  bad = [r for r in rows if r['status'] != runfiles.DONE]
  print(f'results: {_SWEEP_DIR.value}/results.csv ({len(rows) - len(bad)} of {len(rows)} runs done)')
  return 1 if bad else 0


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt

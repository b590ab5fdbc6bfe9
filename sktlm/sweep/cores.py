"""How many runs a local sweep runs at once, and on which cores each (`sktlm sweep --parallel --threads`).

A run may be pinned to a set of cores: `sktlm train` pins itself to $SKTLM_CPUS (commands/train.py) before jax
starts, and XLA:CPU sizes its thread pool from the cores it may use.

The default (measured with benchmarks/bench_sweep_parallel.py, README "Performance"): if every run's train
step is at most SMALL_STEP_FLOPS, as many runs at once as cores, each free to use every core; otherwise one run
at a time on every core. Small models do not scale across threads and a run's start-up is single-threaded
Python, so two runs at once beat one; on the shared 2-core machine two runs that may each use both cores also
beat two runs pinned to one core each (the scheduler moves them away from other users' work). `--threads=T`
below the core count pins each run to T cores of its own.
"""

from __future__ import annotations

import os

ENV = 'SKTLM_CPUS'  # '0,1' or '0-3': the cores a training process pins itself to
SMALL_STEP_FLOPS = 200e9  # train FLOPs per step (exact) up to which runs share the cores (measured: README)


def available() -> list[int]:
  """The cores this process may run on (its affinity, so `taskset` around the sweep is respected)."""
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return list(range(os.cpu_count() or 1))


def step_flops(run) -> float:
  return run.flops_per_token['exact'] * run.batch_size * run.seq_len


def plan(runs: list, cores: list[int], parallel: int = 0, threads: int = 0) -> tuple[int, list[list[int]]]:
  """(parallel, one core list per concurrent slot) for `runs` on `cores`; parallel/threads 0: the default."""
  n = len(cores)
  threads = min(threads, n) if threads > 0 else n
  if parallel <= 0:
    small = all(step_flops(r) <= SMALL_STEP_FLOPS for r in runs)
    parallel = max(1, n // threads) if threads < n else (n if small else 1)
    parallel = min(parallel, max(len(runs), 1))
  if parallel * threads > n:  # more than the cores: slots share them round-robin (all of them at threads = n)
    return parallel, [[cores[(i * threads + j) % n] for j in range(threads)] for i in range(parallel)]
  return parallel, [cores[i * threads:(i + 1) * threads] for i in range(parallel)]


def pin_from_env() -> str:
  """Pins this process to $SKTLM_CPUS (before jax starts its thread pools); returns what was done."""
  spec = os.environ.get(ENV, '')
  if not spec:
    return ''
  cpus = parse(spec)
  os.sched_setaffinity(0, cpus)
  return f'cores {spec}'


def parse(spec: str) -> set[int]:
  out = set()
  for part in spec.split(','):
    lo, _, hi = part.partition('-')
    out.update(range(int(lo), int(hi or lo) + 1))
  return out


def fmt(cpus: list[int]) -> str:
  return ','.join(str(c) for c in cpus)

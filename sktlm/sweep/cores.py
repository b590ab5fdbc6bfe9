"""How many runs a local sweep runs at once, and on which cores each (`sktlm sweep --parallel --threads`).

Each run gets its own set of cores: `sktlm train` pins itself to $SKTLM_CPUS (commands/train.py) before jax
starts, and XLA:CPU sizes its thread pool from the cores it may use. Runs never share a core, so parallel
runs do not oversubscribe the machine, and each run's measured matmul peak (its MFU) is that of its cores.

The default (benchmarks/bench_sweep_parallel.py, README "Performance"): small models do not scale across
threads (their matmuls are too small to split well) and a run's start-up is single-threaded Python, so runs
whose train step is below SMALL_STEP_FLOPS run one core each, as many at once as there are cores; a sweep
with a larger run gives each run all the cores, one at a time.
"""

from __future__ import annotations

import os

ENV = 'SKTLM_CPUS'  # '0,1' or '0-3': the cores a training process pins itself to
SMALL_STEP_FLOPS = 50e9  # train FLOPs per step (exact) up to which a run gets one core


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
  if threads <= 0:
    small = all(step_flops(r) <= SMALL_STEP_FLOPS for r in runs)
    threads = 1 if small and parallel != 1 else max(1, n // max(parallel, 1))
  threads = min(threads, n)
  if parallel <= 0:
    parallel = max(1, min(n // threads, len(runs) or 1))
  if parallel * threads > n:  # asked for more than the cores: slots share cores round-robin
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

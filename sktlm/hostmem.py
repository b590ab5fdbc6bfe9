"""Host memory allocation for training processes: keep freed buffers in the process.

Why: XLA:CPU allocates a step's large temporaries (e.g. the per-layer activations a scanned model stacks for the
backward pass: hundreds of MB for the benchmark model) with malloc. glibc serves blocks that large with mmap and
gives them back to the OS on free, so every step first touches fresh pages, one page fault per 4 KiB. On the
benchmark model (benchmarks/bench_train.py) that was 10-20% of the float32 step. One glibc arena, no mmap and no
trimming let freed blocks be reused fault-free. Cost: the process keeps its peak heap (RSS ~1.5x higher).
Opt out with SKTLM_HOST_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
ENV = 'SKTLM_HOST_MALLOC'


def tune_malloc() -> str:
  """Applies the settings where glibc is present and the user has not opted out; returns what was done.

  Call it before jax starts its thread pools (i.e. before the first computation): threads that already have
  their own arena keep it.
  """
  return _tune()


def _tune() -> str:
  if os.environ.get(ENV, 'tuned') == 'default':
    return f'default ({ENV}=default)'
  if not sys.platform.startswith('linux'):
    return 'default (not Linux)'
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return 'default (no glibc mallopt)'
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim
  return 'tuned (one arena, no mmap, no trim)' if ok else 'default (mallopt refused)'

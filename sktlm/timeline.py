"""Start-up timeline of a process: named marks with wall-clock times, for benchmarks/bench_startup.py.

A leaf (no jax). `mark(name)` appends `{"mark": name, "t": time.time()}` to the file named by
$SKTLM_TIMELINE, and does nothing when it is unset, so a run pays one environment lookup per mark. Each mark
closes the phase that began at the previous one; the first phase begins when the process was started (the
benchmark records that time), so interpreter start-up and imports are counted too.
"""

from __future__ import annotations

import json
import os
import time

ENV = 'SKTLM_TIMELINE'


def mark(name: str) -> None:
  path = os.environ.get(ENV)
  if not path:
    return
  with open(path, 'a') as f:
    f.write(json.dumps({'mark': name, 't': time.time(), 'pid': os.getpid()}) + '\n')


def read(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    return []

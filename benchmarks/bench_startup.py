"""Where a short run's wall time goes: real `sktlm train` subprocesses, cold and warm compilation cache.

  python benchmarks/bench_startup.py [--repeats=5] [--size=pico] [--steps=1] [--baseline=/path/to/other/checkout]

Each repeat runs, interleaved so that all see the same machine load: `python -c "import sktlm.train.loop, jax"`
(the import floor), a run on an empty compilation cache (cold), the same run again on the cache it filled
(warm, a new workdir), and with --baseline the same command from another checkout (e.g. main, to compare
before/after). Prints medians over the repeats, the load (os.getloadavg) and the CPU model.

How time is attributed: `sktlm train` appends a timestamped mark at the end of each start-up phase to the
file named by $SKTLM_TIMELINE (sktlm/timeline.py); a phase is the time from the previous mark (for the first,
from just before the process was spawned here, so interpreter start-up counts) to its own. The last phase,
exit, runs from the last mark to the end of the process. A checkout without the marks gives only totals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sktlm import timeline  # noqa: E402

PHASES = {  # mark -> what the phase ending at it holds
    'config': 'interpreter, CLI, config file and overrides',
    'imports': 'jax, flax, optax, orbax, grain, tfds (the loop\'s imports)',
    'validate': 'checks, tokenizer, mesh, platform choices',
    'build': 'model, optimizer, abstract state (eval_shape), jit wrappers',
    'data': 'train iterator, eval batches',
    'state': 'run files, state init (its compile)',
    'peak': 'measured CPU matmul peak (MFU)',
    'writers': 'metrics.jsonl, TensorBoard writer',
    'train compile': 'train step: trace, lower, compile or cache load',
    'train steps': 'the steps, the checkpoint save issued',
    'eval': 'eval step compile (or cache load) and the eval',
    'checkpoint': 'waiting for the async checkpoint',
    'summary': 'summary.json',
    'exit': 'interpreter exit',
}


def cpu_model() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


def timed(cmd: list[str], root: str, env: dict, log: str) -> tuple[float, float]:
  """(start, end) wall-clock times of one subprocess; raises if it fails."""
  env = dict(os.environ, PYTHONPATH=root, **env)
  t0 = time.time()
  with open(log, 'w') as f:
    rc = subprocess.call(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
  t1 = time.time()
  if rc != 0:
    raise SystemExit(f'{" ".join(cmd)} exited {rc}; see {log}')
  return t0, t1


def phases(t0: float, t1: float, marks: list[dict]) -> dict[str, float]:
  out, prev = {}, t0
  for m in marks:
    out[m['mark']] = out.get(m['mark'], 0.0) + m['t'] - prev
    prev = m['t']
  out['exit'] = t1 - prev
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--size', default='pico')
  ap.add_argument('--steps', type=int, default=1)
  ap.add_argument('--baseline', default='', help='another checkout to time the same run from (no cache)')
  ap.add_argument('--set', action='append', default=[], help='extra --config.key=value for every run')
  args = ap.parse_args()

  tmp = tempfile.mkdtemp(prefix='bench_startup-')
  train = [sys.executable, '-m', 'sktlm.cli', 'train', f'--config=experiments/lm.py:size={args.size}',
           f'--config.train.steps={args.steps}'] + [f'--config.{kv}' for kv in args.set]
  imports = [sys.executable, '-c', 'import sktlm.train.loop, jax']
  rows: dict[str, list[dict[str, float]]] = {'import': [], 'cold': [], 'warm': [], 'baseline': []}
  loads = [os.getloadavg()[0]]
  print(f'{cpu_model()}, {os.cpu_count()} CPUs; load (1 min) {loads[0]:.2f}; {args.repeats} repeats, '
        f'size={args.size} steps={args.steps}', flush=True)
  for r in range(args.repeats):
    cache = os.path.join(tmp, f'cache{r}')
    t0, t1 = timed(imports, ROOT, {}, os.path.join(tmp, 'import.log'))
    rows['import'].append({'total': t1 - t0})
    for kind in ('cold', 'warm'):
      wd, tl = os.path.join(tmp, f'{kind}{r}'), os.path.join(tmp, f'{kind}{r}.timeline')
      t0, t1 = timed(train + [f'--workdir={wd}'], ROOT, {'SKTLM_COMPILE_CACHE': cache, timeline.ENV: tl},
                     wd + '.log')
      rows[kind].append({**phases(t0, t1, timeline.read(tl)), 'total': t1 - t0})
    if args.baseline:
      wd = os.path.join(tmp, f'baseline{r}')
      t0, t1 = timed(train + [f'--workdir={wd}'], os.path.abspath(args.baseline), {}, wd + '.log')
      rows['baseline'].append({'total': t1 - t0})
    loads.append(os.getloadavg()[0])
    line = '  '.join(f'{k} {v[-1]["total"]:.2f}s' for k, v in rows.items() if v)
    print(f'repeat {r + 1}: {line}  (load {loads[-1]:.2f})', flush=True)
  shutil.rmtree(tmp, ignore_errors=True)

  med = {k: {p: statistics.median(row.get(p, 0.0) for row in v) for p in v[0]} for k, v in rows.items() if v}
  print(f'\nmedians over {args.repeats} repeats (load during the run: {min(loads):.2f}-{max(loads):.2f})')
  print(f'{"phase":<14} {"cold":>7} {"warm":>7}  what')
  for p, what in PHASES.items():
    if p in med['cold']:
      print(f'{p:<14} {med["cold"][p]:7.2f} {med["warm"].get(p, 0):7.2f}  {what}')
  print(f'{"total":<14} {med["cold"]["total"]:7.2f} {med["warm"]["total"]:7.2f}')
  imp = med['import']['total']
  print(f'\nimport sktlm.train.loop, jax: {imp:.2f} s')

  def ratio(kind: str, over: str = 'import') -> str:  # per repeat (same load), then the median
    rs = [a['total'] / b['total'] for a, b in zip(rows[kind], rows[over], strict=True)]
    return f'{statistics.median(rs):.2f}x (repeats: {", ".join(f"{r:.2f}" for r in rs)})'
  print(f'warm run / import: {ratio("warm")}\ncold run / import: {ratio("cold")}')
  if rows['baseline']:
    print(f'baseline ({args.baseline}) / import: {ratio("baseline")}\nbaseline / cold: {ratio("baseline", "cold")}'
          f'\nbaseline / warm: {ratio("baseline", "warm")}')


if __name__ == '__main__':
  main()

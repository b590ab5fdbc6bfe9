"""Sequential against parallel local sweeps on this machine: the wall time of one whole `sktlm sweep`.

  python benchmarks/bench_sweep_parallel.py [--sweep=sweeps/model_sizes.py:tokens_per_param=0.05] [--repeats=1]
      [--layouts=1x2,2x1,2x2]

A layout PxT is `--parallel=P --threads=T` (runs at once x cores per run; sktlm/sweep/cores.py pins each run to
its own cores, and with P x T above the core count the runs share them, which is what `--parallel=P` did
before runs were pinned). Each layout runs the whole sweep in a fresh folder with its own empty compilation
cache (every layout compiles the same programs once), and the layouts are interleaved within each repeat so
that they see the same machine load. Prints the wall time per layout, the load, the CPU model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--sweep', default='sweeps/model_sizes.py:tokens_per_param=0.05')
  ap.add_argument('--repeats', type=int, default=1)
  ap.add_argument('--layouts', default='1x2,2x1,2x2')
  args = ap.parse_args()
  layouts = [tuple(int(x) for x in lay.split('x')) for lay in args.layouts.split(',')]
  cpu = next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name')), '?')
  print(f'{cpu}, {len(os.sched_getaffinity(0))} cores; sweep {args.sweep}; load (1 min) '
        f'{os.getloadavg()[0]:.2f}', flush=True)
  tmp = tempfile.mkdtemp(prefix='bench_sweep-')
  walls: dict[tuple, list[float]] = {lay: [] for lay in layouts}
  for r in range(args.repeats):
    for p, t in (layouts if r % 2 == 0 else layouts[::-1]):
      wd = os.path.join(tmp, f'{p}x{t}-{r}')
      env = dict(os.environ, PYTHONPATH=ROOT, SKTLM_COMPILE_CACHE=wd + '-cache')
      t0 = time.time()
      with open(wd + '.log', 'w') as log:
        rc = subprocess.call([sys.executable, '-m', 'sktlm.cli', 'sweep', args.sweep, f'--workdir={wd}',
                              f'--parallel={p}', f'--threads={t}'], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
      wall = time.time() - t0
      if rc != 0:
        raise SystemExit(f'layout {p}x{t} failed (exit {rc}); see {wd}.log')
      walls[(p, t)].append(wall)
      print(f'repeat {r + 1}: --parallel={p} --threads={t}: {wall:7.1f} s  (load {os.getloadavg()[0]:.2f})',
            flush=True)
  shutil.rmtree(tmp, ignore_errors=True)
  base = min(walls[layouts[0]])
  print('\nbest of the repeats, and against the first layout:')
  for (p, t), w in walls.items():
    print(f'  --parallel={p} --threads={t}: {min(w):7.1f} s  {base / min(w):.2f}x')


if __name__ == '__main__':
  main()

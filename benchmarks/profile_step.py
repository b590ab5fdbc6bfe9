"""Where a train step spends its time on this machine: per-HLO-op totals from a jax.profiler trace.

  python benchmarks/profile_step.py [--dtype=float32] [--top=30] [same dims flags as bench_train.py]

Runs a few steps of the bench_train.py model under jax.profiler, reads the trace with jaxlib's ProfileData
and prints the ops with the most time: their share, the FLOP rate of matmuls (from the dot shapes in the
compiled HLO) and the HLO they run, so that a slow op can be traced back to the model code. Op times are
summed over the threads that ran them (independent ops may overlap), so shares are the useful figure.
"""

import collections
import glob
import math
import os
import re
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import bench_train  # noqa: E402  (tunes host malloc as `sktlm train` does)
import jax  # noqa: E402
from jax._src.lib import _profile_data  # noqa: E402

_DEF = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\((.*)')


def parse_hlo(text):
  """(instruction name -> HLO line, instruction name -> matmul FLOPs including fused computations)."""
  lines, shapes, dot_flops, comp_flops, calls = {}, {}, {}, collections.Counter(), {}
  comp = None
  for line in text.splitlines():
    if line and not line.startswith(' ') and '{' in line:
      comp = line.split()[0].lstrip('%')
      if comp == 'ENTRY':
        comp = line.split()[1].lstrip('%')
    m = _DEF.match(line)
    if not m:
      continue
    name, _, dims, op, rest = m.groups()
    lines.setdefault(name, line.strip())
    shapes[name] = [int(d) for d in dims.split(',') if d]
    if op == 'dot':
      lhs = rest.split(',')[0].strip().lstrip('%')
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
      k = math.prod(shapes.get(lhs, [1])[int(i)] for i in contracting.group(1).split(',') if i) if contracting else 1
      dot_flops[name] = 2 * math.prod(shapes[name]) * k
      comp_flops[comp] += dot_flops[name]
    called = re.search(r'calls=%([\w.\-]+)', rest)
    if called:
      calls[name] = called.group(1)
  flops = dict(dot_flops)
  for name, callee in calls.items():
    if comp_flops.get(callee):
      flops[name] = comp_flops[callee]
  return lines, flops


def main():
  p = bench_train.parser()
  p.add_argument('--dtype', default='float32')
  p.add_argument('--top', type=int, default=30)
  args = p.parse_args()
  steps = 3
  step, state, batch, _, _ = bench_train.build_step(args.dtype, args)
  hlo, flops = parse_hlo(step.as_text())
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    prof = _profile_data.ProfileData.from_file(glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)[0])
  per_op, count = collections.Counter(), collections.Counter()
  for plane in prof.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in hlo:
          per_op[ev.name] += ev.duration_ns / steps
          count[ev.name] += 1
  total = sum(per_op.values())
  mm_ns = sum(ns for name, ns in per_op.items() if name in flops)
  mm_flops = sum(flops[name] * count[name] / steps for name in per_op if name in flops)
  share = 100 * mm_ns / total
  print(f'{args.dtype}: {total / 1e6:.0f} ms of op time per step (summed over threads); matmul ops '
        f'{share:.0f}% of it at {mm_flops / mm_ns:.1f} GFLOP/s, other ops {100 - share:.0f}%')
  for name, ns in per_op.most_common(args.top):
    n = count[name] // steps
    rate = f'{flops[name] * n / ns:6.1f} GF/s' if name in flops else ' ' * 11
    text = hlo[name].split(', metadata=')[0]
    text = text if len(text) < 130 else text[:127] + '...'
    print(f'{100 * ns / total:5.1f}% {ns / 1e6:7.1f} ms x{n:<3d} {rate} {text}')


if __name__ == '__main__':
  main()

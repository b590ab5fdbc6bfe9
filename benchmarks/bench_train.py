"""Train-step throughput against the matmul peak measured in the same run.

  python benchmarks/bench_train.py [--d_model=256 --n_layers=6 --n_heads=8 --seq_len=256 --batch=16]

Prints, for float32 and bfloat16 compute: tokens/s, step time, compile time, and the fraction of the
float32 / bfloat16 matmul peak (one large jitted matmul, measured here, interleaved with the step timings so
that both see the same machine load). FLOPs per token = 6N + 12 L d T (N: all matmul weights incl. the
output head), i.e. sktlm.config.accounting 'exact'.
"""

import argparse
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

from sktlm import hostmem  # noqa: E402

MALLOC = hostmem.tune_malloc()  # as `sktlm train` does, before jax starts its threads

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sktlm import chips, sharding  # noqa: E402
from sktlm.config import accounting, load  # noqa: E402
from sktlm.train import resolve, step  # noqa: E402


def build_step(dtype, args):
  """(compiled step, state, batch, config, compile seconds) for the benchmark model."""
  config = load.load_config(os.path.join(ROOT, 'experiments/lm.py') + ':size=tiny', {
      'model.d_model': args.d_model, 'model.n_layers': args.n_layers, 'model.n_heads': args.n_heads,
      'model.n_kv_heads': args.n_heads, 'model.d_ff': args.d_ff or 4 * args.d_model,
      'model.vocab_size': 384, 'model.dtype': dtype, 'model.remat': args.remat,
      'data.seq_len': args.seq_len, 'train.batch_size': args.batch, 'mesh.data': 1,
      **dict(kv.split('=', 1) for kv in args.set)})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  B, T = args.batch, args.seq_len
  batch = {'inputs': rng.integers(3, 259, (B, T)), 'targets': rng.integers(3, 259, (B, T)),
           'segment_ids': np.ones((B, T)), 'positions': np.tile(np.arange(T), (B, 1)),
           'weights': np.ones((B, T))}
  batch = {k: v.astype(np.float32 if k == 'weights' else np.int32) for k, v in batch.items()}
  batch = step.device_batch(batch, setup, B)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  return compiled, state, batch, config, time.perf_counter() - t0


def time_steps(compiled, state, batch, steps):
  """Seconds per step over `steps` steps (one sync at the end); returns (seconds, new state)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps, state


def parser():
  p = argparse.ArgumentParser()
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--n_layers', type=int, default=6)
  p.add_argument('--n_heads', type=int, default=8)
  p.add_argument('--d_ff', type=int, default=0, help='0: 4 * d_model')
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--repeats', type=int, default=4, help='timing rounds (the best one counts)')
  p.add_argument('--remat', default='none')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='any other config override, e.g. --set model.scan_layers=false')
  return p


def main():
  p = parser()
  p.add_argument('--dtypes', default='float32,bfloat16')
  args = p.parse_args()
  print(f'host malloc: {MALLOC}')
  print(f'devices: {jax.devices()[0].device_kind} x{jax.device_count()}; dims d={args.d_model} L={args.n_layers} '
        f'H={args.n_heads} T={args.seq_len} B={args.batch}')
  dtypes = args.dtypes.split(',')
  runs = {}
  for dtype in dtypes:
    compiled, state, batch, config, compile_s = build_step(dtype, args)
    _, state = time_steps(compiled, state, batch, 2)  # warm-up
    runs[dtype] = dict(step=compiled, state=state, batch=batch, compile_s=compile_s, times=[], peaks=[],
                       fpt=accounting.flops_per_token(config.model, args.seq_len)['exact'])
  # Rounds interleave the dtypes and their peaks so that all figures see the same machine load.
  for _ in range(args.repeats):
    for dtype, r in runs.items():
      r['peaks'].append(chips.measure_matmul_peak(dtype, n=2048, repeats=3))
      seconds, r['state'] = time_steps(r['step'], r['state'], r['batch'], args.steps)
      r['times'].append(seconds)
  tokens = args.batch * args.seq_len
  for dtype, r in runs.items():
    step_s, peak = min(r['times']), max(r['peaks'])
    tps = tokens / step_s
    r['tps'] = tps
    print(f'{dtype:>9}: {tps:10,.0f} tok/s  step {1e3 * step_s:7.1f} ms  compile {r["compile_s"]:5.1f} s  '
          f'achieved {tps * r["fpt"] / 1e9:6.1f} GFLOP/s = {100 * tps * r["fpt"] / peak:5.1f}% of the {dtype} '
          f'matmul peak ({peak / 1e9:.0f} GFLOP/s)')
  if 'float32' in runs and 'bfloat16' in runs:
    f32, bf16 = runs['float32'], runs['bfloat16']
    print(f'bfloat16 / float32: tokens/s {bf16["tps"] / f32["tps"]:.2f}x, '
          f'matmul peak {max(bf16["peaks"]) / max(f32["peaks"]):.2f}x')


if __name__ == '__main__':
  main()

"""Train-step tokens/s and MFU of the `base` and `large` sizes on whatever accelerator JAX finds.

  python benchmarks/bench_accel.py                          # base and large, bfloat16, all devices
  python benchmarks/bench_accel.py --sizes=pico --steps=2   # CPU smoke check (seq 256, 2 rows, byte vocab)

The real train step of sktlm.train.step (AdamW included) on every device JAX sees, FSDP over all of them
(`--mesh=data` for pure data parallelism), bfloat16 compute with float32 parameters, kernels `auto`
(sktlm.train.resolve picks the platform's: splash attention on TPU, Pallas flash attention on GPU). Rows are packed
with several documents each (segment ids), as in training. Timing rounds interleave the sizes, so they all see
the same machine; the best round counts and the spread is shown.

MFU = model FLOPs per second / (devices x peak). Model FLOPs per token are accounting's `exact` count, PaLM's
definition (6N + 12 L H d_head T: every matmul weight including the output head, plus the full T x T
attention matmuls; no remat recompute). Peak: `--peak_tflops`, else the chip's dense bf16 peak from
sktlm.chips, else (CPU) a bf16 matmul measured here.
"""

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sktlm import chips, sharding  # noqa: E402
from sktlm.config import accounting, load  # noqa: E402
from sktlm.train import resolve, step  # noqa: E402


def packed_batch(rng, B: int, T: int, vocab: int, mean_doc: int) -> dict:
  """Random tokens in rows packed with documents of random lengths (mean ~mean_doc), as the data pipeline does."""
  seg = np.zeros((B, T), np.int32)
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    start, doc = 0, 1
    while start < T:
      n = min(T - start, int(rng.integers(1, 2 * mean_doc)))
      seg[b, start:start + n], pos[b, start:start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg, 'positions': pos,
          'weights': np.ones((B, T), np.float32)}


def build(size: str, args, devices):
  """(compiled step, state, batch, resolved config, compile seconds) for one size."""
  mesh_over = {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.expert': 1, 'mesh.tensor': 1, f'mesh.{args.mesh}': -1}
  config = load.load_config(os.path.join(ROOT, f'experiments/lm.py:size={size}'), {
      'model.vocab_size': args.vocab_size, 'model.dtype': args.dtype, 'model.remat': args.remat,
      'data.seq_len': args.seq_len, 'train.batch_size': args.batch * len(devices), **mesh_over,
      **({'model.attention_block': args.attention_block} if args.attention_block else {}),
      **dict(kv.split('=', 1) for kv in args.set)})
  mesh = sharding.make_mesh(config.mesh, devices)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  B, T = config.train.batch_size, config.data.seq_len
  batch = packed_batch(np.random.default_rng(0), B, T, config.model.vocab_size, args.mean_doc)
  batch = step.device_batch(batch, setup, B)
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  return compiled, state, batch, setup.config, time.perf_counter() - t0


def time_steps(compiled, state, batch, steps: int):
  """Seconds per step over `steps` steps (one sync at the end); returns (seconds, new state)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps, state


def peak_per_device(args, device) -> tuple[float, str]:
  if args.peak_tflops > 0:
    return args.peak_tflops * 1e12, '--peak_tflops'
  chip = chips.chip_for_device_kind(device.device_kind)
  if chip:
    return chip.peak_bf16_flops, f'sktlm.chips {chip.name}, dense bf16'
  if device.platform == 'cpu':
    return chips.measure_matmul_peak(args.dtype, n=2048, repeats=3), f'measured {args.dtype} matmul'
  raise SystemExit(f'no known peak for device kind {device.device_kind!r}: pass --peak_tflops')


def kernels_line(mc) -> str:
  """The kernels the step was built with, as the resolved config records them."""
  keys = ('kernels', 'attention_impl', 'attention_block', 'scan_unroll')
  return ', '.join(f'{k}={mc[k]}' for k in keys if k in mc)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='base,large', help='comma-separated names from sktlm.config.sizes')
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--seq_len', type=int, default=0, help='0: 2048 (CPU: 256)')
  p.add_argument('--batch', type=int, default=0, help='sequences per device; 0: 8 (CPU: 2)')
  p.add_argument('--vocab_size', type=int, default=0, help='0: 32768 (CPU: 384, the byte vocabulary)')
  p.add_argument('--mean_doc', type=int, default=512, help='mean document length in a packed row')
  p.add_argument('--mesh', default='fsdp', choices=['fsdp', 'data'], help='the axis spanning all devices')
  p.add_argument('--remat', default='none')
  p.add_argument('--attention_block', type=int, default=0,
                 help="model.attention_block; 0: 512 on TPU (splash's tile, MaxText's default), else the config's")
  p.add_argument('--steps', type=int, default=10, help='timed steps per round')
  p.add_argument('--repeats', type=int, default=3, help='timing rounds, interleaving the sizes')
  p.add_argument('--peak_tflops', type=float, default=0.0, help='peak per device (default: the chip table)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='any other config override')
  args = p.parse_args()

  devices = jax.devices()
  cpu = devices[0].platform == 'cpu'  # a smoke check there: small rows, byte vocabulary
  args.seq_len = args.seq_len or (256 if cpu else 2048)
  args.batch = args.batch or (2 if cpu else 8)
  args.vocab_size = args.vocab_size or (384 if cpu else 32768)
  args.mean_doc = min(args.mean_doc, args.seq_len // 2)
  args.attention_block = args.attention_block or (512 if devices[0].platform == 'tpu' else 0)
  peak, peak_src = peak_per_device(args, devices[0])
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); peak used: '
        + (f'{peak / 1e12:,.1f} TFLOP/s per device ({peak_src})' if not cpu else
           f'{peak_src}, the best of one measurement per round (the load varies)'))
  print(f'{args.dtype}, seq {args.seq_len}, {args.batch} sequences per device, vocab {args.vocab_size}, '
        f'mesh {args.mesh}={len(devices)}, remat {args.remat}')
  print('MFU = model FLOPs/s / (devices x peak); model FLOPs/token = accounting exact (PaLM: 6N + 12 L H d_head T)')
  runs = {}
  for size in args.sizes.split(','):
    compiled, state, batch, config, compile_s = build(size, args, devices)
    _, state = time_steps(compiled, state, batch, 1)  # warm-up
    fpt = accounting.flops_per_token(config.model, args.seq_len)['exact']
    runs[size] = dict(step=compiled, state=state, batch=batch, compile_s=compile_s, fpt=fpt, times=[],
                      params=accounting.param_counts(config.model)['total'], kernels=kernels_line(config.model))
  for _ in range(args.repeats):  # rounds interleave the sizes: all see the same machine
    if cpu and args.peak_tflops <= 0:
      peak = max(peak, peak_per_device(args, devices[0])[0])
    for r in runs.values():
      seconds, r['state'] = time_steps(r['step'], r['state'], r['batch'], args.steps)
      r['times'].append(seconds)
  tokens = args.batch * len(devices) * args.seq_len
  for size, r in runs.items():
    best, worst = min(r['times']), max(r['times'])
    tps = tokens / best
    mfu = tps * r['fpt'] / (len(devices) * peak)
    print(f"{size:>6} ({accounting.human(r['params'])} params; {r['kernels']}): {tps:12,.0f} tokens/s "
          f"({tps / len(devices):,.0f} per device)  step {1e3 * best:8.1f} ms (slowest round {1e3 * worst:.1f})  "
          f"MFU {100 * mfu:5.1f}%  compile {r['compile_s']:.0f} s")
  if cpu:
    print(f'(CPU peak measured: {peak / 1e9:,.0f} GFLOP/s {args.dtype} matmul)')


if __name__ == '__main__':
  main()

"""Data pipeline throughput: tokens/s of make_train_iter (stdlib corpus, bytes, seq 256, batch 16).

  python benchmarks/bench_data.py [--data_dir=DIR] [--batches=300] [--workers=0,2] [--tokenizer=PATH]

Prints the one-off costs (stdlib build, length index) and, per grain worker count, the steady-state
tokens/s, plus the ratio to the fastest setting measured in the same run; then the training tokens/s of
the `small` model (float32, same seq_len and batch, one device) measured in the same run and the ratio
pipeline / training, which must stay >= 10 so that data never bounds training.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sktlm import hostmem  # noqa: E402

hostmem.tune_malloc()  # training is measured as `sktlm train` runs it

from sktlm import data  # noqa: E402
from sktlm.config import schema  # noqa: E402
from sktlm.data import pipeline, sources  # noqa: E402


def _rate(cfg, batch_size: int, batches: int) -> tuple[float, float]:
  it = data.make_train_iter(cfg, batch_size=batch_size, seed=0)
  try:
    t0 = time.perf_counter()
    next(it)  # pipeline start (worker processes, first batch)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * it.tokens_per_batch / (time.perf_counter() - t0), first
  finally:
    it.close()


def _train_rate(cfg, batch_size: int, steps: int = 3) -> float:
  """Steady-state training tokens/s of the `small` model on batches from the real pipeline."""
  import jax

  from sktlm import sharding
  from sktlm.config import load
  from sktlm.train import resolve, step
  config = load.load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                            'experiments/lm.py:size=small'),
                               {'model.vocab_size': 384, 'data.seq_len': cfg.seq_len,
                                'train.batch_size': batch_size, 'mesh.data': 1})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  it = data.make_train_iter(cfg, batch_size=batch_size, seed=0)
  batches = [step.device_batch(next(it), setup, batch_size) for _ in range(steps + 1)]
  it.close()
  compiled = setup.train_step.lower(state, batches[0]).compile()
  state, m = compiled(state, batches[0])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, m = compiled(state, b)
  jax.block_until_ready(m)
  return steps * batch_size * cfg.seq_len / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--data_dir', default='', help='default: a fresh temporary dir (measures the build)')
  p.add_argument('--batches', type=int, default=300)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--workers', default='0,2')
  p.add_argument('--tokenizer', default='bytes')
  args = p.parse_args()
  tmp = None
  if not args.data_dir:
    tmp = args.data_dir = tempfile.mkdtemp(prefix='sktlm_bench_')
  try:
    cfg = schema.get_config().data
    cfg.update(dict(data_dir=args.data_dir, seq_len=args.seq_len, tokenizer=args.tokenizer))
    t0 = time.perf_counter()
    src = sources.get_source(cfg)
    print(f'source   {src.name}: get_source {time.perf_counter() - t0:.2f}s '
          f'(build {src.build_seconds:.2f}s; 0 = already prepared)')
    tok = data.get_tokenizer(cfg)
    t0 = time.perf_counter()
    lengths = pipeline.doc_lengths(src, 'train', tok)
    print(f'index    {len(lengths)} docs, {lengths.sum():,} tokens: {time.perf_counter() - t0:.2f}s '
          '(cached after the first run)')
    results = {}
    for w in (int(x) for x in args.workers.split(',')):
      cfg.num_workers = w
      rate, first = _rate(cfg, args.batch_size, args.batches)
      results[w] = rate
      print(f'pipeline workers={w}: {rate:,.0f} tokens/s ({rate / args.batch_size / args.seq_len:,.0f} '
            f'batches/s of {args.batch_size}x{args.seq_len}; first batch {first:.2f}s)')
    best = max(results.values())
    for w, r in results.items():
      print(f'ratio    workers={w}: {r / best:.2f} of the best setting')
    cfg.num_workers = 0
    trained = _train_rate(cfg, args.batch_size)
    print(f'training `small` (float32, {args.batch_size}x{args.seq_len}, 1 device): {trained:,.0f} tokens/s; '
          f'pipeline / training = {best / trained:,.0f}x (must be >= 10x)')
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()

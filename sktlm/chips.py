"""Known accelerators (memory and peak dense bf16 FLOP/s per chip) and a measured CPU matmul peak."""

from __future__ import annotations

import dataclasses
import time

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int          # memory per chip (per device as JAX sees it)
  peak_bf16_flops: float  # dense, per chip
  note: str = ''
  ici_bytes_per_s: float = 0.0  # published bidirectional inter-chip bandwidth per chip (0: not listed here)


# Published per-chip figures (dense bf16, no sparsity; ICI from Cloud TPU's v5e/v5p/v6e pages). GPUs leave
# ICI out: their all-to-alls cross NVLink within a node and the network beyond it, no single figure.
CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip('v4', 32 * GiB, 275e12, 'TPU v4 (one chip = 2 TensorCores as one device)'),
    Chip('v5e', 16 * GiB, 197e12, 'TPU v5 lite', 400e9),
    Chip('v5p', 95 * GiB, 459e12, 'TPU v5p', 1200e9),
    Chip('v6e', 32 * GiB, 918e12, 'TPU v6e (Trillium)', 800e9),
    Chip('a100', 80 * 10**9, 312e12, 'NVIDIA A100 80GB SXM'),
    Chip('h100', 80 * 10**9, 989e12, 'NVIDIA H100 SXM'),
    Chip('h200', 141 * 10**9, 989e12, 'NVIDIA H200 SXM'),
]}


def chip_for_device_kind(kind: str) -> Chip | None:
  """Maps jax's device.device_kind (e.g. 'TPU v5p', 'TPU v5 lite', 'NVIDIA H100 80GB HBM3') to a Chip."""
  k = kind.lower()
  if k == 'tpu v5':  # libtpu's compile-only v5p devices (sktlm plan) report the bare generation
    return CHIPS['v5p']
  for key, name in (('v5 lite', 'v5e'), ('v5e', 'v5e'), ('v5p', 'v5p'), ('v6', 'v6e'), ('v4', 'v4'),
                    ('h200', 'h200'), ('h100', 'h100'), ('a100', 'a100')):
    if key in k:
      return CHIPS[name]
  return None


def measure_matmul_peak(dtype: str = 'float32', n: int = 1024, repeats: int = 10) -> float:
  """Measured FLOP/s of one large jitted matmul on the default device (best of `repeats`).

  Used as the MFU peak on CPU, where no published peak applies. bfloat16 inputs accumulate in float32.
  """
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(dtype)
  a = jnp.ones((n, n), dt) * 0.5
  b = jnp.ones((n, n), dt) * 0.25

  @jax.jit
  def f(a, b):
    # Chain a few matmuls so dispatch overhead is amortised.
    x = a
    for _ in range(4):
      x = jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dt)
    return x

  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 4 * 2 * n**3 / best

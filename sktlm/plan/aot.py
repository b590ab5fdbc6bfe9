"""The AOT side of `sktlm plan`: compile the real train step for a target, read XLA's memory and cost
analyses, recognise a compiler's out-of-memory refusal as a verdict, and search the largest batch that fits.

The train step of sktlm.train.step is lowered with abstract inputs (jax.ShapeDtypeStruct carrying shardings)
and compiled for the target; XLA's memory_analysis gives the per-device footprint. XLA's cost_analysis counts
a while-loop body once (with scan_layers: one layer per stack), so the FLOPs of the traced jaxpr are counted
too (sktlm/plan/counters.py).
"""

from __future__ import annotations

import dataclasses
import re
import time

from sktlm import sharding
from sktlm.chips import GiB
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.plan.counters import jaxpr_all_to_all_bytes, jaxpr_matmul_flops
from sktlm.plan.targets import Target, make_mesh
from sktlm.train import resolve, step


@dataclasses.dataclass
class Compiled:
  setup: step.Setup
  memory: dict        # per device, bytes
  xla_flops: float    # per device, cost_analysis (while bodies once)
  traced_flops: float  # global, jaxpr matmuls (conds: the costlier branch)
  traced_flops_min: float  # the same with conds' cheaper branch (dropless_ep: no overflow exchange)
  all_to_all_bytes: float  # global, sent off-device by the jaxpr's all_to_alls (conds: the costlier branch)
  all_to_all_bytes_min: float  # the same with conds' cheaper branch
  compile_s: float
  fused_kernels: list  # names of the Pallas (Mosaic) kernels in the compiled step, e.g. splash attention's


def compile_step(config, mesh) -> Compiled:
  """The compiled train step of `config` (validated and resolved for `mesh`) and what XLA says about it."""
  setup = step.build(config, mesh)
  batch = step.abstract_batch(config, setup)
  t0 = time.perf_counter()
  # One trace gives both the jaxpr (FLOP count) and the lowering; train.build sets the mesh and the
  # logical rules while tracing, so the compiled program is the one training runs.
  traced = setup.train_step.trace(setup.abstract_state, batch)
  compiled = traced.lower().compile()
  dt = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
             aliased=ma.alias_size_in_bytes, temp=ma.temp_size_in_bytes,
             code=ma.generated_code_size_in_bytes)
  mem['peak'] = mem['arguments'] + mem['outputs'] - mem['aliased'] + mem['temp'] + mem['code']
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jaxpr = traced.jaxpr.jaxpr
  return Compiled(setup, mem, float(cost.get('flops', 0.0)), jaxpr_matmul_flops(jaxpr),
                  jaxpr_matmul_flops(jaxpr, min), jaxpr_all_to_all_bytes(jaxpr), jaxpr_all_to_all_bytes(jaxpr, min), dt,
                  fused_kernels(compiled.as_text()))


def fused_kernels(hlo_text: str) -> list[str]:
  """Names of the Pallas kernels a compiled step calls (TPU: Mosaic `tpu_custom_call`s, e.g.
  splash_mha_fwd_segmented_residuals), so a plan shows that it compiled the fused attention."""
  return sorted(set(re.findall(r'\b(splash_m[hq]a_\w+|mha_(?:forward|backward))\b', hlo_text)))


def compiler_refusal(err) -> dict | None:
  """libtpu refuses to compile a step whose temporaries exceed HBM (RESOURCE_EXHAUSTED): a does-not-fit
  verdict, not a failure. Returns {'temp', 'available' (bytes), 'message'}, or None for any other error."""
  msg = str(err)
  m = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)', msg)
  if 'RESOURCE_EXHAUSTED' not in msg or not m:
    return None
  unit = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}  # XLA prints binary units
  first = next((line for line in msg.splitlines() if 'RESOURCE_EXHAUSTED' in line), msg).strip()
  return dict(temp=float(m.group(1)) * unit[m.group(2)], available=float(m.group(3)) * unit[m.group(4)],
              message=first)


def search_batch(config, target: Target, max_per_device: int = 4096, log=print) -> dict:
  """Largest per-device batch (sequences per batch shard, grad_accum=1) whose compiled step fits. `config` is
  validated and resolved once; each candidate batch (b x the batch shards, no accumulation) keeps it valid."""
  if not target.chip:
    raise UserError('search needs a memory limit: use a TPU topology or --chip (e.g. --chip=h100)')
  mesh = make_mesh(config, target)
  validate(config, mesh)
  resolve.resolve(config, mesh)
  shards = sharding.batch_axis_size(mesh, sharding.logical_rules(config))
  cache = {}

  def fits(b):
    if b not in cache:
      config.train.batch_size, config.train.grad_accum = b * shards, 1
      c = compile_step(config, mesh)
      cache[b] = c.memory['peak']
      log(f'  per-device batch {b:>5} (global {b * shards}): peak {cache[b] / GiB:8.2f} GiB  '
          f"{'fits' if cache[b] <= target.hbm_per_device else 'does not fit'}  (compile {c.compile_s:.0f} s)")
    return cache[b] <= target.hbm_per_device

  lo, hi = 0, 1
  while hi <= max_per_device and fits(hi):  # doubling, then bisection between the last fit and first miss
    lo, hi = hi, hi * 2
  hi = min(hi, max_per_device + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return dict(per_device_batch=lo, global_batch=lo * shards, batch_shards=shards,
              peak_bytes=cache.get(lo), hbm_per_device=target.hbm_per_device)

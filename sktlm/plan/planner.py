"""Plan a config on a target without allocating it: counts, bytes per device, AOT compile, fit verdict.

`plan(config, target)` assembles the report dict from the parts, each in its own module:
- sktlm/plan/targets.py: parsing the target (cpu:N or a TPU topology) and its chip;
- sktlm/plan/counters.py: bytes of the abstract state, matmul FLOPs and all-to-all bytes of the traced step;
- sktlm/plan/aot.py: compiling the real train step, the compiler's out-of-memory refusal, the batch search;
- sktlm/plan/report.py: the report text.

FLOPs: the analytic count (sktlm.config.accounting, `exact` convention: full T x T attention) is the reference;
XLA's cost_analysis (per device, loop bodies once) and the traced matmul FLOPs are reported beside it.
"""

from __future__ import annotations

import jax

from sktlm.config import accounting
from sktlm.config.validate import validate
from sktlm.plan.aot import Compiled, compile_step, compiler_refusal, fused_kernels, search_batch  # noqa: F401
from sktlm.plan.counters import jaxpr_all_to_all_bytes, jaxpr_matmul_flops, per_device_bytes, state_bytes  # noqa: F401
from sktlm.plan.report import format_report  # noqa: F401
from sktlm.plan.targets import GiB, Target, get_target, make_mesh, parse_cpu  # noqa: F401
from sktlm.train import resolve, step


def plan(config, target: Target, mfu: float = 0.4, compile: bool = True) -> dict:
  """The full report as a JSON-friendly dict (see format_report). Validates and resolves `config` for the
  target's mesh, as training does (the kernels of the target's platform)."""
  mc = config.model
  mesh = make_mesh(config, target)
  validate(config, mesh)
  resolve.resolve(config, mesh)
  n_dev = len(target.devices)
  seq, batch = config.data.seq_len, config.train.batch_size
  tokens = seq * batch
  fpt = accounting.flops_per_token(mc, seq)
  rep = dict(
      target=target.name, platform=target.platform, n_devices=n_dev,
      chip=target.chip.name if target.chip else None, devices_per_chip=target.devices_per_chip,
      hbm_per_device=target.hbm_per_device, peak_flops_per_device=target.peak_per_device,
      mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True)),
      seq_len=seq, batch_size=batch, grad_accum=config.train.grad_accum, tokens_per_step=tokens,
      dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
      kernels=dict(kernels=mc.kernels, attention_impl=mc.attention_impl, scan_unroll=mc.scan_unroll),
      params=accounting.param_counts(mc), flops_per_token=fpt, kv_cache=accounting.kv_cache_per_token(mc),
      routing_groups=accounting.routing_groups(mc),
      analytic_flops_per_device=fpt['exact'] * tokens / n_dev,
  )
  refused = None
  if compile:
    try:
      c = compile_step(config, mesh)
    except jax.errors.JaxRuntimeError as e:
      refused = compiler_refusal(e)
      if refused is None:
        raise
  if compile and not refused:
    rep['state_bytes'] = state_bytes(c.setup.abstract_state)
    rep.update(memory=c.memory, xla_flops_per_device=c.xla_flops,
               traced_flops_per_device=c.traced_flops / n_dev, compile_s=c.compile_s,
               traced_flops_min_per_device=c.traced_flops_min / n_dev,
               all_to_all_bytes_per_device=c.all_to_all_bytes / n_dev,
               all_to_all_bytes_min_per_device=c.all_to_all_bytes_min / n_dev,
               fused_kernels=c.fused_kernels)
  else:
    setup = step.build(config, mesh)
    rep['state_bytes'] = state_bytes(setup.abstract_state)
  peak_bytes = rep['memory']['peak'] if 'memory' in rep else None
  if refused:  # the arguments (params, optimizer state) live beside the temporaries: a lower bound
    refused['peak_at_least'] = refused['temp'] + rep['state_bytes']['params'] + rep['state_bytes']['opt_state']
    rep['compiler_refused'] = refused
    peak_bytes = refused['peak_at_least']
  if target.chip and peak_bytes is not None:
    rep['fits'] = bool(peak_bytes <= target.hbm_per_device)
    rep['headroom_bytes'] = target.hbm_per_device - peak_bytes
  if target.chip:
    step_s = rep['analytic_flops_per_device'] / (target.peak_per_device * mfu)
    rep.update(mfu=mfu, step_time_s=step_s, tokens_per_s=tokens / step_s)
    if rep.get('all_to_all_bytes_per_device') and target.chip.ici_bytes_per_s:
      # A floor: every byte leaves through the chip's links at half the bidirectional figure, nothing
      # overlaps; multi-hop routes on the torus and contention only add to it.
      one_way = target.chip.ici_bytes_per_s / 2 / target.devices_per_chip
      rep.update(ici_one_way_per_device=one_way,
                 all_to_all_s_at_least=rep['all_to_all_bytes_per_device'] / one_way,
                 all_to_all_min_s_at_least=rep['all_to_all_bytes_min_per_device'] / one_way)
  return rep

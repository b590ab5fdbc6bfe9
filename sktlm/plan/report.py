"""The text of a plan: `format_report(rep)` of the dict sktlm.plan.planner.plan returns, one line per
aspect (target, mesh, kernels, params, FLOPs/token, state bytes, compiled step, FLOPs, all-to-all, verdict,
step-time estimate).
"""

from __future__ import annotations

from sktlm.chips import GiB
from sktlm.config import accounting


def _gib(b):
  return f'{b / GiB:,.2f} GiB' if abs(b) >= GiB / 10 else f'{b / 2**20:,.1f} MiB'


def _h(n):
  return f'{n / 1e15:.3g}P' if abs(n) >= 1e15 else accounting.human(n)


def _traced(rep: dict) -> str:
  lo, hi, ref = rep['traced_flops_min_per_device'], rep['traced_flops_per_device'], rep['analytic_flops_per_device']
  if lo == hi:
    return f'{_h(hi)} ({hi / ref:.2f}x)'
  return f'{_h(lo)} ({lo / ref:.2f}x) without MoE overflow, {_h(hi)} ({hi / ref:.2f}x) with it in every layer'


def _all_to_all_line(rep: dict) -> str:
  lo, hi = rep['all_to_all_bytes_min_per_device'], rep['all_to_all_bytes_per_device']
  secs = 'all_to_all_s_at_least' in rep

  def amount(b, s):
    return _gib(b) + (f" (>= {rep[s]:.2f} s)" if secs else '')

  line = 'all-to-all (traced, MoE dropless_ep), sent off each device per step (forward, remat recompute, backward): '
  if lo == hi:
    line += amount(hi, 'all_to_all_s_at_least')
  else:
    line += (f"{amount(lo, 'all_to_all_min_s_at_least')} when no device pair overflows its first buffer, up to "
             f"{amount(hi, 'all_to_all_s_at_least')} when every MoE layer does")
  if secs:
    line += (f"; seconds: transfer at {rep['ici_one_way_per_device'] / 1e9:.0f} GB/s one-way ICI per device, a "
             'floor (multi-hop routes and contention add to it; compute may overlap it)')
  return line


def ladder_reach(points: list[dict], target: dict) -> dict:
  """How far a target model lies beyond a ladder, per axis: 'n' (active non-embedding parameters), 'depth'
  (n_layers) and 'c' (training FLOPs, exact convention): the ladder's range, the target over the ladder's largest
  value (the extrapolation factor) and whether the target is inside the range. `points` and `target` are dicts
  with those keys (the ladder's runs, e.g. `sktlm plan --ladder=sweeps/model_sizes.py`)."""
  out = {}
  for k in ('n', 'depth', 'c'):
    lo, hi = min(p[k] for p in points), max(p[k] for p in points)
    out[k] = dict(target=target[k], ladder_min=lo, ladder_max=hi, factor=target[k] / hi,
                  covered=bool(lo <= target[k] <= hi))
  return out


def _reach_line(rep: dict) -> str:
  r, lad = rep['ladder_reach'], rep['ladder']
  parts = [f"x{r['n']['factor']:.3g} its largest N ({_h(r['n']['ladder_max'])} -> {_h(r['n']['target'])} active "
           f"non-embedding)", f"x{r['depth']['factor']:.3g} its depth ({r['depth']['ladder_min']}.."
           f"{r['depth']['ladder_max']} -> {r['depth']['target']} layers)",
           f"x{r['c']['factor']:.3g} its C ({r['c']['ladder_max']:.3g} -> {r['c']['target']:.3g} FLOPs, exact; this "
           f"config's C at train.steps {lad['steps']:,} = {_h(lad['tokens'])} tokens)"]
  outside = [name for name, k in (('N', 'n'), ('depth', 'depth'), ('C', 'c')) if not r[k]['covered']]
  verdict = ('beyond what the ladder covers in ' + ', '.join(outside) + ': an extrapolation, not a measurement'
             + ('; across depth only under a depth-transferring parametrisation (completep)'
                if 'depth' in outside else '')) if outside else 'inside the ladder on every axis'
  return f"ladder {lad['name']} ({lad['runs']} runs): this model is " + ', '.join(parts) + f'; {verdict}'


def format_report(rep: dict, config_name: str = '') -> str:
  h = _h
  p, f = rep['params'], rep['flops_per_token']
  lines = [f"sktlm plan {config_name} on {rep['target']}: {rep['n_devices']} devices"
           + (f" ({rep['chip']}, {_gib(rep['hbm_per_device'])} and {rep['peak_flops_per_device'] / 1e12:.0f} "
              f'TFLOP/s bf16 per device)' if rep['chip'] else ' (no chip: no memory verdict; see --chip)')]
  lines.append('mesh: ' + ' '.join(f'{k}={v}' for k, v in rep['mesh'].items())
               + f"; batch {rep['batch_size']} x {rep['seq_len']} = {h(rep['tokens_per_step'])} tokens/step"
               + f" (grad_accum {rep['grad_accum']}); compute {rep['dtype']}, params {rep['param_dtype']}, "
               + f"remat {rep['remat']}")
  if 'kernels' in rep:
    k = rep['kernels']
    ctx = rep['mesh'].get('context', 1)
    attn = (f"attention: the context-parallel all-gather form of sktlm/model/context.py over context={ctx}, not "
            f"{k['attention_impl']}" if ctx > 1 else f"attention {k['attention_impl']}")
    lines.append(f"kernels: {k['kernels']} ({attn}, scan_unroll {k['scan_unroll']})")
  lines.append(f"params: total {h(p['total'])}, active/token {h(p['active'])}, embedding {h(p['embedding'])}, "
               f"head {h(p['head'])}, non-embedding {h(p['non_embedding'])} (active {h(p['active_non_embedding'])})")
  lines.append(f"train FLOPs/token: 6N {h(f['6N'])}, exact {h(f['exact'])} (full TxT attention), "
               f"causal {h(f['causal'])}")
  if 'kv_cache' in rep:
    kv, cdt = rep['kv_cache'], 2 if rep['dtype'] in ('bfloat16', 'float16') else 4
    kib = kv['cached'] * kv['layers'] * cdt / 1024
    lines.append(f"decode KV cache per token: {kv['cached']:,} values/layer ({kib:.1f} KiB in {rep['dtype']} over "
                 f"{kv['layers']} layers); expanded per-head k/v {kv['expanded']:,}, MHA of the same heads "
                 f"{kv['mha']:,}")
  sb = rep['state_bytes']
  lines.append(f"per device, from the abstract state: params {_gib(sb['params'])}, optimizer state "
               f"{_gib(sb['opt_state'])}, grads {_gib(sb['grads'])} (params' shardings)")
  if 'memory' in rep:
    m = rep['memory']
    unfused = '; not matmuls inside fused kernels' if rep.get('fused_kernels') else ''
    lines.append(f"compiled step ({rep['platform']}, {rep['compile_s']:.0f} s): per device arguments "
                 f"{_gib(m['arguments'])}, outputs {_gib(m['outputs'])} (aliased {_gib(m['aliased'])}), "
                 f"temporaries {_gib(m['temp'])}, code {_gib(m['code'])} -> peak {_gib(m['peak'])}")
    lines.append(f"FLOPs per device per step: analytic (exact) {h(rep['analytic_flops_per_device'])}, traced "
                 f"matmuls {_traced(rep)} (counts remat recompute, "
                 f"MoE padding (capacity slots, dropless_ep buffer rows), one-hot embeddings{unfused}), "
                 f"XLA cost_analysis {h(rep['xla_flops_per_device'])} "
                 "(loop bodies counted once)")
    if rep.get('fused_kernels'):
      lines.append(f"fused kernels in the compiled step: {', '.join(rep['fused_kernels'])}")
    if rep.get('all_to_all_bytes_per_device'):
      lines.append(_all_to_all_line(rep))
      if rep.get('routing_groups'):
        g = rep['routing_groups']
        lines.append(f"  group-limited routing: a token's {g['top_k']} experts lie in <= {g['topk_group']} of "
                     f"{g['n_group']} groups ({g['experts_per_group']} experts each); the buffers above are per "
                     f"(token, expert) slot, so the traced bytes do not depend on it (a per-group deduplicating "
                     f"dispatch would send <= {g['topk_group']} copies of a token across groups, not {g['top_k']})")
  if 'compiler_refused' in rep:
    r = rep['compiler_refused']
    lines.append(f"compiled step ({rep['platform']}): refused by the compiler, temporaries {_gib(r['temp'])} exceed "
                 f"the {_gib(r['available'])} it may use; peak >= temporaries + params + optimizer state = "
                 f"{_gib(r['peak_at_least'])}")
  if 'fits' in rep:
    peak = rep['memory']['peak'] if 'memory' in rep else rep['compiler_refused']['peak_at_least']
    frac = peak / rep['hbm_per_device']
    verdict = 'FITS' if rep['fits'] else 'DOES NOT FIT'
    how = (f"{_gib(rep['headroom_bytes'])} headroom" if rep['fits']
           else f"{_gib(-rep['headroom_bytes'])} over")
    at_least = '' if 'memory' in rep else '>= '
    lines.append(f"verdict: {verdict}: peak {at_least}{_gib(peak)} of {_gib(rep['hbm_per_device'])} "
                 f"per device ({frac:.0%}, {how})")
  if 'ladder_reach' in rep:
    lines.append(_reach_line(rep))
  if 'step_time_s' in rep:
    lines.append(f"estimate at {rep['mfu']:.0%} MFU: step {rep['step_time_s']:.2f} s, "
                 f"{h(rep['tokens_per_s'])} tokens/s ({h(rep['tokens_per_s'] / rep['n_devices'])} per device)")
  return '\n'.join(lines)

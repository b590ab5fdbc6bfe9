"""Resolving a sweep into concrete runs: config, train command, size/token/FLOP counts, time estimate.

All counts come from sktlm.config.accounting (the one accounting) on each run's resolved config; no jax.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sktlm import runfiles
from sktlm.config import accounting, layout, validate
from sktlm.errors import UserError
from sktlm.sweep import spec

# CPU fallback for time estimates when no run of this sweep finished yet: `sktlm train` of the small sizes
# (pico..tiny, fp32, batch 16 x 128) sustains ~15% of the fp32 matmul peak over a whole run (eval,
# checkpoints included), and a 2-core CPU peaks at ~290 GFLOP/s; plus ~15 s start-up per run (python, jax
# import, data, compile). Measured figures replace these once a run of the sweep has finished.
ASSUMED_FLOPS_PER_S = 290e9 * 0.15
ASSUMED_STARTUP_S = 15.0


@dataclasses.dataclass
class PlannedRun:
  name: str
  settings: dict[str, Any]          # the run's own settings (those that name it) plus planner settings
  config: str                       # 'experiments/lm.py:size=pico'
  overrides: dict[str, Any]         # COMMON + run overrides, keys without 'config.'
  parent: str
  parent_step: int
  size: str
  steps: int
  batch_size: int
  seq_len: int
  tokens: int
  params: dict[str, int]
  flops_per_token: dict[str, float]
  flops: dict[str, float]
  resources: dict[str, float]
  checkpoint_every: int
  new_tokens: int = -1              # tokens this run trains itself (a branch starts at parent_step)
  model: Any = dataclasses.field(default=None, repr=False)  # the resolved config.model (rules across runs)

  def __post_init__(self):
    if self.new_tokens < 0:
      self.new_tokens = self.tokens

  def train_args(self, run_dir: str, parent_dir: str = '') -> list[str]:
    """Arguments after `sktlm train` (absolute paths: Ray workers may start in another directory)."""
    path, sep, arg = self.config.partition(':')
    args = [f'--config={os.path.abspath(path)}{sep}{arg}', f'--workdir={os.path.abspath(run_dir)}']
    args += [spec.override_flag(k, v) for k, v in self.overrides.items()]
    if self.parent:
      args += [spec.override_flag('train.init_from', os.path.abspath(parent_dir)),
               spec.override_flag('train.init_step', self.parent_step)]
    return args

  def row(self) -> dict[str, Any]:
    return dict(name=self.name, size=self.size, n_params_total=self.params['total'],
                n_params_non_embedding=self.params['non_embedding'], n_params_active=self.params['active'],
                tokens=self.tokens, flops_6n=self.flops['6N'], flops_exact=self.flops['exact'],
                steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, parent=self.parent)


def vocab_size(config) -> int:
  if config.model.vocab_size:
    return int(config.model.vocab_size)
  from sktlm.data import tokenizers  # numpy + sentencepiece only
  tok = tokenizers.get_tokenizer(config.data.tokenizer)
  return layout.resolved_vocab_size(config.model, tok.vocab_size)


def resolve_run(sd: spec.SweepDef, run: spec.Run) -> PlannedRun:
  # COMMON, then the common settings the planner sized the run with, then the run's own settings.
  settings = {**sd.common, **run.common, **run.settings}
  try:
    config = spec.load_run_config(sd.base, settings)
  except UserError as e:
    raise UserError(f"run '{run.name}': {e}") from e
  args, overrides = spec.split_settings(settings)
  mc = config.model
  with mc.unlocked():
    mc.vocab_size = vocab_size(config)
  steps, batch, seq = int(config.train.steps), int(config.train.batch_size), int(config.data.seq_len)
  tokens = steps * batch * seq
  fpt = accounting.flops_per_token(mc, seq)
  params = accounting.param_counts(mc)
  _check_planned(run, batch * seq, params)
  # RESOURCES of the sweep file: a dict, or a function of the run's config (e.g. GPUs = mesh size).
  resources = dict((sd.resources(config) if callable(sd.resources) else sd.resources) or {'CPU': 1})
  return PlannedRun(
      name=run.name, settings={**run.common, **run.settings}, config=spec.config_spec(sd.base, args),
      overrides=overrides,
      parent=run.parent, parent_step=run.parent_step, size=mc.size, steps=steps,
      batch_size=batch, seq_len=seq, tokens=tokens, params=params, flops_per_token=fpt,
      flops={k: v * tokens for k, v in fpt.items()}, resources=resources,
      checkpoint_every=int(config.train.checkpoint_every), model=mc)


def _check_planned(run: spec.Run, tokens_per_step: int, params: dict):
  """A planner sized the run's steps for a tokens-per-step and N: its config must still give them."""
  p = run.planned
  if p.get('tokens_per_step') not in (None, tokens_per_step):
    raise UserError(f"run '{run.name}' was planned at {p['tokens_per_step']:,} tokens per step but its config "
                    f'trains {tokens_per_step:,} (batch_size x seq_len): pass the sweep\'s COMMON to the planner '
                    '(common=COMMON)')
  kind = p.get('param_kind', 'non_embedding')
  if p.get('params') not in (None, params.get(kind)):
    raise UserError(f"run '{run.name}' was planned for {p['params']:,} {kind} parameters but its config has "
                    f'{params.get(kind):,}: pass the sweep\'s COMMON to the planner (common=COMMON)')


def resolve(sd: spec.SweepDef) -> list[PlannedRun]:
  runs = [resolve_run(sd, r) for r in sd.runs]
  validate.across_runs({r.name: r.model for r in runs})
  by_name = {r.name: r for r in runs}
  for r in runs:
    if r.parent:
      p = by_name[r.parent]
      if not 0 < r.parent_step <= p.steps:
        raise UserError(f"run '{r.name}' starts from step {r.parent_step} of '{p.name}', which runs "
                        f'{p.steps} steps')
      if p.checkpoint_every <= 0 or r.parent_step % p.checkpoint_every and r.parent_step != p.steps:
        raise UserError(f"run '{r.name}' starts from step {r.parent_step} of '{p.name}', which saves "
                        f'checkpoints every {p.checkpoint_every} steps; set its '
                        'config.train.checkpoint_every to a divisor of the branch steps')
      # A branch trains only the steps after its parent's checkpoint (its D counts all tokens seen).
      r.new_tokens = (r.steps - r.parent_step) * r.batch_size * r.seq_len
  return runs


# -------------------------------------------------------------------------------------- time estimates

def throughput(sweep_dir: str | None, given: float = 0.0) -> tuple[float, str]:
  """(FLOP/s in the `exact` convention, where the figure comes from)."""
  if given > 0:
    return given, f'given: --flops_per_s={given:.3g}'
  work, secs, n = 0.0, 0.0, 0
  if sweep_dir and os.path.isdir(sweep_dir):
    for name in sorted(os.listdir(sweep_dir)):
      try:
        s = runfiles.load(os.path.join(sweep_dir, name), runfiles.SUMMARY)
      except (OSError, ValueError):
        continue
      model_flops = runfiles.summary_flops(s)['model']
      if s.get('status') == runfiles.DONE and s.get('wall_time_s') and model_flops:
        # Training time without the compile, which estimate_s adds back as start-up.
        work += model_flops
        secs += max(1.0, s['wall_time_s'] - s.get('compile_time_s', 0.0))
        n += 1
  if secs:
    return work / secs, f'measured: {n} finished run(s) in {sweep_dir}'
  return ASSUMED_FLOPS_PER_S, (f'assumed: 15% of a 2-core CPU fp32 peak of 290 GFLOP/s, plus '
                               f'{ASSUMED_STARTUP_S:.0f} s start-up per run; --flops_per_s sets it')


def estimate_s(run: PlannedRun, flops_per_s: float) -> float:
  return ASSUMED_STARTUP_S + run.new_tokens * run.flops_per_token['exact'] / flops_per_s


def fmt_time(s: float) -> str:
  if s != s or s < 0:  # nan
    return '-'
  s = int(round(s))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{s % 3600 // 60:02d}m'


def plan_table(runs: list[PlannedRun], flops_per_s: float, source: str, parallel: int,
               convention: str = 'exact') -> str:
  """The dry-run table; every C in one FLOP convention (sktlm/config/accounting.py: 'exact' = model FLOPs, or '6n')."""
  key = {'exact': 'exact', '6n': '6N', '6N': '6N'}.get(convention)
  if key is None:
    raise UserError(f"--flops must be one of exact, 6n, got '{convention}'")
  head = ['run', 'size', 'N non-emb', 'N total', 'D tokens', 'D/N', 'C', 'steps', 'est. time']
  rows = []
  total = 0.0
  for r in runs:
    t = estimate_s(r, flops_per_s)
    total += t
    n = r.params['non_embedding']
    rows.append([r.name + (f'  (from {r.parent}@{r.parent_step})' if r.parent else ''), r.size,
                 accounting.human(n), accounting.human(r.params['total']), accounting.human(r.tokens),
                 f'{r.tokens / max(n, 1):.1f}', f'{r.flops[key]:.3g}', str(r.steps), fmt_time(t)])
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
  line = lambda cells: '  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths, strict=False)))
  out = [line(head), line(['-' * w for w in widths])] + [line(r) for r in rows]
  c = sum(r.new_tokens * r.flops_per_token[key] for r in runs)
  out.append('')
  out.append(f'C = training FLOPs, {CONVENTION_NAMES[key]}')
  out.append(f'{len(runs)} runs, {accounting.human(sum(r.new_tokens for r in runs))} tokens trained, C = {c:.3g} FLOPs')
  out.append(f'estimated time on this machine: {fmt_time(total)} run one at a time'
             + (f', ~{fmt_time(total / parallel)} with --parallel={parallel} if the hardware scales'
                if parallel > 1 else ''))
  out.append(f'throughput {flops_per_s / 1e9:.1f} GFLOP/s of model FLOPs ({source})')
  return '\n'.join(out)


CONVENTION_NAMES = {'exact': 'exact convention (model FLOPs: 6N + full TxT attention, sktlm/config/accounting.py)',
                    '6N': '6n convention (6 x matmul weights, sktlm/config/accounting.py)'}

"""One results row from a finished run's files: the single summary.json (+ config.json) -> row builder that
sweep results (sktlm.sweep.results) and `sktlm scaling` on folders of run workdirs (sktlm.scaling.io) share,
so both input paths carry the same columns, the seed included. A leaf: it reads the summary through
sktlm.runfiles.
"""

from __future__ import annotations

import hashlib
import json
import os

from sktlm import runfiles

# Config keys that do not make a different configuration: the seed (runs that differ only in it are one
# configuration, averaged by `sktlm scaling`) and where a branch starts from (each seed's own parent).
NOT_IDENTITY = (('seed',), ('train', 'init_from'))
MOE_COLUMNS = ('moe_experts', 'moe_top_k', 'moe_granularity', 'moe_shared_experts', 'moe_dropped_frac')


def from_summary(summary: dict) -> dict:
  """The results columns a run's summary.json gives (docs/run_files.md); model FLOPs under `flops_exact`."""
  params = summary.get('params') or {}
  flops = runfiles.summary_flops(summary)
  return dict(n_params_total=params.get('total'), n_params_non_embedding=params.get('non_embedding'),
              n_params_active=params.get('active'), n_params_active_non_embedding=params.get('active_non_embedding'),
              tokens=summary.get('tokens'), flops_6n=flops['6N'], flops_exact=flops['model'],
              flops_executed=flops['executed'],
              final_train_loss=summary.get('final_train_loss'), final_eval_loss=summary.get('final_eval_loss'),
              best_eval_loss=summary.get('best_eval_loss'), wall_time_s=summary.get('wall_time_s'),
              tokens_per_s=summary.get('tokens_per_s'), mfu=summary.get('mfu'), steps=summary.get('step'),
              message=summary.get('message') or '', **moe_columns(summary))


def moe_columns(summary: dict) -> dict:
  """MoE shape and dropped fraction of a summary.json (docs/run_files.md); None for dense or older summaries."""
  m = summary.get('moe') or {}
  return {'moe_experts': m.get('experts'), 'moe_top_k': m.get('top_k'), 'moe_granularity': m.get('granularity'),
          'moe_shared_experts': m.get('shared_experts'), 'moe_dropped_frac': summary.get('moe_dropped_frac')}


def config_identity(config: dict) -> str:
  """A short hash of the resolved config without the keys in NOT_IDENTITY: equal for runs that differ only
  in their seed."""
  c = json.loads(json.dumps(config, default=str))
  for path in NOT_IDENTITY:
    d = c
    for k in path[:-1]:
      d = d.get(k) if isinstance(d, dict) else None
    if isinstance(d, dict):
      d.pop(path[-1], None)
  return hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:12]


def from_workdir_config(config: dict) -> dict:
  """Columns from a run's config.json: size, seed, parent (the run a branch starts from), batch, seq_len, and
  `overrides` that name the configuration and the seed, so seeds of one configuration group together."""
  model, train = config.get('model') or {}, config.get('train') or {}
  init_from = train.get('init_from') or ''
  seed = config.get('seed')
  overrides = {'config_id': config_identity(config)}
  if seed is not None:
    overrides['config.seed'] = seed
  return dict(size=model.get('size'), seed=seed, parent=os.path.basename(os.path.normpath(init_from)) if init_from
              else '', batch_size=train.get('batch_size'), seq_len=(config.get('data') or {}).get('seq_len'),
              overrides=overrides)

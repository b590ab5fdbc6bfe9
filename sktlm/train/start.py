"""A run's start: every check of the config against its workdir (restart rules, tokenizer, resume step), the
built step and data (`prepare`, which writes nothing), the run's files, and where the state comes from
(`restore_or_init`: this workdir's newest checkpoint that restores, a chosen one, another run's, Hugging Face
weights, or a fresh init). Used by the loop (sktlm/train/loop.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from sktlm import data, files, runfiles, sharding, timeline
from sktlm.config import load
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.train import resolve, step
from sktlm.train.checkpoint import Checkpointer


def _check_workdir_config(workdir: str, config) -> list[str]:
  """Compares the stored config with this one: refuses breaking changes, returns harmless ones."""
  path = runfiles.path(workdir, runfiles.CONFIG)
  if not os.path.exists(path):
    return []
  try:
    old = runfiles.load(workdir, runfiles.CONFIG)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is unreadable ({e}); move it away or use another --workdir') from e
  breaking, harmless = load.diff_configs(old, load.to_dict(config))
  if breaking:
    raise UserError(f'{workdir} holds a run with an incompatible config; changed: {"; ".join(breaking)} '
                    '(use a new --workdir, or revert these keys)')
  return harmless


def _check_tokenizer(workdir: str, tokenizer) -> dict:
  """The tokenizer record for tokenizer.json; refuses a workdir trained with another tokenizer."""
  info = {'spec': str(getattr(tokenizer, 'path', 'bytes')), 'fingerprint': tokenizer.fingerprint,
          'vocab_size': tokenizer.vocab_size}
  old = runfiles.read(workdir, runfiles.TOKENIZER)
  if old and old.get('fingerprint') != info['fingerprint']:
    raise UserError(f"{workdir} was trained with tokenizer {old.get('spec')} (fingerprint "
                    f"{str(old.get('fingerprint'))[:12]}), not {info['spec']} ({info['fingerprint'][:12]})")
  return info


def _check_resume_step(workdir: str, t) -> None:
  done = runfiles.steps_on_disk(runfiles.checkpoints_dir(workdir))
  if _resume_pending(workdir, t):
    if t.resume_step not in done:
      raise UserError(f'train.resume_step={t.resume_step}: no checkpoint at step {t.resume_step} in '
                      f'{workdir}/checkpoints (has {done})')
    done = [s for s in done if s <= t.resume_step]
  if done and done[-1] > t.steps:
    raise UserError(f'{workdir} holds a checkpoint at step {done[-1]}, past train.steps={t.steps} (raise '
                    'train.steps to continue it, or use another --workdir)')


@dataclasses.dataclass
class Prepared:
  """A validated run: nothing has been written to its workdir yet."""
  config: Any
  workdir: str
  tokenizer: Any
  tokenizer_info: dict
  harmless: list[str]
  mesh: Any
  setup: step.Setup | None  # None: the run is finished (nothing is built)
  it: data.DataIterator | None
  eval_batches: list | None
  leader: bool

  @property
  def finished(self) -> bool:
    return self.setup is None


def prepare(config, workdir: str) -> Prepared:
  """Every check a user's input can fail, before the workdir is touched (a failed start leaves it as it was):
  the config is validated once, on its mesh, then resolved once (vocab, kernels, attention, unrolling: what
  config.json records)."""
  files.check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  validate(config, mesh)
  tokenizer = data.get_tokenizer(config.data)
  resolve.resolve(config, mesh, tokenizer)
  harmless = _check_workdir_config(workdir, config)
  tokenizer_info = _check_tokenizer(workdir, tokenizer)
  _check_resume_step(workdir, config.train)
  leader = jax.process_index() == 0
  timeline.mark('validate')
  if _finished(workdir, config.train.steps) and not _resume_pending(workdir, config.train):  # nothing built yet
    return Prepared(config, workdir, tokenizer, tokenizer_info, harmless, mesh, None, None, None, leader)
  setup = step.build(config, mesh)
  timeline.mark('build')
  B, pidx, pcount = config.train.batch_size, jax.process_index(), jax.process_count()
  it = data.make_train_iter(config.data, batch_size=B, seed=config.seed, process_index=pidx, process_count=pcount)
  eval_batches = None
  if config.train.eval_batches > 0:
    eval_batches = [step.device_batch(b, setup, B) for b in data.make_eval_batches(
        config.data, batch_size=B, num_batches=config.train.eval_batches, process_index=pidx,
        process_count=pcount)]
  timeline.mark('data')
  return Prepared(config, workdir, tokenizer, tokenizer_info, harmless, mesh, setup, it, eval_batches, leader)


def _finished(workdir: str, steps: int) -> bool:
  """A complete summary that says done at `steps`, and the checkpoint of that step (file names only)."""
  old = runfiles.read_summary(workdir)
  done = runfiles.steps_on_disk(runfiles.checkpoints_dir(workdir))
  return bool(old and old.get('status') == runfiles.DONE and not runfiles.summary_problems(old)
              and old.get('steps') == steps and done and done[-1] == steps)


def _resume_pending(workdir: str, t) -> bool:
  """train.resume_step=K not yet honoured in this workdir: even a finished run goes back to K."""
  return t.resume_step >= 0 and (runfiles.read(workdir, runfiles.RESUMED_AT) or {}).get('resume_step') != \
      t.resume_step


def write_run_files(p: Prepared) -> None:
  os.makedirs(p.workdir, exist_ok=True)
  if not p.leader:
    return
  files.remove_temp_leftovers(p.workdir)  # of writes killed in earlier attempts
  if p.harmless:
    print(f'config changed since the last start (allowed): {"; ".join(p.harmless)}')
  if not os.path.exists(runfiles.path(p.workdir, runfiles.TOKENIZER)):
    runfiles.write(p.workdir, runfiles.TOKENIZER, p.tokenizer_info)
  runfiles.write(p.workdir, runfiles.CONFIG, load.to_dict(p.config))


# ---------------------------------------------------------------------------------------------------
# Where the state comes from: this workdir's checkpoint, another run's, or a fresh init.

def restore_or_init(p: Prepared, ckpt: Checkpointer):
  """Returns (state, start_step, origin string)."""
  config, setup = p.config, p.setup
  upto = _resume_step(p, ckpt)
  found = ckpt.restore_newest(setup.abstract_state, upto)
  if found is not None:
    state, data_state, start_step, bad = found
    p.it.set_state(data_state)
    if bad and p.leader:
      for b, err, where in bad:
        print(f'checkpoint step {b} is corrupt ({err[:160]}); moved to {where}; resuming from step {start_step}')
    return state, start_step, f'resumed from step {start_step}'
  if config.train.init_from_hf:  # a Hugging Face Llama / DeepSeek-V3 folder (interop/hf.py); step 0, fresh optimizer
    from sktlm.train import init_hf
    return init_hf.init_state(config, setup), 0, f'initialised from Hugging Face weights {config.train.init_from_hf}'
  if config.train.init_from:
    return _init_from_run(p)
  return setup.init_state(jax.random.PRNGKey(config.seed)), 0, 'initialised from scratch'


def _resume_step(p: Prepared, ckpt: Checkpointer) -> int | None:
  """train.resume_step=K (once per K): newer checkpoints go to the quarantine and K is restored."""
  k = p.config.train.resume_step
  if k < 0:
    return None
  if (runfiles.read(p.workdir, runfiles.RESUMED_AT) or {}).get('resume_step') == k:
    return None  # honoured by an earlier attempt: its newer checkpoints are this run's progress
  if p.leader:  # prepare checked that step k exists
    for where in ckpt.set_aside_after(k):
      print(f'train.resume_step={k}: checkpoint {where.rsplit("/", 1)[-1].split(".")[0]} moved to {where}')
    runfiles.write(p.workdir, runfiles.RESUMED_AT, {'resume_step': k})
  return k


def _init_from_run(p: Prepared):
  src, config = p.config.train.init_from, p.config
  src_ckpt_dir = runfiles.checkpoints_dir(src)
  if not os.path.isdir(src_ckpt_dir):
    raise UserError(f'train.init_from={src}: no checkpoints/ folder there')
  _check_workdir_config(src, config)
  src_ckpt = Checkpointer(src_ckpt_dir, read_only=True, async_save=False)
  steps = src_ckpt.all_steps()
  start_step = config.train.init_step if config.train.init_step >= 0 else (steps[-1] if steps else None)
  if start_step is None or start_step not in steps:
    raise UserError(f'train.init_from={src}: no checkpoint at step {config.train.init_step} (has {steps})')
  state, data_state = src_ckpt.restore(start_step, p.setup.abstract_state)
  src_ckpt.close()
  p.it.set_state(data_state)
  return state, start_step, f'initialised from {src} step {start_step}'

"""The training loop: resume or start, feed data, dispatch steps ahead of metric fetches, evaluate, log,
checkpoint (periodically, at the end, on SIGTERM), and write the run's files (docs/run_files.md).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import numpy as np

from sktlm import chips, configs, data, flops, hostmem, sharding, train
from sktlm.checkpoint import Checkpointer
from sktlm.errors import UserError
from sktlm.metrics import MetricsWriter, write_json
from sktlm.train import resolve_vocab

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run saved a checkpoint and can be resumed


class Diverged(Exception):
  pass


def _check_workdir_config(workdir: str, config) -> list[str]:
  """Compares the stored config with this one: refuses breaking changes, returns harmless ones."""
  path = os.path.join(workdir, 'config.json')
  new = configs.to_dict(config)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is unreadable ({e}); move it away or use another --workdir') from e
  breaking, harmless = configs.diff_configs(old, new)
  if breaking:
    raise UserError(f'{workdir} holds a run with an incompatible config; changed: {"; ".join(breaking)} '
                    '(use a new --workdir, or revert these keys)')
  return harmless


def _check_tokenizer(workdir: str, tokenizer) -> None:
  path = os.path.join(workdir, 'tokenizer.json')
  info = {'spec': str(getattr(tokenizer, 'path', 'bytes')), 'fingerprint': tokenizer.fingerprint,
          'vocab_size': tokenizer.vocab_size}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get('fingerprint') != info['fingerprint']:
      raise UserError(f"{workdir} was trained with tokenizer {old.get('spec')} (fingerprint "
                      f"{str(old.get('fingerprint'))[:12]}), not {info['spec']} ({info['fingerprint'][:12]})")
  else:
    write_json(path, info)


def peak_flops_total(config, devices) -> tuple[float, str]:
  """Peak FLOP/s of all devices together, and where the figure came from."""
  n = len(devices)
  if config.metrics.peak_flops > 0:
    return config.metrics.peak_flops * n, 'config'
  chip = chips.chip_for_device_kind(devices[0].device_kind)
  if chip is not None:
    return chip.peak_bf16_flops * n, f'{chip.name} table'
  # CPU: simulated devices share the same cores, so the measured matmul peak is the machine's total.
  return chips.measure_matmul_peak(config.model.dtype), f'measured {config.model.dtype} matmul'


class _StopFlag:
  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _restore_or_init(config, setup, ckpt, it, rng):
  """Returns (state, start_step, origin string)."""
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, setup.abstract_state)
    it.set_state(data_state)
    return state, latest, f'resumed from step {latest}'
  if config.train.init_from_hf:  # weights from a Hugging Face Llama folder (sktlm/hf.py); step 0, fresh optimizer
    from sktlm import hf
    return hf.init_state(config, setup), 0, f'initialised from Hugging Face weights {config.train.init_from_hf}'
  if config.train.init_from:
    src = config.train.init_from
    src_ckpt_dir = os.path.join(src, 'checkpoints')
    if not os.path.isdir(src_ckpt_dir):
      raise UserError(f'train.init_from={src}: no checkpoints/ folder there')
    _check_workdir_config(src, config)
    src_ckpt = Checkpointer(src_ckpt_dir, read_only=True, async_save=False)
    steps = src_ckpt.all_steps()
    step = config.train.init_step if config.train.init_step >= 0 else (steps[-1] if steps else None)
    if step is None or step not in steps:
      raise UserError(f'train.init_from={src}: no checkpoint at step {config.train.init_step} (has {steps})')
    state, data_state = src_ckpt.restore(step, setup.abstract_state)
    src_ckpt.close()
    it.set_state(data_state)
    return state, step, f'initialised from {src} step {step}'
  return setup.init_state(rng), 0, 'initialised from scratch'


def run(config, workdir: str) -> int:
  """Trains per `config` in `workdir`; returns the process exit code (0 done, 143 preempted)."""
  if config.distributed.initialize:
    # CPU hosts need a collectives backend for cross-process reductions (GPU/TPU ignore this setting).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kw = {}
    if config.distributed.coordinator_address:
      kw = dict(coordinator_address=config.distributed.coordinator_address,
                num_processes=config.distributed.num_processes, process_id=config.distributed.process_id)
    jax.distributed.initialize(**kw)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()
  tokenizer = data.get_tokenizer(config.data)
  resolve_vocab(config, tokenizer)
  mesh = sharding.make_mesh(config.mesh)
  train.resolve_platform(config, mesh)  # the kernels, attention and unrolling config.json records
  harmless = _check_workdir_config(workdir, config)
  if jax.process_index() == 0:
    _check_tokenizer(workdir, tokenizer)
  if harmless and jax.process_index() == 0:
    print(f'config changed since the last start (allowed): {"; ".join(harmless)}')
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, 'config.json'), configs.to_dict(config))

  setup = train.build(config, mesh)
  t, B, T = config.train, config.train.batch_size, config.data.seq_len
  pidx, pcount = jax.process_index(), jax.process_count()
  it = data.make_train_iter(config.data, batch_size=B, seed=config.seed, process_index=pidx,
                            process_count=pcount)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.keep_checkpoints,
                      async_save=t.async_checkpoint)
  state, start, origin = _restore_or_init(config, setup, ckpt, it, jax.random.PRNGKey(config.seed))
  if pidx == 0:
    print(f'{origin}; mesh {dict(mesh.shape)}; {flops.human(flops.param_counts(config.model)["total"])} params; '
          f'host malloc {hostmem.status()}')

  counts = flops.param_counts(config.model)
  fpt = flops.flops_per_token(config.model, T)
  tokens_per_step = B * T
  peak, peak_src = peak_flops_total(config, jax.devices())

  t0 = time.time()
  compiled = setup.train_step.lower(state, train.abstract_batch(config, setup)).compile()
  compile_s = time.time() - t0

  eval_batches = None
  if t.eval_batches > 0:
    eval_batches = [train.device_batch(b, setup, B) for b in data.make_eval_batches(
        config.data, batch_size=B, num_batches=t.eval_batches, process_index=pidx, process_count=pcount)]

  writer = MetricsWriter(workdir, tensorboard=config.metrics.tensorboard, progress=config.metrics.progress,
                         total_steps=t.steps, enabled=pidx == 0)
  summary = {'status': 'running', 'steps': t.steps, 'seq_len': T, 'batch_size': B, 'params': counts,
             'flops_per_token': fpt, 'compile_time_s': compile_s, 'peak_flops': peak, 'peak_source': peak_src}
  evals: list[float] = []
  window: list[dict] = []
  last_log = {'time': time.time(), 'step': start}
  train_time = [0.0]  # seconds spent in logged training windows (excludes compile and eval)
  step = start

  def record_base(s):
    return {'step': s, 'tokens': s * tokens_per_step, 'flops': s * tokens_per_step * fpt['exact'],
            'flops_6n': s * tokens_per_step * fpt['6N']}

  def consume(s, metrics):
    """Fetches step s's metrics (the only host sync), checks finiteness, logs every log_every steps."""
    m = jax.device_get(metrics)
    if not math.isfinite(float(m['loss'])):
      raise Diverged(f'loss is not finite ({float(m["loss"])}) at step {s}')
    window.append(m)
    if s % t.log_every == 0 or s == t.steps:
      now = time.time()
      dt = max(now - last_log['time'], 1e-9)
      tps = (s - last_log['step']) * tokens_per_step / dt
      rec = {'kind': 'train', **record_base(s),
             'loss': float(np.mean([w['loss'] for w in window])), 'lr': float(m['lr']),
             'grad_norm': float(m['grad_norm']), 'tokens_per_s': tps,
             'step_time_s': dt / max(s - last_log['step'], 1), 'mfu': tps * fpt['exact'] / peak,
             'wall_time_s': now - t_start}
      for k in m:
        if k.startswith('moe_'):
          rec[k] = np.mean([w[k] for w in window], axis=0)
      writer.write(rec)
      train_time[0] += dt
      summary['final_train_loss'] = rec['loss']
      window.clear()
      last_log.update(time=now, step=s)

  def evaluate(s):
    sums = [setup.eval_step(state, b) for b in eval_batches]
    loss_sum = sum(float(x['loss_sum']) for x in sums)
    weight_sum = sum(float(x['weight_sum']) for x in sums)
    loss = loss_sum / max(weight_sum, 1.0)
    rec = {'kind': 'eval', **record_base(s), 'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50.0))}
    if tokenizer.is_bytes:
      rec['eval_bpb'] = loss / math.log(2)
    writer.write(rec)
    evals.append(loss)
    summary.update(final_eval_loss=loss, best_eval_loss=min(evals))
    last_log['time'] = time.time()  # eval time is not training time

  saved = {'step': None}

  def save(s, force=False):
    ckpt.save(s, state, it.get_state(), force=force)
    saved['step'] = s

  exit_code = 0
  pending = None
  try:
    with _StopFlag() as stop:
      while step < t.steps:
        if stop.signum is not None:
          break
        batch = train.device_batch(next(it), setup, B)
        state, metrics = compiled(state, batch)
        step += 1
        if pending is not None:
          consume(*pending)
        pending = (step, metrics)
        at_end = step == t.steps
        if step % t.checkpoint_every == 0 or at_end:
          consume(*pending)  # never checkpoint a state whose loss was not checked
          pending = None
          save(step, force=at_end)
        if eval_batches and (step % t.eval_every == 0 or at_end):
          if pending is not None:
            consume(*pending)
            pending = None
          evaluate(step)
      if pending is not None:
        consume(*pending)
      if stop.signum is not None and step < t.steps:
        if saved['step'] != step:  # the signal may land just after this step's periodic save
          save(step, force=True)
        ckpt.wait()
        summary.update(status='preempted', message=f'stopped by signal {stop.signum} at step {step}')
        exit_code = PREEMPTED_EXIT_CODE
      else:
        summary['status'] = 'done'
  except Diverged as e:
    kept = ckpt.latest_step()
    kept = f'last good checkpoint kept: step {kept}' if kept is not None else 'no checkpoint was saved before'
    summary.update(status='diverged', message=f'{e}; {kept}')
    raise UserError(summary['message']) from None
  except Exception as e:
    summary.update(status='failed', message=f'{type(e).__name__}: {e}'[:2000])
    raise
  finally:
    ckpt.close()
    writer.close()
    elapsed = time.time() - t_start
    done_tokens = step * tokens_per_step
    trained = (step - start) * tokens_per_step
    summary.update(step=step, tokens=done_tokens, wall_time_s=elapsed,
                   flops={'6N': done_tokens * fpt['6N'], 'exact': done_tokens * fpt['exact']},
                   tokens_per_s=trained / max(train_time[0], 1e-9))
    summary['mfu'] = summary['tokens_per_s'] * fpt['exact'] / peak
    if pidx == 0:
      write_json(os.path.join(workdir, 'summary.json'), summary)
  if pidx != 0:
    return exit_code
  print(f"{summary['status']}: step {step}, train loss {summary.get('final_train_loss', float('nan')):.4f}, "
        f"eval loss {summary.get('final_eval_loss', float('nan')):.4f}, {summary['tokens_per_s']:,.0f} tok/s")
  return exit_code

"""The training loop: check everything, write the run's files, resume or start, then feed data, dispatch
steps ahead of metric fetches, evaluate, log, checkpoint (periodically, at the end, on SIGTERM), and write
the summary (docs/run_files.md).

Reading order: `run` (top level) -> `start.prepare` (validation; writes nothing) -> `start.write_run_files` ->
`start.restore_or_init` -> `Trainer.train` (the step loop) -> `Trainer.finish` -> the summary.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time

import jax

from sktlm import chips, runfiles, timeline
from sktlm.config import accounting
from sktlm.errors import UserError
from sktlm.train import compile_cache, step
from sktlm.train.checkpoint import Checkpointer, io_error, last_good
from sktlm.train.metrics import MetricsWriter, RunStats
from sktlm.train.start import Prepared, prepare, restore_or_init, write_run_files

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run saved a checkpoint and can be resumed


class Diverged(Exception):
  pass


@dataclasses.dataclass
class Spike(Exception):
  step: int
  loss: float
  mean: float


def peak_flops_total(config, devices) -> tuple[float, str]:
  """Peak FLOP/s of all devices together (the mesh's, not jax.devices()), and where the figure came from."""
  devices = list(devices)
  n = len(devices)
  if config.metrics.peak_flops > 0:
    return config.metrics.peak_flops * n, 'config'
  chip = chips.chip_for_device_kind(devices[0].device_kind)
  if chip is not None:
    return chip.peak_bf16_flops * n, f'{chip.name} table'
  # CPU: simulated devices share the same cores, so the measured matmul peak is the machine's total. Best of
  # 3 timed calls, not 10: the figure moves less than the load does, and it was a second of every start.
  return chips.measure_matmul_peak(config.model.dtype, repeats=3), f'measured {config.model.dtype} matmul'


# ---------------------------------------------------------------------------------------------------
# The step loop.

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


class Trainer:
  """Runs steps from `step` to train.steps. Step n+1 is dispatched before step n's metrics are fetched (the
  only host sync); a step's metrics are always checked before its state is saved or evaluated."""

  def __init__(self, p: Prepared, ckpt: Checkpointer, writer: MetricsWriter, stats: RunStats, state, start_step: int):
    self.p, self.t, self.ckpt, self.writer, self.stats = p, p.config.train, ckpt, writer, stats
    self.state, self.step, self.saved_step = state, start_step, start_step
    self.compiled = None
    self.compile_s = 0.0
    self.rollbacks = 0

  def compile(self) -> None:
    t0 = time.time()
    batch = step.abstract_batch(self.p.config, self.p.setup)
    self.compiled = self.p.setup.train_step.lower(self.state, batch).compile()
    self.compile_s = time.time() - t0
    timeline.mark('train compile')
    self.stats.restart_window(self.step)  # compile time is not training time

  def train(self, stop: _StopFlag) -> None:
    t, pending = self.t, None
    while self.step < t.steps and stop.signum is None:
      batch = step.device_batch(next(self.p.it), self.p.setup, t.batch_size)
      self.state, metrics = self.compiled(self.state, batch)
      self.step += 1
      try:
        if pending is not None:
          self._check(*pending)
        pending = (self.step, metrics)
        at_end = self.step == t.steps
        save_due = self.step % t.checkpoint_every == 0 or at_end
        eval_due = self.p.eval_batches and (self.step % t.eval_every == 0 or at_end)
        if save_due or eval_due:
          self._check(*pending)  # never save or evaluate a state whose step was not checked
          pending = None
        if save_due:
          self._save(force=at_end)
        if eval_due:
          self._evaluate()
      except Spike as spike:
        pending = None
        self._rollback(spike)
    if pending is not None:
      try:
        self._check(*pending)
      except Spike as spike:  # the signal came; the spike step is not saved, the last checkpoint is
        self._rollback(spike)

  def finish(self, stop: _StopFlag) -> str:
    """After the loop: the preemption save, or the final eval if an earlier attempt was killed before it."""
    if stop.signum is not None and self.step < self.t.steps:
      if self.saved_step != self.step:  # the signal may land just after this step's periodic save
        self._save(force=True)
      self.ckpt.wait()
      return f'stopped by signal {stop.signum} at step {self.step}'
    if self.p.eval_batches and not self.stats.has_eval(self.step):
      self._evaluate()
    return ''

  def _check(self, n: int, metrics) -> None:
    """Fetches step `step`'s metrics: non-finite -> Diverged, loss spike -> Spike, else logged."""
    m = jax.device_get(metrics)
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise Diverged(f'loss is not finite ({loss}) at step {n}')
    if not bool(m.get('finite', True)):
      raise Diverged(f'gradient norm or updated parameters are not finite at step {n} (loss {loss:.4f}, '
                     f'grad norm {float(m["grad_norm"])})')
    mean = self.stats.window_mean_loss()
    if self.t.spike_factor > 0 and mean is not None and loss > self.t.spike_factor * mean:
      raise Spike(n, loss, mean)
    self.stats.observe(n, m)
    if n % self.t.log_every == 0 or n == self.t.steps:
      self.writer.write(self.stats.train_record(n))

  def _save(self, force: bool = False) -> None:
    self.ckpt.save(self.step, self.state, self.p.it.get_state(), force=force)
    self.saved_step = self.step

  def _evaluate(self) -> None:
    timeline.mark('train steps')
    setup = self.p.setup
    sums = [setup.eval_step(self.state, b) for b in self.p.eval_batches]
    loss = sum(float(x['loss_sum']) for x in sums) / max(sum(float(x['weight_sum']) for x in sums), 1.0)
    if not math.isfinite(loss):
      raise Diverged(f'eval loss is not finite ({loss}) at step {self.step}')
    self.writer.write(self.stats.eval_record(self.step, loss, self.p.tokenizer.is_bytes))
    self.stats.restart_window(self.step)  # eval time is not training time
    timeline.mark('eval')

  def _rollback(self, spike: Spike) -> None:
    """Back to the last checkpoint; the batches from there through the spike step are skipped."""
    self.ckpt.wait()
    to = self.ckpt.latest_step()
    if to is None:
      print(f'loss spike at step {spike.step} ({spike.loss:.4f}, window mean {spike.mean:.4f}) before any '
            'checkpoint: nothing to roll back to, going on')
      self.stats.forget_after(spike.step)
      return
    self.rollbacks += 1
    if self.rollbacks > self.t.spike_max_rollbacks:
      raise Diverged(f'loss spike at step {spike.step} ({spike.loss:.4f} > {self.t.spike_factor} x '
                     f'{spike.mean:.4f}) after {self.t.spike_max_rollbacks} rollbacks')
    self.state, data_state = self.ckpt.restore(to, self.p.setup.abstract_state)
    self.p.it.set_state(data_state)
    skipped = spike.step - to
    for _ in range(skipped):
      next(self.p.it)
    self.step = self.saved_step = to
    self.writer.write(self.stats.rollback_record(spike.step, to, spike.loss, spike.mean, skipped))


# ---------------------------------------------------------------------------------------------------
# The run.

def _start_distributed(config) -> None:
  if not config.distributed.initialize:
    return
  # CPU hosts need a collectives backend for cross-process reductions (GPU/TPU ignore this setting).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kw = {}
  if config.distributed.coordinator_address:
    kw = dict(coordinator_address=config.distributed.coordinator_address,
              num_processes=config.distributed.num_processes, process_id=config.distributed.process_id)
  jax.distributed.initialize(**kw)


def moe_shape(mc) -> dict:
  """The routing shape a scaling analysis needs (docs/run_files.md): routed experts E, top_k, granularity
  G = d_ff / expert d_ff (Krajewski et al. 2024), shared experts; E = 1 for a dense model."""
  moe = mc.moe
  if moe.num_experts <= 0:
    return dict(experts=1, top_k=1, granularity=1.0, shared_experts=0)
  return dict(experts=moe.num_experts, top_k=moe.top_k, granularity=mc.d_ff / (moe.expert_d_ff or mc.d_ff),
              shared_experts=moe.num_shared_experts)


def run(config, workdir: str, malloc: str = 'default (not tuned by this caller)') -> int:
  """Trains per `config` in `workdir`; returns the process exit code (0 done, 143 preempted). `malloc`: what
  hostmem.tune_malloc did in this process, for the start line."""
  with compile_cache.enabled(config.train.compile_cache):
    return _run(config, workdir, malloc)


def _run(config, workdir: str, malloc: str) -> int:
  t_start = time.time()
  _start_distributed(config)
  p = prepare(config, workdir)
  t, B, T = config.train, config.train.batch_size, config.data.seq_len
  if p.finished:
    if p.leader:
      print(f'already finished: step {t.steps} of {t.steps}; {workdir}/{runfiles.SUMMARY} kept as it is')
    return 0
  try:
    write_run_files(p)
  except OSError as e:  # a full disk at the start: one line
    raise UserError(f'cannot write {io_error(e, workdir)}; {last_good(runfiles.checkpoints_dir(workdir))}') from None
  ckpt = Checkpointer(runfiles.checkpoints_dir(workdir), keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  state, start, origin = restore_or_init(p, ckpt)
  timeline.mark('state')
  counts, fpt = accounting.param_counts(config.model), accounting.flops_per_token(config.model, T)
  if p.leader:
    print(f'{origin}; mesh {dict(p.mesh.shape)}; {accounting.human(counts["total"])} params; '
          f'host malloc {malloc}')
  peak, peak_src = peak_flops_total(config, p.mesh.devices.flat)
  timeline.mark('peak')
  history = runfiles.read_metrics(workdir) if p.leader else []
  stats = RunStats(tokens_per_step=B * T, fpt=fpt, peak=peak, history=history, start_step=start,
                   spike_window=t.spike_window if t.spike_factor > 0 else 0, t_start=t_start)
  writer = MetricsWriter(workdir, tensorboard=config.metrics.tensorboard, progress=config.metrics.progress,
                         total_steps=t.steps, enabled=p.leader)
  trainer = Trainer(p, ckpt, writer, stats, state, start)
  timeline.mark('writers')
  summary = {'status': runfiles.RUNNING, 'steps': t.steps, 'seq_len': T, 'batch_size': B, 'params': counts,
             'eval_batches': t.eval_batches if p.eval_batches else 0,
             'flops_per_token': fpt, 'peak_flops': peak, 'peak_source': peak_src, 'moe': moe_shape(config.model)}
  exit_code = 0
  try:
    if start < t.steps:
      trainer.compile()
    with _StopFlag() as stop:
      trainer.train(stop)
      stopped = trainer.finish(stop)
    ckpt.wait()  # the final save is on disk (or its I/O error raised) before the summary says done
    if stopped:
      summary.update(status=runfiles.PREEMPTED, message=stopped)
      exit_code = PREEMPTED_EXIT_CODE
    else:
      summary['status'] = runfiles.DONE
  except Diverged as e:
    kept = ckpt.latest_step()
    kept = f'last good checkpoint kept: step {kept}' if kept is not None else 'no checkpoint was saved before'
    summary.update(status=runfiles.DIVERGED, message=f'{e}; {kept}')
    raise UserError(summary['message']) from None
  except UserError as e:  # e.g. a save that hit a full disk (checkpoint.py words it)
    summary.update(status=runfiles.FAILED, message=str(e)[:2000])
    raise
  except Exception as e:
    summary.update(status=runfiles.FAILED, message=f'{type(e).__name__}: {e}'[:2000])
    io = io_error(e, workdir)
    if io is not None:  # a full disk or a failing one while writing a record: one line, not a traceback
      raise UserError(f'cannot write {io}; {last_good(ckpt.directory)}') from None
    raise
  finally:
    try:
      ckpt.close()
      timeline.mark('checkpoint')
    finally:
      try:
        writer.close()
        summary.update(stats.summary(trainer.step), compile_time_s=trainer.compile_s)
        if p.leader:
          runfiles.write_summary(workdir, summary)
      except OSError as e:
        raise UserError(f'cannot write {io_error(e, workdir)}; {last_good(ckpt.directory)}') from None
    timeline.mark('summary')
  if p.leader:
    nan = float('nan')
    print(f"{summary['status']}: step {trainer.step}, train loss {summary.get('final_train_loss', nan):.4f}, "
          f"eval loss {summary.get('final_eval_loss', nan):.4f}, {summary['tokens_per_s'] or 0:,.0f} tok/s")
  return exit_code

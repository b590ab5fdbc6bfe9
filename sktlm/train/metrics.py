"""Run outputs and their bookkeeping: metrics.jsonl (one record per logged step), TensorBoard events, a
terminal progress line, and `RunStats`, which turns step metrics into records and the summary.

Summary statistics cover every attempt of a run (a resumed run is several processes): earlier attempts are
read back from metrics.jsonl, whose records carry the attempt number (docs/run_files.md).
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time

import numpy as np

from sktlm import files, runfiles


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter (event files without TensorFlow), imported without torch.

  tensorboardX imports torch, if it is installed, only to accept torch tensors; scalars never need it, and
  the import costs a run 1.5-2.5 s of start-up. Hiding torch during the import makes tensorboardX skip it
  (it catches the ImportError); a torch imported earlier is used as it is.
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir)


class MetricsWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True, progress: bool = True, total_steps: int = 0,
               enabled: bool = True):
    """enabled=False (non-leader hosts of a multi-host run): records are dropped, nothing is written."""
    self.enabled = enabled
    self.path = runfiles.path(workdir, runfiles.METRICS)
    self._file = None
    self._tb = None
    if enabled:
      cut = files.repair_jsonl(self.path)  # a kill mid-line must not glue the next record onto it
      if cut:
        print(f'{runfiles.METRICS}: dropped a cut last line ({cut} bytes) left by a killed attempt', file=sys.stderr)
      self._file = open(self.path, 'a', buffering=1)  # line-buffered: a kill keeps every finished record
    if tensorboard and enabled:
      self._tb = _summary_writer(runfiles.path(workdir, runfiles.TENSORBOARD))
    self._tty = progress and sys.stderr.isatty()
    self.total_steps = total_steps
    self._t0 = time.time()

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: files.jsonable(v) for k, v in record.items()}
    try:
      self._file.write(json.dumps(record) + '\n')
    except OSError as e:  # a full disk: name the file (a write error carries no path)
      raise OSError(e.errno, e.strerror, self.path) from None
    if self._tb is not None and record.get('kind') in ('train', 'eval'):
      prefix = record['kind']
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ('step', 'kind') and math.isfinite(v):
          self._tb.add_scalar(f'{prefix}/{k}', v, record['step'])
    self._show(record)

  def _show(self, r: dict) -> None:
    kind = r.get('kind')
    if kind == 'eval':
      line = f"step {r['step']:>7}  eval_loss {r['eval_loss']:.4f}"
      if 'eval_bpb' in r:
        line += f"  bpb {r['eval_bpb']:.4f}"
    elif kind == 'rollback':
      line = (f"step {r['step']:>7}  loss spike {r['loss']:.4f} (window mean {r['window_mean']:.4f}): rolled "
              f"back to step {r['to_step']}, skipping {r['skipped_batches']} batches")
    else:
      frac = r['step'] / max(self.total_steps, 1)
      elapsed = time.time() - self._t0
      eta = elapsed / max(frac, 1e-9) * (1 - frac) if frac > 0 else float('nan')
      line = (f"step {r['step']:>7}/{self.total_steps} ({100 * frac:5.1f}%)  loss {r['loss']:.4f}  "
              f"lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s  mfu {100 * r['mfu']:.1f}%  eta {eta:,.0f}s")
    if self._tty:
      end = '' if kind == 'train' else '\n'
      print('\r\033[K' + line, end=end, file=sys.stderr, flush=True)
    else:
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._tty:
      print(file=sys.stderr)
    try:
      self._file.close()
    except OSError as e:  # the flush of a record that did not fit
      raise OSError(e.errno, e.strerror, self.path) from None
    if self._tb is not None:
      self._tb.close()


class _Attempts:
  """Totals of the earlier attempts of a run, from their metrics.jsonl records."""

  def __init__(self, history: list[dict], resume_step: int):
    wall: dict[int, float] = {}
    self.train_s = self.trained_tokens = 0.0
    self.evals: dict[int, float] = {}     # step -> eval loss (last record per step)
    self.last_train: dict | None = None   # the last train record at or before resume_step
    self.rollbacks: list[dict] = []
    for r in history:
      a, step = int(r.get('attempt', 0)), int(r.get('step', -1))
      wall[a] = max(wall.get(a, 0.0), float(r.get('wall_time_s', 0.0)))
      kind = r.get('kind')
      if kind == 'train':
        self.train_s += float(r.get('window_s', 0.0))
        self.trained_tokens += float(r.get('window_s', 0.0)) * float(r.get('tokens_per_s', 0.0))
        if step <= resume_step and (self.last_train is None or step >= self.last_train['step']):
          self.last_train = r
      elif kind == 'eval' and step <= resume_step and runfiles.finite(r.get('eval_loss')):
        self.evals[step] = float(r['eval_loss'])
      elif kind == 'rollback':
        self.rollbacks.append({k: r[k] for k in ('step', 'to_step', 'loss', 'window_mean', 'skipped_batches')
                               if k in r})
    self.count = (max(wall) + 1) if wall else 0
    self.wall_s = sum(wall.values())


class RunStats:
  """Bookkeeping of one run across its attempts: step losses (for the spike check), the logged window's
  means, tokens/s and MFU over training time only, evals, and the summary fields."""

  def __init__(self, *, tokens_per_step: int, fpt: dict, peak: float, history: list[dict], start_step: int,
               spike_window: int = 0, t_start: float | None = None):
    self.tokens_per_step, self.fpt, self.peak = tokens_per_step, fpt, peak
    self.prior = _Attempts(history, start_step)
    self.attempt = self.prior.count
    self.t_start = time.time() if t_start is None else t_start
    self.train_s = 0.0                    # this attempt's seconds in logged training windows
    self.trained_steps = 0
    self.dropped: list[float] = []        # per logged window: MoE moe_dropped_frac (this attempt)
    self.evals = dict(self.prior.evals)
    self.rollbacks: list[dict] = []
    last = self.prior.last_train
    self.final_train_loss = last['loss'] if last and runfiles.finite(last.get('loss')) else None
    self._window: list[dict] = []
    self._recent: collections.deque = collections.deque(maxlen=max(spike_window, 1))
    self._spike_window = spike_window
    self.restart_window(start_step)

  # -- per step
  def restart_window(self, step: int) -> None:
    """Starts a new timing window at `step` (after start-up, an eval, a rollback)."""
    self._window.clear()
    self._window_t, self._window_step = time.time(), step

  def window_mean_loss(self) -> float | None:
    """Mean step loss of the spike window (None until it is full)."""
    if self._spike_window <= 0 or len(self._recent) < self._spike_window:
      return None
    return float(np.mean([loss for _, loss in self._recent]))

  def observe(self, step: int, m: dict) -> None:
    """Step `step`'s fetched metrics (already checked finite)."""
    self._window.append(m)
    self._recent.append((step, float(m['loss'])))

  def forget_after(self, step: int) -> None:
    """A rollback to `step`: later step losses are not history any more."""
    kept = [(s, v) for s, v in self._recent if s <= step]
    self._recent.clear()
    self._recent.extend(kept)
    self.restart_window(step)

  # -- records
  def base(self, step: int) -> dict:
    tokens = step * self.tokens_per_step
    return {'step': step, 'attempt': self.attempt, 'tokens': tokens, 'flops': tokens * self.fpt['exact'],
            'flops_6n': tokens * self.fpt['6N'], 'flops_model': tokens * self.fpt['exact'],
            'flops_executed': tokens * self.fpt.get('executed', self.fpt['exact']),
            'wall_time_s': time.time() - self.t_start}

  def train_record(self, step: int) -> dict:
    """Closes the window ending at `step`: mean loss, throughput, MFU."""
    now = time.time()
    dt = max(now - self._window_t, 1e-9)
    n = max(step - self._window_step, 1)
    tps = n * self.tokens_per_step / dt
    w, last = self._window, self._window[-1]
    rec = {'kind': 'train', **self.base(step), 'loss': float(np.mean([x['loss'] for x in w])),
           'lr': float(last['lr']), 'grad_norm': float(last['grad_norm']), 'tokens_per_s': tps,
           'step_time_s': dt / n, 'window_s': dt, 'mfu': tps * self.fpt['exact'] / self.peak}
    for k in last:
      if k.startswith('moe_'):
        rec[k] = np.mean([x[k] for x in w], axis=0)
    if 'moe_dropped_frac' in rec:
      self.dropped.append(float(rec['moe_dropped_frac']))
    self.train_s += dt
    self.trained_steps += n
    self.final_train_loss = rec['loss']
    self.restart_window(step)
    return rec

  def eval_record(self, step: int, loss: float, bytes_tokenizer: bool) -> dict:
    rec = {'kind': 'eval', **self.base(step), 'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50.0))}
    if bytes_tokenizer:
      rec['eval_bpb'] = loss / math.log(2)
    self.evals[step] = loss
    return rec

  def rollback_record(self, step: int, to_step: int, loss: float, mean: float, skipped: int) -> dict:
    rec = {'kind': 'rollback', **self.base(step), 'to_step': to_step, 'loss': loss, 'window_mean': mean,
           'skipped_batches': skipped}
    self.rollbacks.append({k: rec[k] for k in ('step', 'to_step', 'loss', 'window_mean', 'skipped_batches')})
    self.forget_after(to_step)
    return rec

  def has_eval(self, step: int) -> bool:
    return step in self.evals

  # -- summary
  def summary(self, step: int) -> dict:
    """Fields of summary.json that aggregate all attempts (docs/run_files.md)."""
    tokens = step * self.tokens_per_step
    trained = self.prior.trained_tokens + self.trained_steps * self.tokens_per_step
    train_s = self.prior.train_s + self.train_s
    tps = trained / train_s if train_s > 0 else None
    out = {'step': step, 'tokens': tokens, 'attempts': self.attempt + 1,
           'wall_time_s': self.prior.wall_s + time.time() - self.t_start,
           'tokens_per_s': tps, 'mfu': tps * self.fpt['exact'] / self.peak if tps else None,
           'flops': {'6N': tokens * self.fpt['6N'], 'exact': tokens * self.fpt['exact'],
                     'model': tokens * self.fpt['exact'],
                     'executed': tokens * self.fpt.get('executed', self.fpt['exact'])},
           'rollbacks': self.prior.rollbacks + self.rollbacks}
    if self.final_train_loss is not None:
      out['final_train_loss'] = self.final_train_loss
    if self.evals:
      out['final_eval_loss'] = self.evals[max(self.evals)]
      out['best_eval_loss'] = min(self.evals.values())
    if self.dropped:  # mean over this attempt's logged windows (dropless dispatch: 0)
      out['moe_dropped_frac'] = float(np.mean(self.dropped))
    return out

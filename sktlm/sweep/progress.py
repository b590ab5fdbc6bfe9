"""Live sweep status from the files runs write: a redrawn table on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from sktlm import runfiles
from sktlm.sweep.schedule import fmt_time


def run_view(name: str, status: str, steps: int, run_dir: str, started: float | None) -> dict:
  """One table row: step, losses, throughput and ETA of a run."""
  s = runfiles.read_summary(run_dir) if status in (runfiles.DONE, runfiles.DIVERGED, runfiles.FAILED) else None
  m = runfiles.latest_records(run_dir)
  train, ev = m.get('train', {}), m.get('eval', {})
  step = (s or {}).get('step', train.get('step', 0)) or 0
  loss = (s or {}).get('final_train_loss', train.get('loss'))
  eval_loss = (s or {}).get('final_eval_loss', ev.get('eval_loss'))
  tps = (s or {}).get('tokens_per_s', train.get('tokens_per_s'))
  eta = None
  if status == runfiles.RUNNING and train.get('step_time_s'):
    eta = max(0, steps - step) * train['step_time_s']
  elapsed = (s or {}).get('wall_time_s') if s else (
      time.time() - started if started and status == runfiles.RUNNING else None)
  return dict(name=name, status=status, step=step, steps=steps, loss=loss, eval_loss=eval_loss, tps=tps,
              elapsed=elapsed, eta=eta)


def _num(x, fmt='.3f'):
  return '-' if x is None else format(x, fmt)


def table(views: list[dict], header: str) -> list[str]:
  cols = ['run', 'status', 'step', 'loss', 'eval', 'tok/s', 'time', 'ETA']
  rows = [[v['name'], v['status'], f'{v["step"]}/{v["steps"]}', _num(v['loss']), _num(v['eval_loss']),
           _num(v['tps'], '.0f'), fmt_time(v['elapsed']) if v['elapsed'] is not None else '-',
           fmt_time(v['eta']) if v['eta'] is not None else '-'] for v in views]
  widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
  fmt = lambda cells: '  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                                enumerate(zip(cells, widths, strict=False)))
  return [header, fmt(cols)] + [fmt(r) for r in rows]


class Display:
  """Redraws the table in place on a TTY (at most every `every_s`); prints event lines otherwise."""

  def __init__(self, stream=None, tty: bool | None = None, every_s: float = 1.0, plain_every_s: float = 60.0):
    self.stream = stream or sys.stdout
    self.tty = self.stream.isatty() if tty is None else tty
    self.every_s = every_s if self.tty else plain_every_s
    self._drawn = 0
    self._last = 0.0

  def event(self, text: str):
    if self.tty:
      self._clear()
    print(f'[{time.strftime("%H:%M:%S")}] {text}', file=self.stream, flush=True)
    if self.tty:
      self._drawn = 0

  def update(self, views_fn, header_fn, force: bool = False):
    now = time.time()
    if not force and now - self._last < self.every_s:
      return
    self._last = now
    views = views_fn()
    if self.tty:
      lines = table(views, header_fn())
      self._clear()
      self.stream.write('\n'.join(lines) + '\n')
      self.stream.flush()
      self._drawn = len(lines)
    else:
      running = [v for v in views if v['status'] == runfiles.RUNNING]
      if running or force:
        print(f'[{time.strftime("%H:%M:%S")}] {header_fn()}', file=self.stream)
        for v in running:
          print(f'  {v["name"]}: step {v["step"]}/{v["steps"]} loss {_num(v["loss"])} '
                f'ETA {fmt_time(v["eta"]) if v["eta"] is not None else "-"}', file=self.stream)
        self.stream.flush()

  def final(self, views, header: str):
    if self.tty:
      self._clear()
    print('\n'.join(table(views, header)), file=self.stream, flush=True)
    self._drawn = 0

  def _clear(self):
    if self._drawn:
      self.stream.write(f'\x1b[{self._drawn}F\x1b[J')
      self._drawn = 0

"""Live sweep status from the files runs write: a redrawn table on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import os
import sys
import time

from sktlm.sweep import execute
from sktlm.sweep.schedule import fmt_time


def last_metrics(run_dir: str, max_bytes: int = 65536) -> dict:
  """The latest train and eval records of metrics.jsonl (reads only its tail)."""
  out: dict = {}
  path = os.path.join(run_dir, 'metrics.jsonl')
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - max_bytes))
      lines = f.read().decode('utf-8', errors='replace').splitlines()
  except OSError:
    return out
  for line in reversed(lines):
    try:
      rec = json.loads(line)
    except ValueError:
      continue  # a partial first line of the tail, or a line being written
    kind = rec.get('kind')
    if kind in ('train', 'eval') and kind not in out:
      out[kind] = rec
    if len(out) == 2:
      break
  return out


def run_view(name: str, status: str, steps: int, run_dir: str, started: float | None) -> dict:
  """One table row: step, losses, throughput and ETA of a run."""
  s = execute.summary(run_dir) if status in ('done', 'diverged', 'failed') else None
  m = last_metrics(run_dir)
  train, ev = m.get('train', {}), m.get('eval', {})
  step = (s or {}).get('step', train.get('step', 0)) or 0
  loss = (s or {}).get('final_train_loss', train.get('loss'))
  eval_loss = (s or {}).get('final_eval_loss', ev.get('eval_loss'))
  tps = (s or {}).get('tokens_per_s', train.get('tokens_per_s'))
  eta = None
  if status == 'running' and train.get('step_time_s'):
    eta = max(0, steps - step) * train['step_time_s']
  elapsed = (s or {}).get('wall_time_s') if s else (
      time.time() - started if started and status == 'running' else None)
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
      running = [v for v in views if v['status'] == 'running']
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

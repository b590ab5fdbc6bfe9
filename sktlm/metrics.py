"""Run outputs: metrics.jsonl (one record per logged step), TensorBoard events, a terminal progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True, progress: bool = True, total_steps: int = 0,
               enabled: bool = True):
    """enabled=False (non-leader hosts of a multi-host run): records are dropped, nothing is written."""
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._file = open(self.path, 'a', buffering=1) if enabled else None  # line-buffered: a kill keeps records
    self._tb = None
    if tensorboard and enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
    self._tty = progress and sys.stderr.isatty()
    self.total_steps = total_steps
    self._t0 = time.time()

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: _jsonable(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      prefix = record.get('kind', 'train')
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ('step', 'kind') and math.isfinite(v):
          self._tb.add_scalar(f'{prefix}/{k}', v, record['step'])
    self._show(record)

  def _show(self, r: dict) -> None:
    if r.get('kind') == 'eval':
      line = f"step {r['step']:>7}  eval_loss {r['eval_loss']:.4f}"
      if 'eval_bpb' in r:
        line += f"  bpb {r['eval_bpb']:.4f}"
    else:
      frac = r['step'] / max(self.total_steps, 1)
      elapsed = time.time() - self._t0
      eta = elapsed / max(frac, 1e-9) * (1 - frac) if frac > 0 else float('nan')
      line = (f"step {r['step']:>7}/{self.total_steps} ({100 * frac:5.1f}%)  loss {r['loss']:.4f}  "
              f"lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s  mfu {100 * r['mfu']:.1f}%  eta {eta:,.0f}s")
    if self._tty:
      end = '\n' if r.get('kind') == 'eval' else ''
      print('\r\033[K' + line, end=end, file=sys.stderr, flush=True)
    else:
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._tty:
      print(file=sys.stderr)
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if hasattr(v, 'tolist'):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def write_json(path: str, obj: dict) -> None:
  """Atomic JSON write: readers never see a half-written file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
    f.write('\n')
  os.replace(tmp, path)

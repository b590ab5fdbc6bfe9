"""Which points the fits see: repeated seeds averaged per configuration, the best configuration per N, the
compute frontier.

Runs that differ only in their seed (`sweep('config.seed', [...])`) are one configuration: the fits use the
mean of its losses (N, D and C are the configuration's, averaged in case they differ by rounding) and the
report shows their spread. So a bootstrap that resamples fitted points resamples sizes, never single seeds.
"""

from __future__ import annotations

import json
import math

import numpy as np

from sktlm.scaling import io

STANDARD = ('index', 'name', 'N', 'D', 'C', 'loss', 'budget')


def _is_seed(key: str) -> bool:
  return str(key).split('.')[-1] == 'seed'


def config_groups(rows: list[dict], index: np.ndarray) -> list[list[int]]:
  """Groups of positions into `index` (the selected runs' row numbers) that differ only in the seed.

  Runs are grouped only when their overrides name a seed (results.csv of a seed sweep); without one each
  run is its own configuration.
  """
  groups: dict[str, list[int]] = {}
  for j, i in enumerate(index):
    ov = rows[int(i)].get('overrides') or {}
    if any(_is_seed(k) for k in ov):
      key = json.dumps({k: v for k, v in ov.items() if not _is_seed(k)}, sort_keys=True, default=str)
    else:
      key = f'run:{j}'
    groups.setdefault(key, []).append(j)
  return list(groups.values())


def with_row_columns(data: dict, rows: list[dict], columns: dict) -> dict:
  """io.select's arrays plus the results columns laws read beyond N, D, C ({point column: results column}),
  as floats (nan where a row lacks one)."""
  out = dict(data)
  for col, row_col in columns.items():
    out[col] = np.array([io._float(rows[int(i)].get(row_col)) for i in data['index']], dtype=np.float64)  # noqa: SLF001
  return out


def aggregate(data: dict, rows: list[dict]) -> dict:
  """Per-configuration points from io.select's per-run arrays: N, D, C (and any further columns of
  `with_row_columns`), loss (seed mean), loss_std (sample standard deviation over seeds, 0 for one), loss_min,
  loss_max, n_seeds, members (positions into data), name (the first run's name), budget."""
  groups = config_groups(rows, data['index'])
  sizes = ('N', 'D', 'C') + tuple(k for k in data if k not in STANDARD)
  out: dict = {k: [] for k in sizes + ('loss', 'loss_std', 'loss_min', 'loss_max', 'n_seeds', 'budget')}
  out['members'], out['name'] = [], []
  for g in groups:
    loss = data['loss'][g]
    for k in sizes:
      v = data[k][g]
      if np.all(v == v[0]) or not np.all(v > 0):
        out[k].append(float(v[0]) if np.all(v == v[0]) else math.nan)
      else:
        out[k].append(float(np.exp(np.mean(np.log(v)))))
    out['loss'].append(float(loss.mean()))
    out['loss_std'].append(float(loss.std(ddof=1)) if len(g) > 1 else 0.0)
    out['loss_min'].append(float(loss.min()))
    out['loss_max'].append(float(loss.max()))
    out['n_seeds'].append(len(g))
    out['budget'].append(float(data['budget'][g[0]]))
    out['members'].append(list(g))
    out['name'].append(str(data['name'][g[0]]) + (f' (+{len(g) - 1} seeds)' if len(g) > 1 else ''))
  for k in sizes + ('loss', 'loss_std', 'loss_min', 'loss_max', 'budget'):
    out[k] = np.array(out[k], dtype=np.float64)
  out['n_seeds'] = np.array(out['n_seeds'], dtype=int)
  return out


def best_per_x(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  xs = np.unique(x)
  return xs, np.array([loss[x == v].min() for v in xs])


def best_index_per_x(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
  """Index of the lowest loss at each distinct x, in increasing x."""
  return np.array([np.flatnonzero(x == v)[np.argmin(loss[x == v])] for v in np.unique(x)], dtype=int)


def frontier_index(c: np.ndarray, loss: np.ndarray) -> np.ndarray:
  """Indices of the points with a lower loss than every point using less compute, in increasing C."""
  keep, best = [], math.inf
  for i in np.lexsort((loss, c)):
    if loss[i] < best:
      keep.append(i)
      best = loss[i]
  return np.array(keep, dtype=int)


def frontier_points(c: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  keep = frontier_index(c, loss)
  return c[keep], loss[keep]


def frontier_range(agg: dict | None) -> tuple[float, float] | None:
  """(lowest, highest C) of the compute frontier of aggregated points, or None without compute."""
  if agg is None or not (agg['C'] > 0).any():
    return None
  ok = np.flatnonzero(agg['C'] > 0)
  c = agg['C'][ok[frontier_index(agg['C'][ok], agg['loss'][ok])]]
  return float(c.min()), float(c.max())

"""Random-kill soak (slow): a small sweep of real `sktlm train` runs is SIGKILLed at random points several
times (its training processes, the sweep process, or both, including during start-up) and rerun; at the end
every run is in results.csv exactly once, done, with a complete summary, and its final parameters, optimizer
state and data position are bit-identical to an uninterrupted sweep's.

Kill points are random steps (seeded), reached by reading the runs' metrics.jsonl: the test synchronises on
files, never on timing. Figures (kills by kind, wall time) are printed (`pytest -s`)."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sktlm import sharding
from sktlm.config import load
from sktlm.runfiles import summary_problems
from sktlm.train import resolve, step
from sktlm.train.checkpoint import Checkpointer
from tests.conftest import ROOT

STEPS = 24
BASE = str(ROOT / 'experiments' / 'lm.py') + ':size=pico,runlocal'
COMMON = {'config.train.steps': STEPS, 'config.train.checkpoint_every': 3, 'config.train.eval_every': 8,
          'config.train.log_every': 1, 'config.metrics.tensorboard': False, 'config.metrics.progress': False,
          'config.metrics.peak_flops': 1e11,
          'config.train.compile_cache': 'off'}  # every start compiles: start-up kills land, runs last long enough
RUNS = ('seed-1', 'seed-2')
KILLS = 12


def _sweep_file(tmp_path, data_dir):
  p = tmp_path / 's.py'
  common = dict(COMMON, **{'config.data.data_dir': data_dir})
  p.write_text(f'BASE = {BASE!r}\nCOMMON = {common!r}\n'
               "def get_sweep(arg):\n  return [{'config.seed': 1}, {'config.seed': 2}]\n")
  return str(p)


def _env():
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device per run


def _start(sweep_file, workdir, log):
  return subprocess.Popen([sys.executable, '-m', 'sktlm.cli', 'sweep', sweep_file, f'--workdir={workdir}',
                           '--parallel=2'], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _step(run_dir):
  try:
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'rb') as f:
      lines = f.read().splitlines()
  except OSError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)['step'])
    except (ValueError, KeyError):
      continue
  return 0


def _train_pid(run_dir, sweep_pid):
  try:
    info = json.load(open(os.path.join(run_dir, 'sweep.lock')))
  except (OSError, ValueError):
    return None
  pid = info.get('pid')
  return pid if pid and pid != sweep_pid else None


def _done(run_dir):
  try:
    s = json.load(open(os.path.join(run_dir, 'summary.json')))
  except (OSError, ValueError):
    return False
  return s.get('status') == 'done' and not summary_problems(s)


def _final_state(run_dir):
  mc = json.load(open(os.path.join(run_dir, 'config.json')))['model']
  config = load.load_config(BASE, {'model.vocab_size': mc['vocab_size']})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  ck = Checkpointer(os.path.join(run_dir, 'checkpoints'), read_only=True, async_save=False)
  state, data_state = ck.restore(STEPS, setup.abstract_state)
  ck.close()
  return [np.asarray(x) for x in jax.tree.leaves(state)], data_state


@pytest.mark.slow
def test_random_kill_soak(tmp_path, data_dir):
  sweep_file = _sweep_file(tmp_path, data_dir)
  ref = tmp_path / 'ref'
  with open(tmp_path / 'ref.log', 'w') as log:
    assert _start(sweep_file, ref, log).wait(timeout=1200) == 0, (tmp_path / 'ref.log').read_text()[-3000:]

  rng = random.Random(14)
  w = tmp_path / 'soak'
  kills = {'train': 0, 'sweep': 0, 'both': 0, 'start-up': 0}
  t0 = time.time()
  with open(tmp_path / 'soak.log', 'w') as log:
    sweep = None
    for _ in range(KILLS):
      todo = [n for n in RUNS if not _done(w / n)]
      if not todo:
        break
      if sweep is None or sweep.poll() is not None:
        sweep = _start(sweep_file, w, log)
      name = rng.choice(todo)
      run_dir = w / name
      kind = rng.choice(['train', 'sweep', 'both', 'start-up'])
      target = _step(run_dir) + rng.randint(1, 4)
      pid = None
      while sweep.poll() is None:  # until the kill point (read from the run's files), or the sweep ends
        pid = _train_pid(run_dir, sweep.pid)
        if pid and (kind == 'start-up' or _step(run_dir) >= target):
          break
        time.sleep(0.02)
      if sweep.poll() is not None or _done(run_dir):
        continue
      if kind in ('train', 'both', 'start-up'):
        os.kill(pid, signal.SIGKILL)  # a training process: the sweep records it failed and goes on
      if kind in ('sweep', 'both'):
        sweep.kill()  # the sweep: its training processes live on as orphans, the next sweep waits for them
        sweep.wait()
      kills[kind] += 1
    if sweep is not None and sweep.poll() is None:
      sweep.wait(timeout=1200)
    sweep = _start(sweep_file, w, log)
    rc = sweep.wait(timeout=1200)
  elapsed = time.time() - t0
  print(f'\nsoak: {sum(kills.values())} kills {kills} in {elapsed:.0f}s (reference sweep not included)')
  assert rc == 0, (tmp_path / 'soak.log').read_text()[-4000:]
  assert sum(kills.values()) >= 6

  rows = list(csv.DictReader(open(w / 'results.csv')))
  assert sorted(r['name'] for r in rows) == sorted(RUNS) and all(r['status'] == 'done' for r in rows)
  for name in RUNS:
    s = json.load(open(w / name / 'summary.json'))
    assert s['status'] == 'done' and summary_problems(s) == [], s
    got, got_data = _final_state(w / name)
    want, want_data = _final_state(ref / name)
    assert got_data == want_data
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a, b)
    assert not (w / name / 'sweep.lock').exists()
    assert not [n for n in os.listdir(w / name / 'checkpoints') if 'orbax-checkpoint-tmp' in n]

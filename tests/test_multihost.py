"""Multi-host training for real: two `sktlm train` processes x 4 CPU devices each, joined by
jax.distributed (gloo collectives), each feeding only its half of every global batch. The losses must equal
a single process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import ROOT, run_cli


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def losses(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return np.array([r['loss'] for r in map(json.loads, f) if r['kind'] == 'train'])


def test_two_processes_match_one(data_dir, tmp_path):
  common = ['train', '--config=experiments/lm.py:size=pico', f'--config.data.data_dir={data_dir}',
            '--config.data.seq_len=64', '--config.train.batch_size=8', '--config.train.steps=6',
            '--config.train.log_every=1', '--config.train.eval_batches=1', '--config.train.eval_every=6',
            '--config.metrics.tensorboard=False', '--config.mesh.data=2', '--config.mesh.fsdp=2',
            '--config.mesh.tensor=2']
  single = tmp_path / 'single'
  r = run_cli(*common, f'--workdir={single}')
  assert r.returncode == 0, r.stderr[-2000:]

  multi = tmp_path / 'multi'
  port = free_port()
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}

  procs = []
  for pid in range(2):
    args = [*common, f'--workdir={multi}', '--config.distributed.initialize=True',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2', f'--config.distributed.process_id={pid}']
    procs.append(subprocess.Popen([sys.executable, '-m', 'sktlm.cli', *args], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env}))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert 'done: step 6' in outs[0][0] and 'done' not in outs[1][0]  # only the leader reports
  a, b = losses(single), losses(multi)
  assert len(a) == len(b) == 6  # one metrics record per step: only process 0 writes
  np.testing.assert_allclose(b, a, rtol=2e-5)

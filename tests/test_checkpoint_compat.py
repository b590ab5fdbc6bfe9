"""A run written by an older sktlm resumes under today's code on the same trajectory.

tests/data/run_v0_pico/ is a pico run written by sktlm 43ec6ba (before the package layout move): its config.json,
tokenizer, metrics up to step 4 and the Orbax checkpoint of step 4 of an 8-step run. The expected losses of
steps 5-8 are that code's own uninterrupted 8-step run (tests/data/run_v0_pico_expected.json). Resuming it here
must restore the state and the data position and reproduce them; a fresh start or a wrong optimizer state
misses by > 0.05 in loss.
"""

import json
import pathlib
import shutil

from conftest import run_cli

DATA = pathlib.Path(__file__).parent / 'data'
RTOL = 1e-5  # float32 losses: identical on the machine that wrote them; room for another CPU's summation order


def test_run_written_before_the_layout_move_resumes_identically(tmp_path, data_dir):
  wd = tmp_path / 'run'
  shutil.copytree(DATA / 'run_v0_pico', wd)
  expected = json.loads((DATA / 'run_v0_pico_expected.json').read_text())
  # the flags that run was started with, but for the data folder (a harmless change on restart)
  flags = ['--config=experiments/lm.py:size=pico', f'--config.data.data_dir={data_dir}', '--config.data.seq_len=64',
           '--config.train.batch_size=8', '--config.train.eval_every=1000', '--config.metrics.progress=False',
           '--config.metrics.tensorboard=False', '--config.optim.warmup_steps=2', '--config.train.log_every=1',
           '--config.train.checkpoint_every=4', '--config.train.steps=8']
  r = run_cli('train', f'--workdir={wd}', *flags, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'resumed from step 4' in r.stderr + r.stdout
  rows = [json.loads(line) for line in (wd / 'metrics.jsonl').read_text().splitlines()]
  train = {str(x['step']): x['loss'] for x in rows if x['kind'] == 'train' and x['step'] > 4}
  evals = {str(x['step']): x['eval_loss'] for x in rows if x['kind'] == 'eval'}
  assert sorted(train) == sorted(expected['train_loss'])
  for step, want in expected['train_loss'].items():
    assert abs(train[step] - want) <= RTOL * abs(want), (step, train[step], want)
  assert abs(evals['8'] - expected['eval_loss']['8']) <= RTOL * expected['eval_loss']['8']

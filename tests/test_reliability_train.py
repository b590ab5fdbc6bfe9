"""Nothing lost, nothing hung, nothing silent (issue 14), for `sktlm train`: a finished run keeps its results,
a kill before the summary is repaired by the rerun, a bad start leaves the workdir as it was, a non-finite
step never reaches a checkpoint, summaries cover every attempt, and the loss-spike rollback.

Faults are injected for real: a NaN in the backward pass (a custom_vjp on the logits of one chosen batch), a
loss spike on one chosen batch, SIGKILL of a real `sktlm train` process at the instant after its final
checkpoint (a driver that kills itself in place of writing summary.json)."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_cli, train_config

from sktlm import data
from sktlm.errors import UserError
from sktlm.train import loop, resolve, step
from sktlm.train.checkpoint import Checkpointer

QUIET = {'train.log_every': 1, 'metrics.peak_flops': 1e11, 'train.eval_batches': 1}


def cfg(data_dir, **over):
  return train_config(data_dir, **{**QUIET, **over})


def records(workdir, kind=None):
  recs = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in recs if kind is None or r['kind'] == kind]


def snapshot(folder):
  """Every file's bytes (hashed) and every folder: what `byte-identical` means here."""
  out = {}
  for root, dirs, names in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder)] = 'dir'
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
  return out


def all_tensors(workdir, at_step, config):
  from sktlm import sharding
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh, data.get_tokenizer(config.data))
  setup = step.build(config, mesh)
  ck = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True, async_save=False)
  state, _ = ck.restore(at_step, setup.abstract_state)
  ck.close()
  return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope='module')
def two_attempts(data_dir, tmp_path_factory):
  """A run started with two typos (refused, nothing written), then trained in two attempts: 6 steps, then
  on to 9 with a learning rate so high that its last eval is the worst, so the best eval is attempt 1's."""
  wd = str(tmp_path_factory.mktemp('run') / 'w')
  for typo in ({'data.name': 'text_files', 'data.path': '/nonexistent/corpus'}, {'data.seq_len': 1}):
    with pytest.raises(UserError):
      loop.run(cfg(data_dir, **typo), wd)
    assert not os.path.exists(wd)  # on main: config.json was written, and the corrected start was refused
  over = {'train.steps': 6, 'train.checkpoint_every': 3, 'train.eval_every': 3}
  assert loop.run(cfg(data_dir, **over), wd) == 0
  first = json.load(open(os.path.join(wd, 'summary.json')))
  over.update({'train.steps': 9, 'optim.peak_lr': 30.0, 'optim.warmup_steps': 0})
  assert loop.run(cfg(data_dir, **over), wd) == 0
  return wd, over, first


def test_summary_aggregates_every_attempt(two_attempts):
  wd, _, first = two_attempts
  s = json.load(open(os.path.join(wd, 'summary.json')))
  evals = records(wd, 'eval')
  assert [(e['step'], e['attempt']) for e in evals] == [(3, 0), (6, 0), (9, 1)]
  assert evals[-1]['eval_loss'] > min(e['eval_loss'] for e in evals[:2])  # attempt 2 made it worse
  assert s['best_eval_loss'] == min(e['eval_loss'] for e in evals) == first['best_eval_loss']
  assert s['final_eval_loss'] == evals[-1]['eval_loss'] and s['attempts'] == 2
  train_recs = records(wd, 'train')
  walls = {a: max(r['wall_time_s'] for r in train_recs + evals if r['attempt'] == a) for a in (0, 1)}
  assert s['wall_time_s'] >= walls[0] + walls[1]
  # tokens/s over the training windows of both attempts, from the records (an independent sum).
  trained = sum(r['tokens_per_s'] * r['window_s'] for r in train_recs)
  assert trained == pytest.approx(9 * 8 * 64)
  assert s['tokens_per_s'] == pytest.approx(trained / sum(r['window_s'] for r in train_recs), rel=1e-9)
  assert s['mfu'] == pytest.approx(s['tokens_per_s'] * s['flops_per_token']['exact'] / s['peak_flops'])
  # The FLOP fields the scaling stream reads.
  last = train_recs[-1]
  assert last['flops_model'] == last['flops'] == pytest.approx(9 * 8 * 64 * s['flops_per_token']['exact'])
  assert last['flops_executed'] == pytest.approx(9 * 8 * 64 * s['flops_per_token'].get(
      'executed', s['flops_per_token']['exact']))
  assert s['flops']['model'] == s['flops']['exact'] and s['flops']['6N'] == last['flops_6n']


def test_rerun_keeps_a_finished_summary_and_completes_a_missing_one(two_attempts, data_dir):
  wd, over, _ = two_attempts
  before = snapshot(wd)
  assert loop.run(cfg(data_dir, **over), wd) == 0  # finished: nothing is retrained or rewritten
  assert snapshot(wd) == before
  # The summary is gone (what a kill between the final checkpoint and the summary leaves): the rerun
  # rebuilds a complete one from the records, without training.
  full = json.load(open(os.path.join(wd, 'summary.json')))
  os.unlink(os.path.join(wd, 'summary.json'))
  assert loop.run(cfg(data_dir, **over), wd) == 0
  s = json.load(open(os.path.join(wd, 'summary.json')))
  for k in ('status', 'step', 'final_train_loss', 'final_eval_loss', 'best_eval_loss', 'tokens', 'flops'):
    assert s[k] == full[k], k
  assert records(wd)[-1]['step'] == 9


@pytest.mark.parametrize('over, expect', [
    ({'train.steps': 0}, 'train.steps must be >= 1'),
    ({'train.steps': -3}, 'train.steps must be >= 1'),
    ({'train.steps': 5}, 'checkpoint at step 9, past train.steps=5'),
    ({'train.checkpoint_every': 0}, 'train.checkpoint_every'),
    ({'train.log_every': 0}, 'train.log_every'),
    ({'train.eval_every': 0}, 'train.eval_every'),
    ({'model.d_model': -64}, 'model.d_model'),
    ({'model.d_model': 128}, 'incompatible config'),
    ({'data.seq_len': 1}, 'data.seq_len'),
])
def test_bad_input_on_a_finished_run_leaves_it_byte_identical(two_attempts, data_dir, over, expect):
  wd, base, _ = two_attempts
  before = snapshot(wd)
  with pytest.raises(UserError, match=expect):
    loop.run(cfg(data_dir, **{**base, **over}), wd)
  assert snapshot(wd) == before


def test_workdir_that_is_a_file_is_refused(data_dir, tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  for wd in (f, f / 'below'):
    with pytest.raises(UserError, match='is a file|which is a file'):
      loop.run(cfg(data_dir), str(wd))
  assert f.read_text() == 'x'


def _poisoned_cross_entropy(monkeypatch, config, bad_step, mode):
  """train.cross_entropy, but on the batch of step `bad_step` (1-based) the backward pass returns NaN
  (mode 'nan') or the loss is 100x (mode 'spike')."""
  it = data.make_train_iter(config.data, batch_size=config.train.batch_size, seed=config.seed)
  for _ in range(bad_step - 1):
    next(it)
  bad_targets = jnp.asarray(next(it)['targets'])
  orig = step.cross_entropy

  @jax.custom_vjp
  def nan_grad(x, flag):
    return x

  def fwd(x, flag):
    return x, flag

  def bwd(flag, g):
    return jnp.where(flag > 0, jnp.nan, 1.0) * g, jnp.zeros_like(flag)

  nan_grad.defvjp(fwd, bwd)

  def cross_entropy(logits, targets, weights):
    if targets.shape != bad_targets.shape:
      return orig(logits, targets, weights)
    flag = jnp.all(targets == bad_targets).astype(jnp.float32)
    if mode == 'nan':
      return orig(nan_grad(logits, flag), targets, weights)
    ce, z = orig(logits, targets, weights)
    return ce * (1.0 + 99.0 * flag), z

  monkeypatch.setattr(step, 'cross_entropy', cross_entropy)


def test_nan_in_the_backward_pass_never_reaches_a_checkpoint(data_dir, tmp_path, monkeypatch):
  config = cfg(data_dir, **{'train.steps': 6, 'train.checkpoint_every': 1, 'train.eval_every': 1000,
                            'train.async_checkpoint': False})
  _poisoned_cross_entropy(monkeypatch, config, bad_step=5, mode='nan')
  with pytest.raises(UserError, match='not finite at step 5.*last good checkpoint kept: step 4'):
    loop.run(config, str(tmp_path))
  steps = Checkpointer(str(tmp_path / 'checkpoints'), read_only=True, async_save=False).all_steps()
  assert steps[-1] == 4  # on main: step 5 (NaN params) was saved, the run stopped at step 6
  tensors = all_tensors(str(tmp_path), 4, cfg(data_dir))
  assert tensors and all(np.isfinite(t).all() for t in tensors if t.dtype.kind == 'f')
  s = json.load(open(tmp_path / 'summary.json'))
  assert s['status'] == 'diverged' and 'step 5' in s['message']


@pytest.mark.slow
def test_loss_spike_rolls_back_and_skips_the_batches(data_dir, tmp_path, monkeypatch):
  config = cfg(data_dir, **{'train.steps': 12, 'train.checkpoint_every': 4, 'train.eval_every': 1000,
                            'train.spike_factor': 3.0, 'train.spike_window': 4})
  _poisoned_cross_entropy(monkeypatch, config, bad_step=10, mode='spike')
  assert loop.run(config, str(tmp_path)) == 0
  rb = records(str(tmp_path), 'rollback')
  assert len(rb) == 1  # the poisoned batch was skipped, never trained on again
  assert (rb[0]['step'], rb[0]['to_step'], rb[0]['skipped_batches']) == (10, 8, 2)
  assert rb[0]['loss'] > 3.0 * rb[0]['window_mean']
  train_recs = {r['step']: r for r in records(str(tmp_path), 'train')}  # last record per step
  assert sorted(train_recs) == list(range(1, 13)) and max(r['loss'] for r in train_recs.values()) < 10
  s = json.load(open(tmp_path / 'summary.json'))
  assert s['status'] == 'done' and s['step'] == 12
  assert s['rollbacks'] == [{k: rb[0][k] for k in ('step', 'to_step', 'loss', 'window_mean', 'skipped_batches')}]


def _train_args(data_dir, workdir, steps):
  return ['train', '--config=experiments/lm.py:size=pico', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.data.seq_len=64', '--config.train.batch_size=8',
          f'--config.train.steps={steps}', '--config.train.checkpoint_every=5', '--config.train.eval_every=5',
          '--config.train.log_every=1', '--config.metrics.tensorboard=False', '--config.metrics.peak_flops=1e11',
          '--config.train.eval_batches=1']


KILL_BEFORE_SUMMARY = r'''
import os, signal, sys
from sktlm import runfiles
orig = runfiles.write_summary
def write_summary(workdir, summary):
  if summary.get('status') == 'done':
    os.kill(os.getpid(), signal.SIGKILL)  # the instant after the final checkpoint, before the summary
  orig(workdir, summary)
runfiles.write_summary = write_summary
from sktlm import cli
cli.main(['sktlm'] + sys.argv[1:])
'''


@pytest.mark.slow
def test_sigkill_after_the_final_checkpoint_then_rerun_gives_a_complete_summary(data_dir, tmp_path):
  driver = tmp_path / 'driver.py'
  driver.write_text(KILL_BEFORE_SUMMARY)
  wd = tmp_path / 'w'
  r = subprocess.run([sys.executable, str(driver), *_train_args(data_dir, wd, 10)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == -9, r.stderr[-2000:]
  assert not (wd / 'summary.json').exists() and (wd / 'checkpoints' / '10').is_dir()
  r = run_cli(*_train_args(data_dir, wd, 10))
  assert r.returncode == 0, r.stderr[-2000:]
  s = json.load(open(wd / 'summary.json'))
  last_train, evals = records(wd, 'train')[-1], records(wd, 'eval')
  assert s['status'] == 'done' and s['step'] == 10 and s['attempts'] == 2
  assert s['final_train_loss'] == last_train['loss'] and last_train['attempt'] == 0  # not retrained
  assert s['final_eval_loss'] == evals[-1]['eval_loss'] and s['best_eval_loss'] == min(e['eval_loss'] for e in evals)
  # Rerunning the finished run keeps its summary byte for byte; steps <= 0 is one clear line, exit 2.
  before = snapshot(wd)
  r = run_cli(*_train_args(data_dir, wd, 10))
  assert r.returncode == 0 and 'already finished' in r.stdout and snapshot(wd) == before
  for bad in ('0', '-1'):
    r = run_cli(*_train_args(data_dir, wd, bad))
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(err) == 1 and 'train.steps must be >= 1' in err[0], r.stderr
  assert snapshot(wd) == before

"""The training spine end to end: loss falls on the real corpus, mesh equivalence, exact resume
(restart, SIGTERM, SIGKILL), grad accumulation, resharding on restore, divergence and bad-input errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, run_cli, run_steps, train_config

from sktlm import data, runfiles, sharding
from sktlm.config import load
from sktlm.train import loop, resolve, step
from sktlm.train.checkpoint import Checkpointer


def cfg(data_dir, **over):
  return train_config(data_dir, **over)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_loss_falls_on_the_embedded_corpus(data_dir, tmp_path):
  config = cfg(data_dir, **{'train.steps': 80, 'train.eval_every': 40, 'optim.peak_lr': 3e-3})
  assert loop.run(config, str(tmp_path)) == 0
  recs = read_jsonl(tmp_path / 'metrics.jsonl')
  train_losses = [r['loss'] for r in recs if r['kind'] == 'train']
  evals = [r['eval_loss'] for r in recs if r['kind'] == 'eval']
  assert train_losses[0] > 5.0  # ~ln(384) at init
  assert train_losses[-1] < 3.3, train_losses
  assert evals[-1] < evals[0] < 5.0
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['status'] == 'done' and summary['step'] == 80
  assert set(runfiles.ALWAYS) <= set(summary) <= set(runfiles.SUMMARY_FIELDS)  # the documented fields only
  assert summary['tokens'] == 80 * 8 * 64
  assert summary['best_eval_loss'] == min(evals)
  last = [r for r in recs if r['kind'] == 'train'][-1]
  for key in ('tokens', 'lr', 'grad_norm', 'tokens_per_s', 'step_time_s', 'mfu', 'flops', 'flops_6n'):
    assert np.isfinite(last[key]), key
  assert last['flops'] == pytest.approx(80 * 8 * 64 * summary['flops_per_token']['exact'])
  assert 0 < last['mfu'] < 1


def losses_of(config, mesh, steps):
  metrics, state, setup = run_steps(config, mesh, steps)
  return np.array([float(m['loss']) for m in metrics]), state, setup


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_same_losses_on_one_device_and_on_mesh_shapes(data_dir, shape):
  config = cfg(data_dir, **{'optim.peak_lr': 1e-2, 'model.attention_block': 16})  # 4 query blocks
  resolve.vocab(config, data.get_tokenizer(config.data))
  one = sharding.make_mesh(load.load_config('experiments/lm.py', {}).mesh, devices=jax.devices()[:1])
  ref, _, _ = losses_of(config, one, 4)
  d, f, t = shape
  config.mesh.update(dict(data=d, fsdp=f, expert=1, tensor=t))
  mesh = sharding.make_mesh(config.mesh)
  losses, state, setup = losses_of(config, mesh, 4)
  # Different partitioning changes float32 summation order only: agree to ~1e-5 relative.
  np.testing.assert_allclose(losses, ref, rtol=2e-5)
  assert losses[-1] < losses[0]
  # Output shardings are the ones asked for by the logical rules.
  wq = state.params['layers']['attn']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)  # [layers, D, H, K]
  assert wq.sharding.mesh.shape == mesh.shape
  wi = state.params['layers']['mlp']['wi_gate']
  shard_shape = wi.sharding.shard_shape(wi.shape)
  assert shard_shape == (wi.shape[0], wi.shape[1] // f, wi.shape[2] // t)
  mu = state.opt_state[1][0].mu['layers']['mlp']['wi_gate']  # chain(clip, adamw): Adam's first moment
  assert mu.sharding.spec == wi.sharding.spec


def test_bfloat16_same_losses_on_one_device_and_on_a_mesh(data_dir):
  """bfloat16 compute (row-major transposes, float32 accumulation) partitions like float32 does."""
  config = cfg(data_dir, **{'optim.peak_lr': 1e-2, 'model.dtype': 'bfloat16', 'model.attention_block': 16})
  resolve.vocab(config, data.get_tokenizer(config.data))
  one = sharding.make_mesh(load.load_config('experiments/lm.py', {}).mesh, devices=jax.devices()[:1])
  ref, _, _ = losses_of(config, one, 4)
  config.mesh.update(dict(data=2, fsdp=2, expert=1, tensor=2))
  losses, _, _ = losses_of(config, sharding.make_mesh(config.mesh), 4)
  # bf16 roundings differ with the summation order: agree to bf16 precision, and learn.
  np.testing.assert_allclose(losses, ref, rtol=1e-2)
  assert losses[-1] < losses[0]


def test_grad_accumulation_matches_one_big_batch(data_dir):
  config = cfg(data_dir, **{'train.batch_size': 16})
  resolve.vocab(config, data.get_tokenizer(config.data))
  mesh = sharding.make_mesh(config.mesh)
  l1, s1, _ = losses_of(config, mesh, 3)
  config.train.grad_accum = 2
  l2, s2, _ = losses_of(config, mesh, 3)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def final_params(workdir, at_step, **over):
  config = load.load_config('experiments/lm.py:size=pico',
                               {'model.vocab_size': json.load(open(os.path.join(workdir, 'config.json')))
                                ['model']['vocab_size'], 'data.seq_len': 64, **over})
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True, async_save=False)
  state, data_state = ckpt.restore(at_step, setup.abstract_state)
  ckpt.close()
  return state, data_state


def train_args(data_dir, workdir, steps, **over):
  args = ['train', '--config=experiments/lm.py:size=pico', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.data.seq_len=64', '--config.train.batch_size=8',
          f'--config.train.steps={steps}', '--config.train.checkpoint_every=10', '--config.train.eval_every=1000',
          '--config.train.log_every=1', '--config.metrics.tensorboard=False']
  return args + [f'--config.{k}={v}' for k, v in over.items()]


def wait_for_checkpoint(proc, workdir, min_step, timeout=300):
  """Polls until a checkpoint at or past `min_step` exists in `workdir` (or the process ended)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    ck = workdir / 'checkpoints'
    if ck.exists() and any(p.name.isdigit() and int(p.name) >= min_step for p in ck.iterdir()):
      return
    time.sleep(0.02)


def assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_sigterm_and_sigkill_is_exact(data_dir, tmp_path):
  steps = 150
  straight = tmp_path / 'straight'
  r = run_cli(*train_args(data_dir, straight, steps))
  assert r.returncode == 0, r.stderr[-2000:]
  ref, ref_data = final_params(str(straight), steps)

  for sig in (signal.SIGTERM, signal.SIGKILL):
    wd = tmp_path / f'interrupted_{sig.name}'
    err_path = tmp_path / f'{sig.name}.stderr'
    with open(err_path, 'w') as err:
      proc = subprocess.Popen([sys.executable, '-m', 'sktlm.cli', *train_args(data_dir, wd, steps)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=err)
    wait_for_checkpoint(proc, wd, 20)  # interrupt once training is past step 20 and still going
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    assert rc == (loop.PREEMPTED_EXIT_CODE if sig == signal.SIGTERM else -9), (rc, err_path.read_text()[-3000:])
    if sig == signal.SIGTERM:
      summary = json.loads((wd / 'summary.json').read_text())
      assert summary['status'] == 'preempted' and summary['step'] < steps
    r = run_cli(*train_args(data_dir, wd, steps))
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'resumed from step' in r.stdout
    got, got_data = final_params(str(wd), steps)
    assert_same_state(ref, got)
    assert got_data == ref_data


def test_sigterm_right_after_a_periodic_save_still_exits_preempted(data_dir, tmp_path):
  """With a checkpoint every step, SIGTERM always lands after the current step's save: the preemption path
  must not save that step again (Orbax refuses: StepAlreadyExistsError, which used to exit 1)."""
  wd = tmp_path / 'run'
  args = train_args(data_dir, wd, 500, **{'train.checkpoint_every': 1})
  with open(tmp_path / 'stderr', 'w') as err:
    proc = subprocess.Popen([sys.executable, '-m', 'sktlm.cli', *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=err)
  wait_for_checkpoint(proc, wd, 5)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=120)
  assert rc == loop.PREEMPTED_EXIT_CODE, (rc, (tmp_path / 'stderr').read_text()[-3000:])
  summary = json.loads((wd / 'summary.json').read_text())
  assert summary['status'] == 'preempted' and summary['step'] < 500


def test_restore_onto_a_different_mesh(data_dir, tmp_path):
  config = cfg(data_dir, **{'train.steps': 10, 'train.checkpoint_every': 10, 'mesh.data': 8})
  assert loop.run(config, str(tmp_path)) == 0
  config2 = cfg(data_dir, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  mesh = sharding.make_mesh(config2.mesh)
  resolve.resolve(config2, mesh, data.get_tokenizer(config2.data))
  setup = step.build(config2, mesh)
  ck = Checkpointer(str(tmp_path / 'checkpoints'), read_only=True, async_save=False)
  state, _ = ck.restore(10, setup.abstract_state)
  ref, _ = final_params(str(tmp_path), 10)
  assert_same_state(ref, state)
  wi = state.params['layers']['mlp']['wi_gate']
  assert wi.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')


def test_non_finite_loss_stops_with_a_clear_error(data_dir, tmp_path):
  # A checkpoint every step: the kept one must hold finite tensors only (the exact fault, a NaN gradient
  # under a finite loss, is injected in test_reliability_train.py).
  r = run_cli(*train_args(data_dir, tmp_path, 40, **{'optim.peak_lr': 1e30, 'optim.warmup_steps': 0,
                                                     'optim.clip_norm': 0.0, 'optim.weight_decay': 0.0,
                                                     'train.checkpoint_every': 1}))
  assert r.returncode == 2
  line = r.stderr.strip().splitlines()[-1]
  assert 'not finite' in line and 'at step' in line and 'Traceback' not in r.stderr
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['status'] == 'diverged'
  kept = int(summary['message'].rsplit('last good checkpoint kept: step ', 1)[1])
  state, _ = final_params(str(tmp_path), kept, **{'optim.clip_norm': 0.0, 'optim.weight_decay': 0.0})
  floats = [np.asarray(x) for x in jax.tree.leaves(state) if np.asarray(x).dtype.kind == 'f']
  assert floats and all(np.isfinite(x).all() for x in floats)


@pytest.mark.parametrize('args, expect', [
    (['--config.train.stepz=5'], 'train.stepz'),
    (['--config.train.steps=abc'], 'train.steps'),
    (['--config.mesh.data=3'], 'mesh'),
    (['--config.mesh.data=1', '--config.mesh.tensor=8'], 'does not divide mesh axes'),  # 4 heads over 8
    (['--config.data.name=text_files', '--config.data.path=/nonexistent/corpus'], '/nonexistent/corpus'),
    (['--config.data.name=no_such_dataset_xyz'], 'no_such_dataset_xyz'),
    (['--config=experiments/lm.py:size=huge'], 'huge'),
    (['--config=experiments/nope.py'], 'nope.py'),
    (['--config.model.attention_impl=paged'], 'model.attention_impl'),
    (['--config.model.attention_dtype=int8'], 'model.attention_dtype'),
])
def test_bad_input_is_one_line_and_nonzero(data_dir, tmp_path, args, expect):
  base = ['train', '--config=experiments/lm.py:size=pico', f'--workdir={tmp_path}',
          f'--config.data.data_dir={data_dir}']
  r = run_cli(*base, *args, timeout=120)
  assert r.returncode != 0
  err = [line for line in r.stderr.strip().splitlines() if line.strip()]
  assert len(err) == 1, r.stderr
  assert expect in err[0] and 'Traceback' not in r.stderr


def test_incompatible_restart_and_corrupt_checkpoint(data_dir, tmp_path):
  r = run_cli(*train_args(data_dir, tmp_path, 10))
  assert r.returncode == 0, r.stderr[-2000:]
  # A shape change is refused, naming the key; nothing in the workdir is touched.
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  r = run_cli(*train_args(data_dir, tmp_path, 10, **{'model.d_model': 128}))
  assert r.returncode == 2 and 'model.d_model' in r.stderr and 'Traceback' not in r.stderr
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
  # A harmless change (more steps) resumes and reports it.
  r = run_cli(*train_args(data_dir, tmp_path, 12))
  assert r.returncode == 0 and 'train.steps' in r.stdout and 'resumed from step 10' in r.stdout
  # Corrupt the newest checkpoint's array data: it goes to the quarantine, in one line, and the run resumes
  # from the one before (tests/test_storage_faults.py has the rest).
  step_dir = tmp_path / 'checkpoints' / '12' / 'state'
  for root, _, files in os.walk(step_dir):
    for name in files:
      p = os.path.join(root, name)
      if os.path.getsize(p) > 0:
        with open(p, 'r+b') as f:
          f.write(b'\x00garbage' * 64)
  r = run_cli(*train_args(data_dir, tmp_path, 14))
  assert r.returncode == 0, r.stderr[-2000:]
  said = [x for x in r.stdout.splitlines() if 'corrupt' in x]
  assert len(said) == 1 and 'checkpoint step 12 is corrupt' in said[0] and 'resuming from step 10' in said[0]
  assert 'Traceback' not in r.stderr and (tmp_path / 'checkpoints.quarantine' / '12.corrupt').is_dir()

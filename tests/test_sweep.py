"""Sweep expansion, naming, planners, plan resolution, locks and `sktlm sweep --dry_run` (no training)."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from sktlm.config import accounting, schema, sizes
from sktlm.errors import UserError
from sktlm.sweep import locks, planners, schedule, spec
from sktlm.sweep import zip as szip
from sktlm.sweep.spec import product, run_name, sweep
from tests.conftest import ROOT

LM = str(ROOT / 'experiments' / 'lm.py')


def test_product_zip_and_names():
  runs = product([sweep('arg.size', ['pico', 'tiny']), sweep('config.optim.peak_lr', [1e-3, 3e-3])])
  assert runs == [{'arg.size': 'pico', 'config.optim.peak_lr': 1e-3},
                  {'arg.size': 'pico', 'config.optim.peak_lr': 3e-3},
                  {'arg.size': 'tiny', 'config.optim.peak_lr': 1e-3},
                  {'arg.size': 'tiny', 'config.optim.peak_lr': 3e-3}]
  assert run_name(runs[3]) == 'size-tiny_peak_lr-0.003'
  z = szip([sweep('config.train.steps', [10, 20]), sweep('config.optim.peak_lr', [3e-5, 1e-2])])
  assert [run_name(r) for r in z] == ['steps-10_peak_lr-3e-05', 'steps-20_peak_lr-0.01']
  with pytest.raises(UserError, match='different lengths'):
    szip([sweep('config.seed', [1, 2]), sweep('config.optim.peak_lr', [1.0])])
  with pytest.raises(UserError, match="must be 'arg"):
    sweep('optim.peak_lr', [1.0])


def test_names_are_safe_stable_and_disambiguated():
  s = {'config.data.path': '/x/my data/*.txt', 'config.model.moe.top_k': 2,
       'config.train.async_checkpoint': False}
  assert run_name(s) == 'path-x-my-data-.txt_top_k-2_async_checkpoint-false'
  # Two keys with the same last component keep one more component each.
  assert run_name({'config.optim.b1': 0.9, 'config.train.steps': 5, 'config.foo.steps': 6}) == \
      'b1-0.9_train.steps-5_foo.steps-6'
  long = {f'config.k{i}': 'v' * 20 for i in range(10)}
  a, b = run_name(long), run_name({**long, 'config.k9': 'w' * 20})
  assert len(a) <= spec.MAX_NAME_LEN and a != b and '~' in a
  assert run_name(long) == a  # deterministic
  for name in (a, b, run_name(s)):
    spec.check_name(name)


def test_config_spec_and_flags():
  assert spec.config_spec('e/lm.py:runlocal', {'size': 'pico'}) == 'e/lm.py:runlocal,size=pico'
  assert spec.config_spec('e/lm.py:size=tiny,runlocal', {'size': 'nano'}) == 'e/lm.py:size=nano,runlocal'
  assert spec.config_spec('e/lm.py', {}) == 'e/lm.py'
  assert spec.override_flag('optim.peak_lr', 0.003) == '--config.optim.peak_lr=0.003'
  assert spec.override_flag('optim.schedule', 'wsd') == '--config.optim.schedule=wsd'
  assert spec.override_flag('train.async_checkpoint', False) == '--config.train.async_checkpoint=false'


def _write_sweep(tmp_path, body, name='s.py'):
  p = tmp_path / name
  p.write_text(f'from sktlm.sweep import *\nfrom sktlm.sweep import planners\nBASE = {LM + ":runlocal"!r}\n'
               + body)
  return str(p)


def test_load_sweep_file_and_resolve(tmp_path):
  path = _write_sweep(tmp_path, "COMMON = {'config.train.batch_size': 8}\n"
                      "def get_sweep(arg):\n"
                      "  return product([sweep('arg.size', ['pico', 'nano']),\n"
                      "                  sweep('config.train.steps', [7])])\n")
  sd = spec.load_sweep_file(path)
  runs = schedule.resolve(sd)
  assert [r.name for r in runs] == ['size-pico_steps-7', 'size-nano_steps-7']
  r = runs[1]
  assert r.config.endswith('lm.py:runlocal,size=nano')
  assert r.overrides == {'train.batch_size': 8, 'train.steps': 7}
  # Counts come from sktlm.config.accounting on the resolved config (byte tokenizer: 259 -> padded to 384).
  assert r.params['non_embedding'] == accounting.param_counts(_mc('nano'))['non_embedding']
  assert r.tokens == 7 * 8 * 64 and r.flops['6N'] == r.tokens * 6 * accounting.matmul_params(_mc('nano'))
  args = r.train_args('/w/x')
  assert args[:2] == [f'--config={LM}:runlocal,size=nano', '--workdir=/w/x']
  assert '--config.train.steps=7' in args and '--config.train.batch_size=8' in args


def _mc(size):
  mc = schema.get_config(size).model
  mc.vocab_size = 384
  return mc


def test_bad_sweeps_are_one_line_errors(tmp_path):
  dup = _write_sweep(tmp_path, "def get_sweep(arg):\n  return [{'config.seed': 1}, {'config.seed': 1}]\n")
  with pytest.raises(UserError, match='both named'):
    spec.load_sweep_file(dup)
  badkey = _write_sweep(tmp_path, "def get_sweep(arg):\n  return [{'config.optim.nope': 1}]\n", 'b.py')
  with pytest.raises(UserError, match="unknown config key 'optim.nope'"):
    schedule.resolve(spec.load_sweep_file(badkey))
  with pytest.raises(UserError, match='not found'):
    spec.load_sweep_file(str(tmp_path / 'missing.py'))


def _n_and_step(size, batch=4, seq=64):
  return accounting.param_counts(_mc(size))['non_embedding'], batch * seq


def test_size_ladder_steps_follow_tokens_per_param():
  runs = planners.size_ladder(LM + ':runlocal', ['pico', 'micro'], tokens_per_param=2.0)
  for r in runs:
    n, per_step = _n_and_step(r.settings['arg.size'])
    assert r.settings['config.train.steps'] == math.ceil(2.0 * n / per_step)
    assert r.name == run_name(r.settings, ('arg.size',))
  fixed = planners.size_ladder(LM, ['pico', 'tiny'], tokens=1_000_000, common={'config.data.seq_len': 128},
                               warmup_fraction=0.1)
  assert [r.settings['config.train.steps'] for r in fixed] == [math.ceil(1e6 / (16 * 128))] * 2
  assert fixed[0].settings['config.optim.warmup_steps'] == round(0.1 * math.ceil(1e6 / (16 * 128)))


def test_isoflop_budgets_and_spread():
  budgets = [1e13, 1e14]
  runs = planners.isoflop(LM, budgets, size_names=sizes.SIZE_NAMES[:7], per_budget=3)
  assert len(runs) == 6
  for r in runs:
    c = float(r.name.split('_')[0][2:])
    size = r.settings['arg.size']
    mc = _mc(size)
    per_tok = accounting.flops_per_token(mc, 256)['exact']  # budgets in model FLOPs, as `sktlm scaling` reports
    steps = r.settings['config.train.steps']
    assert abs(steps * 16 * 256 * per_tok - c) <= 0.5 * 16 * 256 * per_tok  # rounded to a whole step
  # The middle size of each budget is the one closest to 20 tokens per parameter.
  for c in budgets:
    group = [r for r in runs if float(r.name.split('_')[0][2:]) == c]
    assert len(group) == 3
    ratios = []
    for r in group:
      n = accounting.param_counts(_mc(r.settings['arg.size']))['non_embedding']
      ratios.append(r.settings['config.train.steps'] * 16 * 256 / n)
    assert ratios[0] > ratios[1] > ratios[2]  # larger models see fewer tokens per parameter


def _ladder_file(tmp_path, name, module_common=None, planner_common=None):
  """A one-size ladder on the plain base config (16 x 256 = 4,096 tokens per step)."""
  p = tmp_path / name
  p.write_text('from sktlm.sweep import planners\n'
               f'BASE = {LM!r}\n'
               + (f'COMMON = {module_common!r}\n' if module_common is not None else '')
               + 'def get_sweep(arg):\n'
               f'  return planners.size_ladder(BASE, ["micro"], tokens_per_param=1.0, common={planner_common!r})\n')
  return str(p)


def test_planner_common_is_what_the_runs_train_with(tmp_path):
  """The issue's scenario: a one-size ladder with common= but no module COMMON planned 1,024 tokens per step
  and trained 4,096 (the base config's 16 x 256): its dry-run D/N was off by 4x. The runs now carry it."""
  sd = spec.load_sweep_file(_ladder_file(tmp_path, 'issue.py', None,
                                         {'config.train.batch_size': 8, 'config.data.seq_len': 128}))
  assert sd.common == {}
  (r,) = schedule.resolve(sd)
  n = accounting.param_counts(_mc('micro'))['non_embedding']
  assert r.batch_size * r.seq_len == 1024 and r.steps == math.ceil(n / 1024)
  assert r.tokens == r.steps * 1024 and abs(r.tokens / n - 1) < 1024 / n   # planned D/N = trained D/N
  args = r.train_args(str(tmp_path / 'run'))
  assert '--config.train.batch_size=8' in args and '--config.data.seq_len=128' in args
  assert r.settings['config.train.batch_size'] == 8  # recorded with the run (results.csv overrides)
  # The module COMMON contradicting the planner's common= is refused at load, in one line.
  clash = _ladder_file(tmp_path, 'clash.py', {'config.train.batch_size': 16}, {'config.train.batch_size': 8})
  with pytest.raises(UserError, match=r'planned with config.train.batch_size=8 .* COMMON sets 16'):
    spec.load_sweep_file(clash)
  # A planner given no common= while COMMON changes the tokens per step: refused when resolved.
  forgot = _ladder_file(tmp_path, 'forgot.py', {'config.train.batch_size': 8})
  with pytest.raises(UserError, match=r'planned at 4,096 tokens per step but its config trains 2,048'):
    schedule.resolve(spec.load_sweep_file(forgot))
  # ... and so is one whose COMMON changes N behind the planner's back.
  wider = _ladder_file(tmp_path, 'wider.py', {'config.model.d_ff': 64})
  with pytest.raises(UserError, match=r'planned for [0-9,]+ non_embedding parameters but its config has'):
    schedule.resolve(spec.load_sweep_file(wider))
  # Agreeing settings (the repository's sweeps pass common=COMMON) are fine.
  same = {'config.train.batch_size': 8}
  assert schedule.resolve(spec.load_sweep_file(_ladder_file(tmp_path, 'same.py', same, same)))[0].batch_size == 8
  for f in ('model_sizes.py', 'isoflop.py', 'wsd.py'):
    runs = schedule.resolve(spec.load_sweep_file(str(ROOT / 'sweeps' / f)))
    assert runs and all(r.tokens == r.steps * r.batch_size * r.seq_len for r in runs)


def test_wsd_branches_start_at_parent_checkpoints():
  runs = planners.wsd(LM, ['pico', 'nano'], tokens_per_param=(2, 4, 8), decay_fraction=0.25,
                      common={'config.train.batch_size': 4, 'config.data.seq_len': 64})
  longs = [r for r in runs if not r.parent]
  assert len(longs) == 2 and len(runs) == 6
  for long in longs:
    p = long.settings['config.train.checkpoint_every']
    assert long.settings['config.train.keep_checkpoints'] == 0
    branches = [r for r in runs if r.parent == long.name]
    assert len(branches) == 2
    for b in branches:
      k = b.parent_step
      assert k % p == 0 and b.settings['config.optim.decay_start'] == k
      assert k < long.settings['config.optim.decay_start']  # branches leave the long run's stable phase
      assert b.settings['config.train.steps'] == round(k / 0.75)
  sd = spec.SweepDef('x', '', LM, {'config.train.batch_size': 4, 'config.data.seq_len': 64}, runs, {})
  planned = schedule.resolve(sd)
  b = next(r for r in planned if r.parent)
  assert b.new_tokens == (b.steps - b.parent_step) * 4 * 64 and b.tokens == b.steps * 4 * 64
  args = b.train_args('/s/' + b.name, '/s/' + b.parent)
  assert f'--config.train.init_from=/s/{b.parent}' in args
  assert f'--config.train.init_step={b.parent_step}' in args


def test_locks_live_stale_and_handover(tmp_path):
  path = str(tmp_path / 'r' / 'sweep.lock')
  a = locks.RunLock(path)
  assert a.acquire()
  assert not locks.RunLock(path).acquire()  # held by this (live) process
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
  try:
    a.set_holder(child.pid)
    assert json.load(open(path))['pid'] == child.pid
    assert not locks.RunLock(path).acquire()
  finally:
    child.kill()
    child.wait()
  b = locks.RunLock(path)
  assert b.acquire()  # the holder died: stale lock broken
  assert json.load(open(path))['pid'] == os.getpid()
  b.release()
  assert not os.path.exists(path)
  # A reused pid (same number, other start time) is not the holder.
  with open(path, 'w') as f:
    json.dump({'host': locks.HOST, 'pid': os.getpid(), 'start': '1', 'time': time.time()}, f)
  assert locks.RunLock(path).acquire()


def _sktlm(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', *args], cwd=cwd, capture_output=True, text=True,
                        timeout=120)


def test_dry_run_prints_the_plan(tmp_path):
  p = _sktlm('sweep', 'sweeps/model_sizes.py', '--dry_run')
  assert p.returncode == 0, p.stderr
  for size in ('d64', 'd96', 'd144', 'd208', 'd288'):  # the muP width ladder
    assert f'size-{size}_steps-500' in p.stdout
  assert 'N non-emb' in p.stdout and 'C = training FLOPs, exact convention' in p.stdout and 'est. time' in p.stdout
  assert p.stdout.count('convention') == 1  # one convention per plan
  assert 'assumed' in p.stdout
  assert not os.path.exists(ROOT / 'runs' / 'sizes' / 'size-d64_steps-500_seed-0' / 'sweep.lock')
  p = _sktlm('sweep', 'sweeps/model_sizes.py', '--dry_run', '--flops_per_s=1e9', '--flops=6n')
  assert 'given' in p.stdout and 'C = training FLOPs, 6n convention' in p.stdout
  for f in ('isoflop.py', 'wsd.py', 'lr.py'):
    p = _sktlm('sweep', f'sweeps/{f}', '--dry_run')
    assert p.returncode == 0, (f, p.stderr)


def test_cli_user_errors(tmp_path):
  p = _sktlm('sweep', str(tmp_path / 'nope.py'), '--dry_run')
  assert p.returncode == 2 and 'not found' in p.stderr and 'Traceback' not in p.stderr
  p = _sktlm('sweep', 'sweeps/model_sizes.py')
  assert p.returncode == 2 and '--sweep_dir is required' in p.stderr
  for flag in ('--sweep_dir', '--workdir'):  # the old spelling stays an alias
    p = _sktlm('sweep', 'sweeps/model_sizes.py', f'{flag}={tmp_path / "s"}', '--status')
    assert p.returncode == 0 and f'sweep {tmp_path / "s"}' in p.stdout, p.stderr
  p = _sktlm('sweep', '--dry_run')
  assert p.returncode == 2 and 'one sweep file' in p.stderr


def test_resources_from_the_run_config(tmp_path):
  path = _write_sweep(tmp_path, "RESOURCES = lambda c: {'CPU': 2, 'GPU': c.train.batch_size // 4}\n"
                      "def get_sweep(arg):\n  return sweep('config.train.batch_size', [4, 8])\n")
  runs = schedule.resolve(spec.load_sweep_file(path))
  assert [r.resources for r in runs] == [{'CPU': 2, 'GPU': 1}, {'CPU': 2, 'GPU': 2}]
  from sktlm.sweep.ray_backend import RayBackend
  assert RayBackend._options({'CPU': 2, 'GPU': 1, 'TPU': 4}) == dict(num_cpus=2, num_gpus=1,
                                                                    resources={'TPU': 4})


def test_status_view_reads_the_metrics_tail(tmp_path):
  from sktlm.sweep import progress
  d = tmp_path / 'run'
  d.mkdir()
  lines = [json.dumps({'kind': 'train', 'step': s, 'loss': 5.0 - s / 100, 'step_time_s': 0.5,
                       'tokens_per_s': 1000.0}) for s in range(10, 210, 10)]
  lines.insert(5, json.dumps({'kind': 'eval', 'step': 60, 'eval_loss': 4.5}))
  (d / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"kind": "train", "st')  # a line being written
  v = progress.run_view('run', 'running', 300, str(d), started=time.time() - 5)
  assert v['step'] == 200 and v['loss'] == pytest.approx(3.0) and v['eval_loss'] == 4.5
  assert v['eta'] == pytest.approx(100 * 0.5) and 4 < v['elapsed'] < 60
  text = '\n'.join(progress.table([v], 'hdr'))
  assert 'running' in text and '200/300' in text and '50s' in text

"""End-to-end sweeps with the real `sktlm train` (tiny pico runs): results, failures, idempotence,
WSD branches from a parent's checkpoint, and the Ray backend."""

import csv
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from sktlm.config import accounting
from sktlm.sweep import schedule, spec
from tests.conftest import ROOT

BASE = str(ROOT / 'experiments' / 'lm.py') + ':size=pico,runlocal'
# Small and quick: 6 steps of 4 x 64 tokens, eval at the end, no TensorBoard.
QUICK = {'config.train.steps': 6, 'config.train.eval_every': 6, 'config.train.checkpoint_every': 6,
         'config.metrics.tensorboard': False, 'config.metrics.progress': False,
         'config.metrics.peak_flops': 1e11}


def write_sweep(path, body, common=None):
  path.write_text('from sktlm.sweep import Run, product, sweep\n'
                  f'BASE = {BASE!r}\nCOMMON = {dict(QUICK, **(common or {}))!r}\n' + body)
  return str(path)


def sktlm_sweep(*args, timeout=600):
  # One CPU device per run (conftest's 8 simulated devices would need batches divisible by 8).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', 'sweep', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def rows_of(w):
  with open(os.path.join(w, 'results.csv')) as f:
    return {r['name']: r for r in csv.DictReader(f)}


def test_real_sweep_results_failure_and_rerun(tmp_path):
  s = write_sweep(tmp_path / 's.py', 'def get_sweep(arg):\n  return [\n'
                  "      {'config.seed': 1},\n"
                  "      Run({'config.data.name': 'text_files',\n"
                  "           'config.data.path': '/nonexistent/corpus.txt'}, name='broken'),\n"
                  '  ]\n')
  w = tmp_path / 'w'
  p = sktlm_sweep(s, f'--workdir={w}', '--parallel=2')
  assert p.returncode == 1, p.stdout + p.stderr
  rows = rows_of(w)
  ok, bad = rows['seed-1'], rows['broken']
  assert ok['status'] == 'done' and ok['exit_code'] == '0'
  summary = json.load(open(w / 'seed-1' / 'summary.json'))
  # Columns come from the run's summary.json, and agree with the planner's accounting of the same config.
  planned = schedule.resolve(spec.load_sweep_file(s))[0]
  assert int(ok['n_params_total']) == summary['params']['total'] == planned.params['total']
  assert int(ok['n_params_non_embedding']) == planned.params['non_embedding']
  assert int(ok['tokens']) == 6 * 4 * 64 == planned.tokens
  assert float(ok['flops_6n']) == pytest.approx(planned.flops['6N'])
  assert float(ok['flops_exact']) == pytest.approx(planned.flops['exact'])
  assert float(ok['final_eval_loss']) == pytest.approx(summary['final_eval_loss'])
  assert 0 < float(ok['final_train_loss']) < 6.0 and float(ok['tokens_per_s']) > 0
  assert float(ok['best_eval_loss']) <= float(ok['final_eval_loss'])
  assert bad['status'] == 'failed' and bad['exit_code'] == '2'
  assert 'nonexistent' in bad['log_tail'] and 'nonexistent' in p.stdout
  assert (w / 'seed-1' / 'train.log').read_text().count('=== sktlm sweep: attempt 1') == 1
  # Rerun: the finished run is skipped and untouched.
  before = (w / 'seed-1' / 'summary.json').stat().st_mtime_ns
  p = sktlm_sweep(s, f'--workdir={w}', '--noretry_failed')
  assert p.returncode == 1 and 'already finished' in p.stdout
  assert (w / 'seed-1' / 'summary.json').stat().st_mtime_ns == before
  assert 'attempt 2' not in (w / 'seed-1' / 'train.log').read_text()
  p = sktlm_sweep(s, f'--workdir={w}', '--status')
  assert p.returncode == 0 and 'seed-1' in p.stdout and 'done' in p.stdout


@pytest.mark.slow
def test_wsd_branch_starts_from_parent_checkpoint(tmp_path):
  common = {'config.optim.schedule': 'wsd', 'config.train.checkpoint_every': 4,
            'config.train.keep_checkpoints': 0, 'config.train.log_every': 1}
  s = write_sweep(tmp_path / 's.py', 'def get_sweep(arg):\n  return [\n'
                  "      Run({'config.train.steps': 12, 'config.optim.decay_start': 10}, name='long'),\n"
                  "      Run({'config.train.steps': 8, 'config.optim.decay_start': 4}, name='branch',\n"
                  "          parent='long', parent_step=4),\n"
                  '  ]\n', common)
  w = tmp_path / 'w'
  p = sktlm_sweep(s, f'--workdir={w}', '--parallel=2')
  assert p.returncode == 0, p.stdout + p.stderr
  log = (w / 'branch' / 'train.log').read_text()
  assert f'--config.train.init_from={w / "long"}' in log and '--config.train.init_step=4' in log
  recs = [json.loads(line) for line in open(w / 'branch' / 'metrics.jsonl')]
  train_steps = [r['step'] for r in recs if r['kind'] == 'train']
  assert train_steps[0] == 5 and train_steps[-1] == 8  # continued from the parent's step 4
  long_recs = {r['step']: r for r in map(json.loads, open(w / 'long' / 'metrics.jsonl'))
               if r['kind'] == 'train'}
  # The branch restored the parent's weights and data position at step 4: its step-5 loss (computed before
  # the step-5 update) equals the parent's; its own schedule (decay from step 4) then takes over.
  branch = {r['step']: r for r in recs if r['kind'] == 'train'}
  assert branch[5]['loss'] == pytest.approx(long_recs[5]['loss'], rel=1e-5)
  assert branch[6]['lr'] < long_recs[6]['lr'] and branch[8]['lr'] < branch[6]['lr']
  assert branch[7]['loss'] != pytest.approx(long_recs[7]['loss'], rel=1e-6)
  summary = json.load(open(w / 'branch' / 'summary.json'))
  assert summary['step'] == 8 and summary['tokens'] == 8 * 4 * 64
  rows = rows_of(w)
  assert rows['branch']['parent'] == 'long' and rows['branch']['tokens'] == str(8 * 4 * 64)


@pytest.mark.slow
def test_ray_backend_real_train(tmp_path):
  pytest.importorskip('ray')
  s = write_sweep(tmp_path / 's.py',
                  "def get_sweep(arg):\n  return [{'config.seed': 1}, {'config.seed': 2}]\n")
  w = tmp_path / 'w'
  p = sktlm_sweep(s, f'--workdir={w}', '--backend=ray', '--ray_num_cpus=2')
  assert p.returncode == 0, p.stdout + p.stderr
  rows = rows_of(w)
  assert [r['status'] for r in rows.values()] == ['done', 'done']
  mc = json.load(open(w / 'seed-1' / 'config.json'))['model']
  n = accounting.param_counts(ml_collections.ConfigDict(mc))
  assert int(rows['seed-1']['n_params_total']) == n['total']

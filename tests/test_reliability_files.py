"""Nothing lost, nothing hung, nothing silent (issue 14), for the files runs and sweeps share: durable JSON
writes without temp leftovers, metrics.jsonl appends after a cut line, Orbax temp folders, results.json/csv
agreement, run locks (empty, garbled, foreign, orphaned, waited for), and `sktlm doctor`.
All real files and processes; no jax except where a Checkpointer is opened."""

import json
import os
import subprocess
import sys

import pytest

from sktlm import files, runfiles
from sktlm.sweep import execute, locks, results
from sktlm.train.metrics import MetricsWriter
from tests.conftest import ROOT


def test_write_json_is_durable_and_leaves_no_temp_file(tmp_path):
  p = str(tmp_path / 'a.json')
  files.write_json(p, {'x': 1})
  with pytest.raises(TypeError):
    files.write_json(p, {'x': {('not', 'a str key'): 1}})  # fails mid-write
  assert json.load(open(p)) == {'x': 1} and os.listdir(tmp_path) == ['a.json']
  # A temp file of a writer that died (pid gone) is listed as a leftover; a live writer's is not.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  (tmp_path / f'a.json{files.TMP_MARK}{dead.stdout.strip()}.1').write_text('{')
  (tmp_path / f'b.json{files.TMP_MARK}{os.getpid()}.1').write_text('{')
  assert [os.path.basename(x) for x in files.temp_leftovers(str(tmp_path))] == \
      [f'a.json{files.TMP_MARK}{dead.stdout.strip()}.1']


def test_metrics_append_after_a_cut_line(tmp_path, capfd):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')  # killed mid-line
  w = MetricsWriter(str(tmp_path), tensorboard=False, progress=False, total_steps=3)
  w.write({'kind': 'eval', 'step': 2, 'eval_loss': 1.5})
  w.close()
  lines = path.read_text().splitlines()
  assert [json.loads(x)['step'] for x in lines] == [1, 2, 2]  # on main: the record was glued onto the cut line
  assert 'dropped a cut last line' in capfd.readouterr().err
  assert files.repair_jsonl(str(path)) == 0


def test_orbax_temp_folders_of_killed_saves_are_removed(tmp_path):
  from sktlm.train import checkpoint
  ck = tmp_path / 'checkpoints'
  (ck / '5.orbax-checkpoint-tmp-1700000000').mkdir(parents=True)
  (ck / '5.orbax-checkpoint-tmp-1700000000' / 'state').mkdir()
  assert runfiles.checkpoint_tmp_folders(str(ck))
  checkpoint.Checkpointer(str(ck), async_save=False).close()  # what `sktlm train` opens at start
  assert runfiles.checkpoint_tmp_folders(str(ck)) == [] and runfiles.steps_on_disk(str(ck)) == []


def test_results_csv_is_rendered_from_results_json(tmp_path):
  rows = [{'name': 'a', 'status': 'done', 'final_train_loss': 3.25, 'tokens': 128, 'overrides': '{}'},
          {'name': 'b', 'status': 'failed', 'final_train_loss': None, 'tokens': 64, 'overrides': '{}'}]
  results.write(rows, str(tmp_path))
  assert results.consistent(str(tmp_path)) == ''
  # A kill between the two writes: results.json is newer than results.csv.
  files.write_json(str(tmp_path / 'results.json'), rows[:1])
  assert 'disagrees' in results.consistent(str(tmp_path))
  results.sync_csv(str(tmp_path))
  assert results.consistent(str(tmp_path)) == ''


def _dead_pid():
  p = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  return int(p.stdout)


def test_stale_locks_are_reclaimed_with_a_message_live_ones_respected(tmp_path):
  said = []
  path = str(tmp_path / 'sweep.lock')
  lock = locks.RunLock(path, log=said.append)
  old = os.path.getmtime(tmp_path) - 3600
  cases = (('', 'empty or unreadable', True), ('{"host": "x", "pi', 'empty or unreadable', True),
           (json.dumps({'host': 'another-host', 'pid': 1, 'start': '1'}), 'lock of host another-host', True),
           (json.dumps({'host': locks.HOST, 'pid': _dead_pid(), 'start': ''}), 'is gone', False))
  for content, why, needs_age in cases:
    with open(path, 'w') as f:
      f.write(content)
    if needs_age:
      assert not lock.acquire(), content  # fresh: may be mid-write / alive elsewhere, so respected
      os.utime(path, (old, old))
    assert lock.acquire(), content  # on main: empty, garbled and foreign locks blocked forever
    assert why in said[-1] and 'reclaiming a stale lock' in said[-1], said
    lock.release()
    assert not os.path.exists(path)
  # A fresh lock of another host, and a lock of a live process here, are respected.
  for info in ({'host': 'another-host', 'pid': 1, 'start': '1'}, locks.holder_info(os.getpid())):
    files.write_json(path, info)
    assert not lock.acquire()
    os.unlink(path)


def test_waiting_for_a_locked_run_says_for_what_and_can_time_out(tmp_path, capsys):
  run_dir = tmp_path / 'r'
  run_dir.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)
  try:
    files.write_json(str(run_dir / runfiles.SWEEP_LOCK), locks.holder_info(holder.pid))
    task = dict(name='r', run_dir=str(run_dir), cmd=['false'], settings={}, poll_s=0.05, lock_timeout_s=0.3)
    res = execute.run_one(task)
    assert res['status'] == 'locked' and f'pid {holder.pid}' in res['message']
    assert f'waiting for pid {holder.pid} on host {locks.HOST}' in capsys.readouterr().out
    assert execute.run_status(str(run_dir)) == 'running'
  finally:
    holder.stdin.close()
    holder.wait()
  assert execute.run_status(str(run_dir)) == 'pending'  # its holder is gone: the lock is stale


def test_a_training_process_that_outlives_its_sweep_releases_the_lock(tmp_path, data_dir):
  """The lock names the `sktlm train` process (as the sweep hands it over); the process ends on its own
  (here: at once, on a bad value) and removes it. The pid is known before python starts: a shell writes
  its pid, waits on a FIFO while the test writes the lock, then execs python in the same process."""
  lock, fifo, pidfile = tmp_path / 'sweep.lock', tmp_path / 'go', tmp_path / 'pid'
  os.mkfifo(fifo)
  cmd = (f'echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && read x < {fifo} && exec {sys.executable} '
         f'-m sktlm.cli train --config=experiments/lm.py:size=pico --workdir={tmp_path / "w"} '
         '--config.train.steps=0')
  proc = subprocess.Popen(['sh', '-c', cmd], cwd=ROOT, env=dict(os.environ, **{execute.LOCK_ENV: str(lock)}),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  with open(fifo, 'w') as go:  # blocks until the shell opens the FIFO, i.e. after it wrote its pid
    pid = int(pidfile.read_text())
    files.write_json(str(lock), locks.holder_info(pid))
    go.write('go\n')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and 'train.steps must be >= 1' in err
  assert not lock.exists()  # on main: left behind


def _doctor(*args):
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', 'doctor', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_doctor_lists_and_fixes(tmp_path):
  sweep = tmp_path / 'sweep'
  run = sweep / 'run-a'
  (run / 'checkpoints' / '4.orbax-checkpoint-tmp-1').mkdir(parents=True)
  (run / 'checkpoints' / '3').mkdir()
  files.write_json(str(run / runfiles.SWEEP_LOCK), {'host': locks.HOST, 'pid': _dead_pid(), 'start': ''})
  (run / f'summary.json{files.TMP_MARK}{_dead_pid()}.7').write_text('{"half')
  (run / 'metrics.jsonl').write_text('{"kind": "train", "step": 3, "loss": 2.0}\n{"kind": "tr')
  files.write_json(str(run / 'summary.json'), {'status': 'done', 'step': 3, 'steps': 3, 'eval_batches': 0})
  rows = [{'name': 'run-a', 'status': 'done', 'final_train_loss': None, 'overrides': '{}'}]
  results.write(rows, str(sweep))
  (sweep / 'results.csv').write_text('name,status\n')
  p = _doctor(sweep)
  assert p.returncode == 1, p.stdout + p.stderr
  for text in ('stale lock', 'temp file of a killed write', 'temp folder of a killed checkpoint save',
               'last line cut', 'status done but incomplete: final_train_loss missing',
               'results.csv disagrees with results.json'):
    assert text in p.stdout, (text, p.stdout)
  p = _doctor(sweep, '--fix')
  assert p.returncode == 1 and p.stdout.count('[fixed]') == 5, p.stdout
  p = _doctor(sweep)
  left = [x for x in p.stdout.splitlines() if 'problem' not in x]
  assert all('incomplete' in x or 'done without losses' in x for x in left), p.stdout
  assert not (run / runfiles.SWEEP_LOCK).exists()
  assert sorted(os.listdir(run / 'checkpoints')) == ['3'] and (run / 'metrics.jsonl').read_text().endswith('\n')
  p = _doctor(tmp_path / 'nothing')
  assert p.returncode == 2 and 'not a folder' in p.stderr


@pytest.mark.parametrize('kind', ['config', 'sweep', 'scaling'])
def test_syntax_errors_and_empty_results_are_one_line(tmp_path, kind):
  bad = tmp_path / 'bad.py'
  bad.write_text('BASE = "experiments/lm.py"\ndef get_config(:\n  pass\n')
  empty = tmp_path / 'results.csv'
  empty.write_text('')
  args = {'config': ['train', f'--config={bad}', f'--workdir={tmp_path / "w"}'],
          'sweep': ['sweep', str(bad), '--dry_run'],
          'scaling': ['scaling', str(empty), f'--out={tmp_path / "out"}']}[kind]
  p = subprocess.run([sys.executable, '-m', 'sktlm.cli', *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  err = [x for x in p.stderr.splitlines() if x.strip()]
  assert p.returncode == 2 and len(err) == 1 and 'Traceback' not in p.stderr, p.stderr
  assert (f'{bad}:2: syntax error' if kind != 'scaling' else 'is empty (no header)') in err[0]
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'out').exists()

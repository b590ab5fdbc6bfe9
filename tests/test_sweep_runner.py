"""The sweep runner's process handling with real subprocesses: failures, SIGKILL + resume, orphaned runs,
and the Ray backend on a real local Ray cluster.

Runs here are a small stand-in script (FAKE_TRAIN) that takes `sktlm train`'s flags and writes the same
files (metrics.jsonl, summary.json), resumes from its own checkpoint file, and logs every launch; the
real `sktlm train` is exercised in test_sweep_e2e.py.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sktlm.sweep import results
from tests.conftest import ROOT

FAKE_TRAIN = r'''
import json, os, signal, sys, time
args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)
wd = args['--workdir']
steps = int(args.get('--config.train.steps', 20))
seed = int(args.get('--config.seed', 0))
step_s = float(os.environ.get('FAKE_STEP_S', '0.02'))
os.makedirs(wd, exist_ok=True)
ck = os.path.join(wd, 'ckpt.json')
start = json.load(open(ck))['step'] if os.path.exists(ck) else 0
with open(os.path.join(wd, 'launches.txt'), 'a') as f:
  f.write(f'{os.getpid()} {start} {time.time()}\n')
print('fake train from step', start, flush=True)
if seed == 13:
  print('Traceback (most recent call last):\nValueError: boom at seed 13', file=sys.stderr, flush=True)
  sys.exit(3)
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
t0 = time.time()
for step in range(start + 1, steps + 1):
  time.sleep(step_s)
  with open(os.path.join(wd, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'kind': 'train', 'step': step, 'loss': 3.0 + seed / 100 + 1 / step,
                        'step_time_s': step_s, 'tokens_per_s': 100.0}) + '\n')
  with open(ck + '.tmp', 'w') as f:
    json.dump({'step': step}, f)
  os.replace(ck + '.tmp', ck)
  if stop:
    sys.exit(143)
  if step == int(os.environ.get('FAKE_PAUSE_AT', '0')):  # stay at this step until signalled: tests sync on
    open(os.path.join(wd, 'paused'), 'w').close()         # the 'paused' file, never on timing
    while not stop:
      time.sleep(0.01)
    sys.exit(143)
  if step == int(os.environ.get('FAKE_GATE_AT', '0')):  # stay at this step until the test opens the gate
    open(os.path.join(wd, 'paused'), 'w').close()        # (a file), then finish normally
    while not os.path.exists(os.path.join(wd, 'gate')):
      time.sleep(0.01)
loss = 3.0 + seed / 100
summary = dict(status='done', message='', step=steps, steps=steps, tokens=steps * 64, final_train_loss=loss,
               final_eval_loss=loss + 0.1, best_eval_loss=loss + 0.05, wall_time_s=time.time() - t0,
               tokens_per_s=100.0, mfu=0.1, params=dict(total=1000, embedding=100, head=100,
               non_embedding=800, active=1000, active_non_embedding=800),
               flops_per_token={'6N': 6000.0, 'exact': 6500.0, 'causal': 6250.0},
               flops={'6N': 6000.0 * steps * 64, 'exact': 6500.0 * steps * 64}, seq_len=64, batch_size=1)
with open(os.path.join(wd, 'summary.json.tmp'), 'w') as f:
  json.dump(summary, f)
os.replace(os.path.join(wd, 'summary.json.tmp'), os.path.join(wd, 'summary.json'))
'''


@pytest.fixture
def fake(tmp_path):
  p = tmp_path / 'fake_train.py'
  p.write_text(FAKE_TRAIN)
  return f'{sys.executable} {p}'


def write_sweep(tmp_path, seeds, steps=10, name='s.py'):
  p = tmp_path / name
  base = str(ROOT / 'experiments/lm.py') + ':runlocal'
  p.write_text(f'from sktlm.sweep import product, sweep\nBASE = {base!r}\n'
               'def get_sweep(arg):\n'
               f'  return product([sweep("config.seed", {seeds!r}),\n'
               f'                  sweep("config.train.steps", [{steps}])])\n')
  return str(p)


def sweep_cmd(sweep_file, workdir, fake, *extra):
  if not any(a.startswith(('--parallel', '--backend')) for a in extra):
    extra = ('--parallel=1',) + extra  # these tests script the events of one run at a time
  return [sys.executable, '-m', 'sktlm.cli', 'sweep', sweep_file, f'--workdir={workdir}',
          f'--train_command={fake}', *extra]


# Ctrl-C in a terminal reaches a foreground sweep whose SIGINT is at its default. A test runner started as a
# background job of a non-interactive shell hands its children SIGINT ignored, which Python then keeps; the
# sweep under test starts from the default, as a user's would.
WITH_DEFAULT_SIGINT = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "sys.argv[0] = 'sktlm'; runpy.run_module('sktlm.cli', run_name='__main__')")


def run_cli(*args, env=None, timeout=180):
  return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def launches(run_dir):
  try:
    return [line.split() for line in open(os.path.join(run_dir, 'launches.txt')).read().splitlines()]
  except FileNotFoundError:
    return []


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_failing_run_is_recorded_and_others_finish(tmp_path, fake):
  s = write_sweep(tmp_path, [1, 13, 2])
  w = tmp_path / 'w'
  p = run_cli(*sweep_cmd(s, w, fake, '--parallel=2'))
  assert p.returncode == 1, p.stdout + p.stderr  # not everything done
  rows = read_csv(w / 'results.csv')
  assert list(rows[0])[:len(results.COLUMNS)] == results.COLUMNS
  by = {r['name']: r for r in rows}
  assert by['seed-1_steps-10']['status'] == 'done' and by['seed-2_steps-10']['status'] == 'done'
  bad = by['seed-13_steps-10']
  assert bad['status'] == 'failed' and bad['exit_code'] == '3' and 'boom at seed 13' in bad['log_tail']
  assert 'boom at seed 13' in p.stdout  # shown to the user too
  assert float(by['seed-2_steps-10']['final_train_loss']) == pytest.approx(3.02)
  assert json.loads(by['seed-2_steps-10']['overrides']) == {'config.seed': 2, 'config.train.steps': 10}
  assert by['seed-2_steps-10']['workdir'] == 'seed-2_steps-10'
  with open(w / 'results.json') as f:
    assert [r['status'] for r in json.load(f)] == ['done', 'failed', 'done']
  # The full log of the failed attempt is in its run directory.
  assert 'boom at seed 13' in (w / 'seed-13_steps-10' / 'train.log').read_text()
  # Rerun without retrying failures: nothing is launched again.
  mtime = os.path.getmtime(w / 'seed-1_steps-10' / 'summary.json')
  p = run_cli(*sweep_cmd(s, w, fake, '--noretry_failed'))
  assert p.returncode == 1 and 'already finished' in p.stdout
  assert all(len(launches(w / n)) == 1 for n in by)
  assert os.path.getmtime(w / 'seed-1_steps-10' / 'summary.json') == mtime
  # Rerun retrying it: it fails again (a second attempt), others untouched.
  p = run_cli(*sweep_cmd(s, w, fake))
  assert len(launches(w / 'seed-13_steps-10')) == 2 and len(launches(w / 'seed-1_steps-10')) == 1
  rec = json.load(open(w / 'seed-13_steps-10' / 'sweep_run.json'))
  assert [a['exit_code'] for a in rec['attempts']] == [3, 3]


def _wait_for(pred, timeout=60.0):
  t = time.time()
  while time.time() - t < timeout:
    if pred():
      return True
    time.sleep(0.05)
  raise AssertionError('timed out')


def _ckpt_step(run_dir):
  try:
    return json.load(open(os.path.join(run_dir, 'ckpt.json')))['step']
  except (OSError, ValueError):
    return 0


def test_sigkill_sweep_and_resume(tmp_path, fake):
  s = write_sweep(tmp_path, [1, 2, 3, 4], steps=30)
  w = tmp_path / 'w'
  names = [f'seed-{i}_steps-30' for i in (1, 2, 3, 4)]
  env = dict(os.environ, FAKE_STEP_S='0.05')
  with open(tmp_path / 'out1.txt', 'w') as out:
    sweep = subprocess.Popen(sweep_cmd(s, w, fake), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      _wait_for(lambda: os.path.exists(w / names[0] / 'summary.json') and _ckpt_step(w / names[1]) >= 5)
      first = (w / names[0] / 'summary.json').read_bytes()
      mtime = os.path.getmtime(w / names[0] / 'summary.json')
      # The machine "dies": SIGKILL the sweep and the training process it runs.
      train_pid = int(launches(w / names[1])[0][0])
      sweep.kill()
      os.kill(train_pid, signal.SIGKILL)
    finally:
      sweep.kill()
      sweep.wait()
  # The finished run's results survived the kill.
  rows = read_csv(w / 'results.csv')
  assert {r['name']: r['status'] for r in rows}[names[0]] == 'done'
  p = run_cli(*sweep_cmd(s, w, fake), env={'FAKE_STEP_S': '0.01'})
  assert p.returncode == 0, p.stdout + p.stderr
  assert (w / names[0] / 'summary.json').read_bytes() == first
  assert os.path.getmtime(w / names[0] / 'summary.json') == mtime
  assert len(launches(w / names[0])) == 1
  second = launches(w / names[1])
  assert len(second) == 2 and int(second[1][1]) >= 5  # resumed from its checkpoint, not from scratch
  assert [len(launches(w / n)) for n in names[2:]] == [1, 1]
  assert [r['status'] for r in read_csv(w / 'results.csv')] == ['done'] * 4
  assert not any(os.path.exists(w / n / 'sweep.lock') for n in names)


def test_orphaned_run_is_waited_for_not_duplicated(tmp_path, fake):
  s = write_sweep(tmp_path, [1, 2], steps=40)
  w, run = tmp_path / 'w', tmp_path / 'w' / 'seed-1_steps-40'
  env = dict(os.environ, FAKE_STEP_S='0.01', FAKE_GATE_AT='3')
  sweep = subprocess.Popen(sweep_cmd(s, w, fake), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: (run / 'paused').exists())  # the run holds at step 3 until the gate file exists
  finally:
    sweep.kill()  # only the sweep: its training process lives on, holding the run's lock
    sweep.wait()
  lock = json.load(open(run / 'sweep.lock'))
  assert lock['pid'] == int(launches(run)[0][0])
  # A second sweep finds the orphan alive; only once it says it waits does the orphan go on and finish.
  out = tmp_path / 'out2.txt'
  with open(out, 'w') as f:
    second = subprocess.Popen(sweep_cmd(s, w, fake), cwd=ROOT, env=dict(os.environ, FAKE_STEP_S='0.01'),
                              stdout=f, stderr=subprocess.STDOUT)
    try:
      _wait_for(lambda: '[seed-1_steps-40] waiting for' in out.read_text(), timeout=300)
      (run / 'gate').touch()
      assert second.wait(timeout=300) == 0, out.read_text()
    finally:
      second.kill()
  text = out.read_text()
  assert len(launches(run)) == 1 and 'finished elsewhere' in text, text
  assert [r['status'] for r in read_csv(w / 'results.csv')] == ['done', 'done']


def test_changed_settings_are_refused(tmp_path, fake):
  s = write_sweep(tmp_path, [1], steps=5)
  w = tmp_path / 'w'
  assert run_cli(*sweep_cmd(s, w, fake)).returncode == 0
  s2 = tmp_path / 's2.py'
  s2.write_text(open(s).read() + "COMMON = {'config.optim.peak_lr': 0.1}\n")
  p = run_cli(*sweep_cmd(str(s2), w, fake))
  assert p.returncode == 2 and 'other settings' in p.stderr and 'Traceback' not in p.stderr


def test_ray_backend_on_a_local_cluster(tmp_path, fake):
  pytest.importorskip('ray')
  s = write_sweep(tmp_path, [1, 13, 2, 3], steps=20)
  w = tmp_path / 'w'
  p = run_cli(*sweep_cmd(s, w, fake, '--backend=ray', '--ray_num_cpus=2'), env={'FAKE_STEP_S': '0.05'},
              timeout=300)
  assert p.returncode == 1, p.stdout + p.stderr
  assert "ray cluster: {" in p.stdout and "'CPU': 2.0" in p.stdout
  by = {r['name']: r for r in read_csv(w / 'results.csv')}
  assert [by[f'seed-{i}_steps-20']['status'] for i in (1, 13, 2, 3)] == ['done', 'failed', 'done', 'done']
  assert by['seed-13_steps-20']['exit_code'] == '3' and 'boom' in by['seed-13_steps-20']['log_tail']
  # Two 1-CPU tasks ran at once on the 2-CPU cluster: some launch happened while another run was going.
  spans = []
  for i in (1, 2, 3):
    d = w / f'seed-{i}_steps-20'
    t0 = float(launches(d)[0][2])
    spans.append((t0, os.path.getmtime(d / 'summary.json')))
  assert any(a[0] < b[0] < a[1] or b[0] < a[0] < b[1] for a in spans for b in spans if a != b)
  # Same resume semantics: a rerun on Ray launches nothing that finished.
  p = run_cli(*sweep_cmd(s, w, fake, '--backend=ray', '--ray_num_cpus=2', '--noretry_failed'), timeout=300)
  assert p.returncode == 1
  assert all(len(launches(w / n)) == 1 for n in by)
  # A run asking for resources the cluster lacks is a clear error, not a hang.
  s3 = tmp_path / 's3.py'
  s3.write_text(open(s).read() + "RESOURCES = {'CPU': 1, 'GPU': 1}\n")
  p = run_cli(*sweep_cmd(str(s3), tmp_path / 'w3', fake, '--backend=ray', '--ray_num_cpus=2'), timeout=300)
  assert p.returncode == 2 and 'GPU' in p.stderr and 'Traceback' not in p.stderr


def test_ctrl_c_stops_runs_cleanly_and_rerun_resumes(tmp_path, fake):
  s = write_sweep(tmp_path, [1, 2], steps=60)
  w = tmp_path / 'w'
  # Both runs hold at step 3 until signalled (they write 'paused'), so the SIGINT always finds them running.
  env = dict(os.environ, FAKE_STEP_S='0.01', FAKE_PAUSE_AT='3')
  cmd = sweep_cmd(s, w, fake, '--parallel=2')
  assert cmd[1:3] == ['-m', 'sktlm.cli']
  sweep = subprocess.Popen([cmd[0], '-c', WITH_DEFAULT_SIGINT, *cmd[3:]], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(lambda: (w / 'seed-1_steps-60' / 'paused').exists() and (w / 'seed-2_steps-60' / 'paused').exists(),
              timeout=120)
    sweep.send_signal(signal.SIGINT)
    out, _ = sweep.communicate(timeout=30)
  finally:
    sweep.kill()
  assert sweep.returncode == 130, out
  for n in ('seed-1_steps-60', 'seed-2_steps-60'):
    rec = json.load(open(w / n / 'sweep_run.json'))
    assert rec['attempts'][-1]['status'] == 'interrupted' and rec['attempts'][-1]['exit_code'] == 143
    pid = int(launches(w / n)[0][0])
    assert not os.path.exists(f'/proc/{pid}') or open(f'/proc/{pid}/stat').read().split()[2] == 'Z'
    assert not os.path.exists(w / n / 'sweep.lock')
  assert [r['status'] for r in read_csv(w / 'results.csv')] == ['interrupted', 'interrupted']
  p = run_cli(*sweep_cmd(s, w, fake, '--parallel=2'), env={'FAKE_STEP_S': '0.01'})
  assert p.returncode == 0, p.stdout + p.stderr
  for n in ('seed-1_steps-60', 'seed-2_steps-60'):
    starts = [int(x[1]) for x in launches(w / n)]
    assert len(starts) == 2 and starts[1] >= 3


def test_done_without_losses_is_relaunched_not_counted(tmp_path, fake):
  """A summary that says done without its losses (what a kill between the final checkpoint and the summary
  used to leave) is not a result: status and the runner agree (one rule), and the rerun completes it."""
  s = write_sweep(tmp_path, [1], steps=5)
  w = tmp_path / 'w'
  assert run_cli(*sweep_cmd(s, w, fake)).returncode == 0
  run = w / 'seed-1_steps-5'
  summary = json.load(open(run / 'summary.json'))
  for k in ('final_train_loss', 'final_eval_loss', 'best_eval_loss'):
    summary.pop(k)
  (run / 'summary.json').write_text(json.dumps(summary))
  p = run_cli(*sweep_cmd(s, w, fake, '--status'))
  assert p.returncode == 0 and 'done' not in p.stdout.split('seed-1_steps-5', 1)[1].split()[0], p.stdout
  p = run_cli(*sweep_cmd(s, w, fake))
  assert p.returncode == 0, p.stdout + p.stderr
  assert len(launches(run)) == 2  # relaunched; the fake resumes at its last step and writes the summary
  row = read_csv(w / 'results.csv')[0]
  assert row['status'] == 'done' and float(row['final_train_loss']) == pytest.approx(3.01)


RAY_SOCKETS = r'''
import json, os, sys
import psutil
from sktlm.sweep.ray_backend import RayBackend
RayBackend('', 0, 1, log=lambda *a: None)
import ray
from ray._common.usage import usage_lib
me = psutil.Process()
procs = [me] + me.children(recursive=True)
names = {p.pid: p.name() for p in procs}
listen = [(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind='inet')
          if c.status == psutil.CONN_LISTEN and c.pid in names]
print(json.dumps({'listen': listen, 'usage_stats': usage_lib.usage_stats_enabled(),
                  'env': os.environ.get('RAY_USAGE_STATS_ENABLED')}))
ray.shutdown()
'''


@pytest.mark.slow
def test_local_ray_cluster_listens_on_loopback_only_without_telemetry(tmp_path):
  """Every listening socket of the processes of the local cluster `--backend=ray` starts is on the loopback
  interface (before: gcs_server, raylet, agents and workers on 0.0.0.0 / :: and the external address), and
  usage-stats telemetry is off before ray.init."""
  pytest.importorskip('ray')
  pytest.importorskip('psutil')
  script = tmp_path / 'sockets.py'
  script.write_text(RAY_SOCKETS)
  p = run_cli(sys.executable, str(script), timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  names = {name for _, _, name in out['listen']}
  assert {'gcs_server', 'raylet'} <= names, out  # the servers were seen, so the check below means something
  assert all(ip in ('127.0.0.1', '::1', '::ffff:127.0.0.1') for ip, _, _ in out['listen']), out['listen']
  assert out['usage_stats'] is False and out['env'] == '0'


RAY_IMPORTED_FIRST = r'''
import json, os
os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None)  # Ray's default: the external address
import ray  # a notebook that imported Ray before sktlm: the variables Ray reads at import were not set
from sktlm.errors import UserError
from sktlm.sweep.ray_backend import RayBackend
try:
  RayBackend('', 0, 1, log=lambda *a: None)
  print(json.dumps({'refused': '', 'initialized': ray.is_initialized()}))
  ray.shutdown()
except UserError as e:
  print(json.dumps({'refused': str(e), 'initialized': ray.is_initialized()}))
'''


def test_local_ray_cluster_is_refused_when_ray_was_imported_first(tmp_path):
  """Ray takes "single node on loopback" from variables it reads at import: after an earlier `import ray`
  (before: servers on every interface and the external address) the local cluster is refused, before any
  Ray process starts, with one line saying what to set."""
  pytest.importorskip('ray')
  script = tmp_path / 'imported_first.py'
  script.write_text(RAY_IMPORTED_FIRST)
  p = run_cli(sys.executable, str(script), timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert 'Ray was imported before sktlm could keep its local cluster on 127.0.0.1' in out['refused'], out
  assert 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0' in out['refused'] and out['initialized'] is False

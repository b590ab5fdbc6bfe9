"""Storage faults (issue 21): a corrupt newest checkpoint, a chosen resume step, `sktlm doctor --deep`, and a
full disk during a checkpoint save, a record write and a sweep's results write.

Faults are real: checkpoint data files truncated to half (what a failing disk or a cut copy leaves), a small
tmpfs filled up (mounted in a private mount namespace, so nothing outlives the test), and writes that land on
/dev/full (the kernel's ENOSPC)."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, run_cli, train_config

from sktlm import files
from sktlm.errors import UserError
from sktlm.runfiles import steps_on_disk
from sktlm.sweep import results
from sktlm.train import loop

QUARANTINE, TMP_MARK = 'checkpoints.quarantine', '.orbax-checkpoint-tmp'  # documented names (docs/run_files.md)
NOISE = ('Traceback', 'never retrieved', 'Exception ignored', 'Event loop is closed')


def cfg(data_dir, **over):
  return train_config(data_dir, **{'train.log_every': 1, 'train.checkpoint_every': 2, 'train.eval_batches': 1,
                                   'metrics.peak_flops': 1e11, **over})


def cli_args(data_dir, workdir, steps, *extra):
  return ['train', '--config=experiments/lm.py:size=pico', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.data.seq_len=64', '--config.train.batch_size=8',
          f'--config.train.steps={steps}', '--config.train.checkpoint_every=2', '--config.train.log_every=1',
          '--config.train.eval_every=1000', '--config.train.eval_batches=1', '--config.optim.warmup_steps=5',
          '--config.metrics.tensorboard=False', '--config.metrics.peak_flops=1e11', *extra]


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """4 steps, checkpoints at steps 2 and 4 (copied by each test)."""
  wd = str(tmp_path_factory.mktemp('trained') / 'w')
  assert loop.run(cfg(data_dir, **{'train.steps': 4}), wd) == 0
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4]
  return wd


def copy(trained, tmp_path):
  wd = str(tmp_path / 'w')
  shutil.copytree(trained, wd)
  return wd


def listing(folder):
  return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns)


def truncate(step_dir):
  """Cuts every array data file of a checkpoint step to half its size; returns its file listing."""
  data = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  for n in os.listdir(data):
    p = os.path.join(data, n)
    os.truncate(p, os.path.getsize(p) // 2)
  return listing(step_dir)


def train_losses(workdir, attempt):
  recs = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in recs if r['kind'] == 'train' and r.get('attempt', 0) == attempt}


def test_corrupt_newest_checkpoint_is_quarantined_and_the_run_resumes_from_the_one_before(trained, data_dir,
                                                                                        tmp_path):
  wd = copy(trained, tmp_path)
  cut = truncate(os.path.join(wd, 'checkpoints', '4'))
  r = run_cli(*cli_args(data_dir, wd, 6), env={'XLA_FLAGS': ''})  # one device, as a user's run (its failed
  assert r.returncode == 0, r.stderr[-3000:]                       # read leaves the echoes to silence)
  said = [x for x in r.stdout.splitlines() if 'corrupt' in x]
  assert len(said) == 1, r.stdout
  assert 'checkpoint step 4 is corrupt' in said[0] and 'resuming from step 2' in said[0]
  q = os.path.join(wd, QUARANTINE, '4.corrupt')
  assert q in said[0] and listing(q) == cut  # moved whole, never deleted
  assert not [x for x in NOISE if x in r.stderr], r.stderr[-3000:]
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4, 6]
  # Resumed from step 2 with its data position: steps 3 and 4 repeat the first attempt's losses (to float32
  # reduction order: that attempt ran on 8 devices; another batch would differ by far more).
  first, second = train_losses(wd, 0), train_losses(wd, 1)
  assert sorted(second) == [3, 4, 5, 6]
  assert second[3] == pytest.approx(first[3], rel=1e-5) and second[4] == pytest.approx(first[4], rel=1e-5)
  assert json.load(open(os.path.join(wd, 'summary.json')))['status'] == 'done'


def test_when_no_checkpoint_restores_nothing_is_moved(trained, data_dir, tmp_path):
  """Every step failing alike is a config mismatch or a wholly bad disk, not one corrupt checkpoint."""
  wd = copy(trained, tmp_path)
  for step in ('2', '4'):
    truncate(os.path.join(wd, 'checkpoints', step))
  with pytest.raises(UserError, match=r'cannot restore checkpoint step 4 .*nor does any older one: 2'):
    loop.run(cfg(data_dir, **{'train.steps': 6}), wd)
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4] and not os.path.exists(os.path.join(wd, QUARANTINE))


def test_resume_step_restores_a_chosen_checkpoint_once(trained, data_dir, tmp_path, capsys):
  wd = copy(trained, tmp_path)
  before = listing(wd)
  with pytest.raises(UserError, match=r'train.resume_step=3: no checkpoint at step 3 .*\(has \[2, 4\]\)'):
    loop.run(cfg(data_dir, **{'train.steps': 4, 'train.resume_step': 3}), wd)
  assert listing(wd) == before  # a bad start writes nothing
  over = {'train.steps': 4, 'train.resume_step': 2}
  assert loop.run(cfg(data_dir, **over), wd) == 0
  out = capsys.readouterr().out
  assert f'checkpoint 4 moved to {os.path.join(wd, QUARANTINE, "4.after-2")}' in out and 'resumed from step 2' in out
  assert train_losses(wd, 1) == {3: train_losses(wd, 0)[3], 4: train_losses(wd, 0)[4]}
  # The same command again (a preempted job's restart) does not roll back a second time.
  assert loop.run(cfg(data_dir, **over), wd) == 0
  assert 'already finished' in capsys.readouterr().out
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4]


def test_doctor_deep_finds_a_corrupt_checkpoint_and_fix_quarantines_it(trained, tmp_path):
  wd = copy(trained, tmp_path)
  r = run_cli('doctor', wd)
  assert r.returncode == 0 and 'consistent' in r.stdout  # the shallow check sees folder names only
  cut = truncate(os.path.join(wd, 'checkpoints', '4'))
  r = run_cli('doctor', wd, '--deep')
  assert r.returncode == 1, r.stdout + r.stderr
  assert f'{wd}/checkpoints/4: corrupt checkpoint' in r.stdout and '/checkpoints/2:' not in r.stdout
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4]  # found, not moved without --fix
  r = run_cli('doctor', wd, '--deep', '--fix')
  assert '[fixed]' in r.stdout and 'latest checkpoint step 2 != summary step 4' in r.stdout, r.stdout
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2]
  assert listing(os.path.join(wd, QUARANTINE, '4.corrupt')) == cut
  assert not [x for x in NOISE if x in r.stderr], r.stderr[-3000:]


def test_full_disk_during_a_record_write_is_one_line(trained, data_dir, tmp_path, monkeypatch):
  """The metrics writer's file handle on /dev/full (once metrics.jsonl is read back): the attempt's first
  record hits the kernel's ENOSPC."""

  class FullDisk(loop.MetricsWriter):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      self._file.close()
      self._file = open('/dev/full', 'a', buffering=1)

  monkeypatch.setattr(loop, 'MetricsWriter', FullDisk)
  wd = copy(trained, tmp_path)
  with pytest.raises(UserError) as e:
    loop.run(cfg(data_dir, **{'train.steps': 6}), wd)
  msg = str(e.value)
  assert msg.startswith(f'cannot write {wd}/metrics.jsonl: No space left on device; '
                        f'last good checkpoint: step 4 in {wd}/checkpoints'), msg
  assert steps_on_disk(os.path.join(wd, 'checkpoints')) == [2, 4]
  assert not [p for p in os.listdir(os.path.join(wd, 'checkpoints')) if TMP_MARK in p]


def test_full_disk_during_a_results_write_keeps_the_earlier_results(tmp_path):
  """results.json's temp file on /dev/full (its name is this process's and thread's): ENOSPC at the write."""
  sweep = str(tmp_path)
  old = [{'name': 'a', 'status': 'done'}]
  results.write(old, sweep)
  before = {n: open(os.path.join(sweep, n)).read() for n in ('results.json', 'results.csv')}
  path = os.path.join(sweep, 'results.json')
  os.symlink('/dev/full', f'{path}{files.TMP_MARK}{os.getpid()}.{threading.get_ident()}')
  with pytest.raises(UserError, match=rf'cannot write {path}: No space left on device; the earlier '):
    results.write(old + [{'name': 'b', 'status': 'done'}], sweep)
  assert {n: open(os.path.join(sweep, n)).read() for n in ('results.json', 'results.csv')} == before
  assert sorted(os.listdir(sweep)) == ['results.csv', 'results.json']  # the temp file went


FULL_DISK = r'''
set -u
mount -t tmpfs -o size=16m tmpfs "$FS" || exit 90
cp -r "$SRC" "$FS/w"
avail=$(df -k --output=avail "$FS" | tail -1)
dd if=/dev/zero of="$FS/filler" bs=1k count=$((avail - 400)) 2>/dev/null
"$PY" -m sktlm.cli "$@" > "$OUT/1.out" 2> "$OUT/1.err"; echo $? > "$OUT/1.rc"
find "$FS/w" > "$OUT/1.files"
"$PY" -m sktlm.cli doctor "$FS/w" --deep > "$OUT/2.out" 2>&1; echo $? > "$OUT/2.rc"
rm "$FS/filler"
"$PY" -m sktlm.cli "$@" > "$OUT/3.out" 2> "$OUT/3.err"; echo $? > "$OUT/3.rc"
'''


def _mount_namespace() -> list[str]:
  """A private mount namespace to mount a tmpfs in: as root, or as a user mapped to root (user namespaces).
  Without either the test skips, which SKTLM_CI (conftest) turns into a failure."""
  for cmd in (['unshare', '-m'], ['unshare', '-rm']):
    try:
      if subprocess.run([*cmd, 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'], capture_output=True,
                        timeout=30).returncode == 0:
        return cmd
    except (OSError, subprocess.TimeoutExpired):
      pass
  pytest.skip('no mount namespace for a small tmpfs (needs root or unprivileged user namespaces)')


ONE_WORDING = r'''
set -u
mount -t tmpfs -o size=1m tmpfs "$FS" || exit 90
"$PY" - "$FS" "$CKPT" <<'PYEOF'
import sys
import numpy as np
import tensorstore as ts
from sktlm.errors import UserError
from sktlm.train.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[2], async_save=False)


def tensorstore_write():  # TensorStore's own error text: a zarr write that overfills the 1 MB tmpfs
  t = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': sys.argv[1] + '/a'}}, create=True,
              dtype=ts.float32, shape=[1 << 20]).result()
  t.write(np.random.default_rng(0).random(1 << 20, np.float32)).result()


def python_write():  # a Python OSError with a file name: the kernel's ENOSPC from /dev/full
  with open('/dev/full', 'w') as f:
    f.write('x' * 4096)


for write in (tensorstore_write, python_write):
  try:
    with ckpt._storage_errors(6):
      write()
  except UserError as e:
    print(e)
PYEOF
'''


def test_a_full_disk_reads_the_same_whichever_layer_raised_it(tmp_path):
  """During an async save either a Python write or TensorStore hits ENOSPC first (timing decides), and their
  errors word it differently ("[Errno 28] No space left on device: path" / "... [os_error_code='28']"): the
  user's line must not depend on which. Both real errors go through the save's error path here."""
  ns = _mount_namespace()
  fs = tmp_path / 'fs'
  fs.mkdir()
  env = dict(os.environ, FS=str(fs), CKPT=str(tmp_path / 'ckpt'), PY=sys.executable)
  r = subprocess.run([*ns, 'bash', '-c', ONE_WORDING], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  lines = r.stdout.splitlines()
  assert r.returncode == 0 and len(lines) == 2, (r.stdout, r.stderr[-3000:])
  want = (f'cannot write checkpoint step 6 to {tmp_path}/ckpt: No space left on device; no checkpoint was saved '
          'before (free space and rerun the same command to resume)')
  assert lines == [want, want]


def test_full_disk_during_a_checkpoint_save(trained, data_dir, tmp_path):
  """A 16 MB tmpfs with 400 KB left: the step-6 save (1.7 MB) fails; then space is freed and the run resumes."""
  ns = _mount_namespace()
  fs, out = tmp_path / 'fs', tmp_path / 'out'
  fs.mkdir()
  out.mkdir()
  env = dict(os.environ, FS=str(fs), SRC=trained, OUT=str(out), PY=sys.executable)
  args = cli_args(data_dir, f'{fs}/w', 6)
  subprocess.run([*ns, 'bash', '-c', FULL_DISK, 'full_disk', *args], cwd=ROOT, env=env, timeout=900, check=True)
  rc, err = int((out / '1.rc').read_text()), (out / '1.err').read_text()
  lines = [x for x in err.splitlines() if x.startswith('sktlm train: error')]
  assert rc == 2 and len(lines) == 1, err[-3000:]
  assert lines[0] == (f'sktlm train: error: cannot write checkpoint step 6 to {fs}/w/checkpoints: No space left '
                      f'on device; last good checkpoint: step 4 in {fs}/w/checkpoints (free space and rerun the '
                      'same command to resume)')
  assert not [x for x in NOISE if x in err], err[-3000:]
  left = (out / '1.files').read_text()
  assert TMP_MARK not in left and f'{fs}/w/checkpoints/2\n' in left and f'{fs}/w/checkpoints/4\n' in left
  assert (out / '2.rc').read_text().strip() == '0', (out / '2.out').read_text()  # 2 and 4 read back in full
  assert (out / '3.rc').read_text().strip() == '0', (out / '3.err').read_text()[-3000:]
  assert 'resumed from step 4' in (out / '3.out').read_text()

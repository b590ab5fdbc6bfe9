"""What a run leaves in its workdir W, and how it is read: the file names, the statuses, the summary's fields and
its checks, the readers (with their fallbacks for files older versions wrote), and `finished`.

Training writes through this module; the sweep, `sktlm scaling`, `sktlm doctor` and the tools read through it,
so no other module spells a run file's name or a status. The fields are documented in docs/run_files.md. A leaf
(stdlib and sktlm.files only): reading a run never imports training.
"""

from __future__ import annotations

import json
import math
import os
import shutil

from sktlm import files

# -- names, relative to W
CONFIG = 'config.json'            # the resolved config, written once every check has passed
TOKENIZER = 'tokenizer.json'      # the tokenizer's spec and fingerprint (a restart with another is refused)
METRICS = 'metrics.jsonl'         # one record per logged step, eval and rollback, appended
SUMMARY = 'summary.json'          # written when the run ends, whatever the end
CHECKPOINTS = 'checkpoints'       # Orbax: one folder per saved step
QUARANTINE = 'checkpoints.quarantine'  # beside CHECKPOINTS, so Orbax never lists or prunes it
CHECKPOINT_TMP_MARK = '.orbax-checkpoint-tmp'  # '<step>.orbax-checkpoint-tmp*': a save killed midway
RESUMED_AT = 'resume_step.json'   # a train.resume_step already honoured: rerunning the same command resumes
TENSORBOARD = 'tb'
EVALS = 'evals'                   # `sktlm eval`'s records, EVALS/<name>.json
# What the sweep keeps in a run's folder besides what `sktlm train` writes.
SWEEP_LOCK = 'sweep.lock'         # while a process runs it
SWEEP_RECORD = 'sweep_run.json'   # settings and one record per attempt
SWEEP_LOG = 'train.log'           # stdout + stderr of every attempt, appended
MARKERS = (CONFIG, SUMMARY, CHECKPOINTS, SWEEP_RECORD, SWEEP_LOCK)  # any one makes a folder a run's
ACTIVITY = (SWEEP_LOG, METRICS)   # files that grow while a run trains

# -- statuses. A summary's (train writes them):
RUNNING = 'running'
DONE = 'done'
FAILED = 'failed'
DIVERGED = 'diverged'
PREEMPTED = 'preempted'           # stopped by a signal after saving a checkpoint: a rerun resumes
# The sweep's view of a run besides those (sweep_run.json attempts, results rows):
PENDING = 'pending'               # not started, or to be started again
INTERRUPTED = 'interrupted'       # stopped by the sweep (or a signal) before it ended
LOCKED = 'locked'                 # another process held its lock past the sweep's --lock_timeout
BLOCKED = 'blocked'               # a branch whose parent ended before the branch's step
TERMINAL = (DONE, DIVERGED)       # a run that ended so is never started again

# -- summary.json: every field train writes (docs/run_files.md); ALWAYS: present in every summary.
SUMMARY_FIELDS = ('status', 'message', 'step', 'steps', 'tokens', 'attempts', 'final_train_loss', 'final_eval_loss',
                  'best_eval_loss', 'eval_batches', 'wall_time_s', 'tokens_per_s', 'mfu', 'compile_time_s',
                  'peak_flops', 'peak_source', 'params', 'flops_per_token', 'flops', 'rollbacks', 'seq_len',
                  'batch_size', 'moe', 'moe_dropped_frac')
OPTIONAL = ('message', 'final_train_loss', 'final_eval_loss', 'best_eval_loss', 'moe_dropped_frac')
ALWAYS = tuple(f for f in SUMMARY_FIELDS if f not in OPTIONAL)


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def read(workdir: str, name: str):
  """The parsed JSON file `name` of the run, or None if it is missing or unreadable."""
  return files.read_json(path(workdir, name))


def load(workdir: str, name: str):
  """The parsed JSON file `name`; raises OSError or ValueError, for callers that word their own message."""
  with open(path(workdir, name)) as f:
    return json.load(f)


def write(workdir: str, name: str, obj) -> None:
  """Atomic and durable (sktlm.files): a reader or a kill sees the old file or the new one."""
  files.write_json(path(workdir, name), obj)


def read_summary(workdir: str) -> dict | None:
  return read(workdir, SUMMARY)


def write_summary(workdir: str, summary: dict) -> None:
  write(workdir, SUMMARY, summary)


# -- what a summary says

def finite(v) -> bool:
  """A finite number (not a bool, not a 'nan' string)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summary_problems(s: dict | None) -> list[str]:
  """Why a summary.json that says done is not a complete result ([] when it is, or is not done)."""
  if not s or s.get('status') != DONE:
    return []
  out = []
  if s.get('step') != s.get('steps'):
    out.append(f"step {s.get('step')} != steps {s.get('steps')}")
  keys = ['final_train_loss'] + (['final_eval_loss', 'best_eval_loss'] if s.get('eval_batches', 1) else [])
  out += [f'{k} missing' for k in keys if not finite(s.get(k))]
  return out


def finished(s: dict | None) -> str:
  """'done' / 'diverged' for a finished run's summary ('' otherwise; a done summary without its losses,
  left by a kill between the last checkpoint and the summary, is not finished: train completes it)."""
  status = (s or {}).get('status')
  if status == DIVERGED or (status == DONE and not summary_problems(s)):
    return status
  return ''


def summary_flops(s: dict) -> dict:
  """Total training FLOPs of a summary, {'6N', 'model', 'executed'} (None where absent). Older summaries name
  the model count 'exact', and the oldest keep top-level flops_6n / flops_model / flops_executed."""
  flops = s.get('flops') or {}
  out = {'6N': flops.get('6N'), 'model': flops.get('model', flops.get('exact')), 'executed': flops.get('executed')}
  for key, old in (('6N', 'flops_6n'), ('model', 'flops_model'), ('executed', 'flops_executed')):
    if out[key] is None:
      out[key] = s.get(old)
  return out


# -- metrics.jsonl

def read_metrics(workdir: str) -> list[dict]:
  """Every well-formed record (a line cut by a kill is skipped)."""
  return files.read_jsonl(path(workdir, METRICS))


def last_records(workdir: str, kinds=('train', 'eval')) -> dict[tuple[str, int], dict] | None:
  """The last record per (kind, step) of metrics.jsonl (a resumed run repeats the steps after its last
  checkpoint), or None if the run has no metrics.jsonl."""
  p = path(workdir, METRICS)
  if not workdir or not os.path.isfile(p):
    return None
  last = {}
  for rec in files.read_jsonl(p):
    if rec.get('kind') in kinds and 'step' in rec:
      last[(rec['kind'], int(rec['step']))] = rec
  return last


def latest_records(workdir: str, max_bytes: int = 65536) -> dict:
  """{'train': the newest train record, 'eval': the newest eval record} (either may be absent), read from the
  file's last `max_bytes` only: cheap enough to poll while the run writes."""
  out: dict = {}
  try:
    with open(path(workdir, METRICS), 'rb') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - max_bytes))
      lines = f.read().decode('utf-8', errors='replace').splitlines()
  except OSError:
    return out
  for line in reversed(lines):
    try:
      rec = json.loads(line)
    except ValueError:
      continue  # a partial first line of the tail, or a line being written
    kind = rec.get('kind')
    if kind in ('train', 'eval') and kind not in out:
      out[kind] = rec
    if len(out) == 2:
      break
  return out


def record_flops(rec: dict):
  """Cumulative model FLOPs (the exact count) of a metrics record: `flops_model`, or `flops` in older records."""
  return rec.get('flops_model', rec.get('flops'))


# -- evals/<name>.json

def eval_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, EVALS, f'{name}.json')


def read_eval(workdir: str, name: str) -> dict | None:
  rec = files.read_json(eval_path(workdir, name))
  return rec if isinstance(rec, dict) else None


# -- checkpoints/ (folder names only: no Orbax, nothing created)

def checkpoints_dir(workdir: str) -> str:
  return path(workdir, CHECKPOINTS)


def steps_on_disk(directory: str) -> list[int]:
  """Finished checkpoint steps in a checkpoints folder, from its folder names (Orbax renames a finished save
  from its temp name to '<step>' atomically)."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  except OSError:
    return []


def has_checkpoint(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(checkpoints_dir(workdir), str(step)))


def checkpoint_tmp_folders(directory: str) -> list[str]:
  """Folders of saves that never finished (a kill during an async save)."""
  try:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if CHECKPOINT_TMP_MARK in n)
  except OSError:
    return []


def remove_checkpoint_tmp_folders(directory: str) -> list[str]:
  gone = checkpoint_tmp_folders(directory)
  for p in gone:
    shutil.rmtree(p, ignore_errors=True)
  return gone


def quarantine_dir(directory: str) -> str:
  """The quarantine beside a checkpoints folder."""
  return os.path.join(os.path.dirname(os.path.abspath(directory)), QUARANTINE)


def quarantine(directory: str, step: int, why: str) -> str:
  """Moves `directory/step` to `<workdir>/checkpoints.quarantine/<step>.<why>[.n]` (never deletes); returns it."""
  qdir = quarantine_dir(directory)
  os.makedirs(qdir, exist_ok=True)
  dest, n = os.path.join(qdir, f'{step}.{why}'), 1
  while os.path.exists(dest):
    dest, n = os.path.join(qdir, f'{step}.{why}.{n}'), n + 1
  os.rename(os.path.join(directory, str(step)), dest)
  return dest

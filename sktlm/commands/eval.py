"""`sktlm eval --workdir=RUN [--step=K] [--data.name=NAME --data.path=... --data.data_dir=...] [--split=validation]
[--max_batches=0] [--name=NAME]`

Loss (nats/token), perplexity and bits per UTF-8 byte of a checkpoint on one pass over a split of any prepared
dataset or text folder (default: the run's own data), with the run's tokenizer and seq_len. Writes
RUN/evals/<name>.json (docs/run_files.md); `sktlm scaling SWEEP --loss=eval:<name>` fits on it.
"""

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (config.json + checkpoints/)')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step (-1: latest)')
_NAME = flags.DEFINE_string('name', '', 'record name: RUN/evals/<name>.json (default: the dataset name, or the '
                            'text folder name)')
_SPLIT = flags.DEFINE_string('split', 'validation', 'validation | train')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', 0, 'evaluate at most this many batches (0: the whole split)')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'rows per batch (0: the run\'s train.batch_size)')
_DATA = {k: flags.DEFINE_string(f'data.{k}', None, f'override the run\'s config.data.{k}')
         for k in ('name', 'path', 'data_dir', 'text_field')}


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise UserError('--workdir=RUN is required')
  if _MAX_BATCHES.value < 0 or _BATCH.value < 0:
    raise UserError('--max_batches and --batch_size must be >= 0')
  import re
  import sys

  from sktlm.tools import evaluate, runs
  if _NAME.value and not re.fullmatch(r'[A-Za-z0-9_.-]+', _NAME.value):
    raise UserError(f'--name={_NAME.value!r}: use letters, digits, _ . -')
  cfg = runs.read_config(_WORKDIR.value)
  data_cfg = cfg.data
  for k, flag in _DATA.items():
    if flag.value is not None:
      data_cfg[k] = flag.value
  if data_cfg.name == 'text_files' and not data_cfg.path:
    raise UserError('--data.name=text_files needs --data.path=FOLDER|GLOB|FILE')
  mesh_cfg = dict(cfg.mesh)
  if -1 not in mesh_cfg.values():
    mesh_cfg['data'] = -1  # fill this machine's devices
  run = runs.load(_WORKDIR.value, _STEP.value, mesh_cfg=mesh_cfg, batch_size=_BATCH.value or None)
  tty = sys.stderr.isatty()
  progress = (lambda k, n: print(f'\r  batch {k}/{n}', end='', file=sys.stderr, flush=True)) if tty else None
  rec = evaluate.evaluate(run, data_cfg, split=_SPLIT.value, max_batches=_MAX_BATCHES.value, progress=progress)
  if tty:
    print(file=sys.stderr)
  rec['name'] = _NAME.value or rec['name']
  path = evaluate.write_record(_WORKDIR.value, rec)
  print(f'{rec["name"]} ({_SPLIT.value}, {rec["tokens"]:,} tokens, {rec["bytes"]:,} bytes) at step {rec["step"]}: '
        f'loss {rec["loss"]:.4f} nats/token, ppl {rec["ppl"]:.3f}, {rec["bpb"]:.4f} bits/byte -> {path}')
  return 0

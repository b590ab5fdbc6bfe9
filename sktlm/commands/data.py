"""`sktlm data prepare NAME [--config=...] [--data_dir=...]` and `sktlm data info --config=...`.

prepare: builds the stdlib / text_files corpus, or downloads and prepares a TFDS catalog dataset as
array_record (the only command that may download). info: documents and tokens per split.
"""

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg] (uses config.data)',
                                          lock_config=True)
_STRICT = flags.DEFINE_bool('strict', None, 'fail the build if any file or .jsonl line would be skipped '
                            '(default: config.data.strict; skipped input is counted and reported)')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: config.data.data_dir, '
                                '$SKTLM_DATA_DIR or ~/.cache/sktlm/tfds)')

USAGE = 'usage: sktlm data prepare [NAME] [--config=...] [--data_dir=...] | sktlm data info --config=...'


def _data_config(name: str | None):
  from sktlm.config import schema
  data_cfg = schema.get_config().data if _CONFIG.value is None else _CONFIG.value.data
  data_cfg = data_cfg.copy_and_resolve_references()
  if name:
    data_cfg.name = name
  if _DATA_DIR.value is not None:
    data_cfg.data_dir = _DATA_DIR.value
  if _STRICT.value is not None:
    with data_cfg.unlocked():
      data_cfg.strict = _STRICT.value
  return data_cfg


def main(argv):
  from sktlm.errors import UserError
  args = argv[1:]
  if not args or args[0] not in ('prepare', 'info'):
    raise UserError(USAGE)
  cmd, rest = args[0], args[1:]
  if len(rest) > 1 or (cmd == 'info' and rest):
    raise UserError(f'unexpected arguments: {" ".join(rest)}; {USAGE}')
  if cmd == 'prepare' and not rest and _CONFIG.value is None:
    raise UserError(f'name a dataset or pass --config; {USAGE}')
  data_cfg = _data_config(rest[0] if rest else None)
  from sktlm import data
  if cmd == 'prepare':
    secs = data.prepare(data_cfg, allow_download=True)
    print(f'prepared in {secs:.1f}s (0: was ready); indexing with tokenizer {data_cfg.tokenizer}')
  out = data.info(data_cfg)  # also builds the per-document length index the pipeline needs
  print(f"dataset    {out['dataset']}  ({out['dataset_dir']})")
  print(f"tokenizer  {out['tokenizer']}  vocab_size={out['vocab_size']}  seq_len={data_cfg.seq_len}")
  for split, s in out['splits'].items():
    print(f"{split:<10} {s['documents']:>10,} docs {s['tokens']:>14,} tokens {s['rows']:>10,} rows")
  if cmd == 'prepare':
    print(f"ready in {out['dataset_dir']}")
  return 0

"""`sktlm tokenizer train --config=... --vocab_size=8192 --out=PATH` and `sktlm tokenizer info PATH`.

train: fits a lossless SentencePiece model (BPE by default) on the configured corpus's train split.
"""

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg] (uses config.data)',
                                          lock_config=True)
_VOCAB = flags.DEFINE_integer('vocab_size', 8192, 'SentencePiece vocabulary size')
_OUT = flags.DEFINE_string('out', None, 'output .model path')
_MODEL_TYPE = flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'SentencePiece model type')
_MAX_DOCS = flags.DEFINE_integer('max_docs', 0, 'train on at most this many documents (0: all)')

USAGE = ('usage: sktlm tokenizer train --config=... --vocab_size=8192 --out=PATH.model | '
         'sktlm tokenizer info PATH.model')


def main(argv):
  from sktlm.errors import UserError
  args = argv[1:]
  if not args or args[0] not in ('train', 'info'):
    raise UserError(USAGE)
  from sktlm.data import tokenizers
  if args[0] == 'info':
    if len(args) != 2:
      raise UserError(USAGE)
    tok = tokenizers.get_tokenizer(args[1])
    print(f'{tok.path}: vocab_size={tok.vocab_size} pad={tok.pad_id} bos={tok.bos_id} eos={tok.eos_id} '
          f'sha256={tok.fingerprint}')
    return 0
  if len(args) > 1:
    raise UserError(f'unexpected arguments: {" ".join(args[1:])}')
  if not _OUT.value:
    raise UserError('--out=PATH.model is required')
  from sktlm import data
  from sktlm.config import schema
  data_cfg = schema.get_config().data if _CONFIG.value is None else _CONFIG.value.data
  import time
  t0 = time.perf_counter()
  tok = tokenizers.train_sentencepiece(data.iter_texts(data_cfg, 'train', max_docs=_MAX_DOCS.value),
                                       _OUT.value, _VOCAB.value, model_type=_MODEL_TYPE.value)
  print(f'wrote {tok.path} (vocab_size={tok.vocab_size}, {time.perf_counter() - t0:.1f}s); use it with '
        f'--config.data.tokenizer={tok.path}')
  return 0

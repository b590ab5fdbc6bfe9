"""Dense Llama-style decoder LM on the embedded corpus.

  sktlm train --config=experiments/lm.py:size=tiny --workdir=runs/tiny
  sktlm train --config=experiments/lm.py:size=small,runlocal --workdir=/tmp/debug

Arguments: size=<name from sktlm.config.sizes.SIZES>, runlocal (tiny debug run: few steps, small batch).
"""

import ml_collections

from sktlm.config import load, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = load.parse_arg(arg, size='tiny', runlocal=False)
  config = schema.get_config(arg.size)
  if arg.runlocal:
    config.train.steps = 20
    config.train.batch_size = 4
    config.train.log_every = 1
    config.train.eval_every = 10
    config.train.eval_batches = 2
    config.train.checkpoint_every = 10
    config.optim.warmup_steps = 5
    config.data.seq_len = 64

  config.lock()
  return config

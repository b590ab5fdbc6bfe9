"""`sktlm sample --workdir=RUN [--step=K] (--prompt=TEXT | --prompt_file=F) [--max_new_tokens=N] [--temperature=T]
[--top_k=K] [--top_p=P] [--seed=S] [--num_samples=B]`

Generates from a checkpoint with a jitted prefill and a KV-cached decode loop (sktlm/tools/decode.py), on the run's
mesh rules; stops a sample at end of document. Prints each sample (prompt + continuation) and tokens/s of the
prefill and the decode loop (compile time excluded, reported apart).
"""

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (config.json + checkpoints/)')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step (-1: latest)')
_PROMPT = flags.DEFINE_string('prompt', None, 'prompt text')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'read the prompt from this file')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'tokens to generate at most per sample')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'softmax temperature (0: greedy)')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0: off)')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'nucleus sampling: smallest set with this probability mass (1: off)')
_SEED = flags.DEFINE_integer('seed', 0, 'sampling seed')
_NUM = flags.DEFINE_integer('num_samples', 1, 'samples generated together (one batch)')


def _check_flags():
  from sktlm.errors import UserError
  if not _WORKDIR.value:
    raise UserError('--workdir=RUN is required')
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise UserError('give exactly one of --prompt=TEXT or --prompt_file=FILE')
  if _MAX_NEW.value < 1 or _NUM.value < 1:
    raise UserError('--max_new_tokens and --num_samples must be >= 1')
  if _TEMPERATURE.value < 0 or _TOP_K.value < 0 or not 0 < _TOP_P.value <= 1:
    raise UserError('need --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1')
  if _PROMPT_FILE.value is None:
    return _PROMPT.value
  try:
    with open(_PROMPT_FILE.value, encoding='utf-8') as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read --prompt_file: {e}') from None


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  prompt = _check_flags()
  import jax
  import numpy as np

  from sktlm.tools import decode, runs
  cfg = runs.read_config(_WORKDIR.value)
  mesh_cfg = dict(cfg.mesh)
  if -1 not in mesh_cfg.values():
    mesh_cfg['data'] = -1  # fill this machine's devices (samples are replicated over data)
  run = runs.load(_WORKDIR.value, _STEP.value, mesh_cfg=mesh_cfg)
  tok = run.tokenizer
  ids = [tok.bos_id] + tok.encode(prompt)  # documents start with bos, as in training
  opts = decode.SamplingOptions(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                top_p=_TOP_P.value, vocab_limit=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id)
  sampler = decode.Sampler(run.config.model, _NUM.value, len(ids), opts, run.setup.mesh, run.setup.rules)
  timings = {}
  prompt_BxP = np.tile(np.asarray(ids, np.int32), (_NUM.value, 1))
  toks, lengths, _ = sampler(run.params, prompt_BxP, jax.random.PRNGKey(_SEED.value), timings,
                            model_state=run.state.model_state)  # MoE routing biases, as trained
  for b in range(_NUM.value):
    n = int(lengths[b])
    ended = n and int(toks[b, n - 1]) == tok.eos_id
    print(f'--- sample {b + 1} ({n} tokens{", end of document" if ended else ""})')
    print(prompt + tok.decode(toks[b, :n]))
  t = timings
  print(f'--- {run.workdir} step {run.step}: prefill {t["prefill_tokens"]} tokens in {t["prefill_s"] * 1e3:.1f} ms '
        f'({t["prefill_tokens"] / max(t["prefill_s"], 1e-9):,.0f} tok/s); decode {t["decode_tokens"]} tokens in '
        f'{t["decode_s"] * 1e3:.1f} ms ({t["decode_tokens"] / max(t["decode_s"], 1e-9):,.0f} tok/s); '
        f'compile {t["compile_s"]:.1f} s; mesh {dict(run.setup.mesh.shape)}')
  return 0

"""`sktlm export --workdir=RUN [--step=K] --out=DIR [--max_shard_gib=2]`

Writes a Hugging Face model folder that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as
LlamaForCausalLM (dense GQA models) or DeepseekV3ForCausalLM (MLA and MLA + MoE models, with the aux-free routing
bias as e_score_correction_bias), float32 safetensors (sharded with an index above --max_shard_gib),
generation_config.json and the tokenizer (AutoTokenizer). Anything the target cannot compute exactly is refused
in one line. See sktlm/interop/hf.py (the folder), llama.py, deepseek.py and rope.py.
"""

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (config.json + checkpoints/)')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step (-1: latest)')
_OUT = flags.DEFINE_string('out', None, 'output folder (created; existing model files are overwritten)')
_MAX_SHARD = flags.DEFINE_float('max_shard_gib', 2.0, 'largest safetensors file; above it the weights are sharded')


def main(argv):
  from sktlm.errors import UserError
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUT.value:
    raise UserError('--workdir=RUN and --out=DIR are required')
  if not _MAX_SHARD.value > 0:
    raise UserError(f'--max_shard_gib must be > 0, got {_MAX_SHARD.value}')
  import os
  import time

  import jax

  from sktlm.interop import hf
  from sktlm.tools import runs
  t0 = time.perf_counter()
  hf.check_exportable(runs.read_config(_WORKDIR.value).model)  # before restoring anything
  run = runs.load(_WORKDIR.value, _STEP.value, mesh_cfg=runs.single_device_mesh())
  params = jax.device_get(run.params)
  files = hf.write_folder(_OUT.value, run.config.model, params, max_position_embeddings=run.config.data.seq_len,
                          tokenizer=run.tokenizer, max_shard_bytes=int(_MAX_SHARD.value * 1024**3),
                          model_state=jax.device_get(run.state.model_state))
  size = sum(os.path.getsize(os.path.join(_OUT.value, f)) for f in files)
  arch = 'DeepseekV3ForCausalLM' if hf.is_deepseek(run.config.model) else 'LlamaForCausalLM'
  print(f'exported {_WORKDIR.value} step {run.step} -> {_OUT.value} ({len(files)} files, {hf.human_bytes(size)}, '
        f'{time.perf_counter() - t0:.1f}s): {arch}, vocab {run.config.model.vocab_size} '
        f'(tokenizer {run.tokenizer.vocab_size}, padding rows kept)')
  return 0

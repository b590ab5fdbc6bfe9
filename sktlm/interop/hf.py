"""Hugging Face interop: sktlm params <-> a Hugging Face model folder (config.json, safetensors,
generation_config.json, tokenizer files), as `LlamaForCausalLM` (dense grouped-query models:
sktlm/interop/llama.py) or `DeepseekV3ForCausalLM` (MLA and MLA + MoE models: sktlm/interop/deepseek.py). This
module picks the format and reads and writes the folder, with numpy and safetensors (neither jax, torch nor
transformers is imported); `read_params` returns numpy trees, which sktlm/train/init_hf.py places into a train
state for `train.init_from_hf`.

What a format maps comes from the model's layout (sktlm/config/layout.py) and each model key's export rule in
the schema (sktlm/config/schema.py, interop/rules.py); RoPE in every form transformers reads: interop/rope.py.
Anything the format would compute differently is refused in one line, never exported approximately. The padded
vocabulary is kept: the model softmaxes over all `vocab_size` rows, padding included (config.json says so under
`sktlm`).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from sktlm.config import layout
from sktlm.errors import UserError
from sktlm.interop import deepseek, llama, rules

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


def as_dict(mc) -> dict:
  """config.model (ConfigDict, FrozenConfigDict or dict) as a plain dict."""
  return mc.to_dict() if hasattr(mc, 'to_dict') else dict(mc)


def is_deepseek(mc) -> bool:
  """MLA (with or without MoE) and MoE models map to DeepseekV3ForCausalLM, dense GQA ones to Llama."""
  mc = rules.model_config(mc)
  return layout.is_mla(mc) or layout.moe_of(mc) is not None


def _format(mc):
  return deepseek if is_deepseek(mc) else llama


def check_exportable(mc) -> None:
  """UserError naming what LlamaForCausalLM (or, for MLA / MoE, DeepseekV3ForCausalLM) cannot represent
  exactly; `mc` is config.model."""
  _format(mc).check_exportable(mc)


def hf_config(mc, *, max_position_embeddings: int, tokenizer_vocab_size: int, bos_id: int = 1,
              eos_id: int = 2, pad_id: int = 0) -> dict:
  """config.json of the LlamaForCausalLM (DeepseekV3ForCausalLM) that computes what sktlm's model `mc`
  computes (float32)."""
  fmt = _format(mc)
  mc = rules.model_config(mc)
  return {**fmt.hf_config(mc, max_position_embeddings=max_position_embeddings),
          'initializer_range': float(mc.init_std), 'bos_token_id': bos_id, 'eos_token_id': eos_id,
          'pad_token_id': pad_id, 'use_cache': True, 'dtype': 'float32',
          'sktlm': _sktlm_note(mc, tokenizer_vocab_size, rules.mapped(mc, fmt.FORMAT))}


def _sktlm_note(mc, tokenizer_vocab_size: int, keys: dict) -> dict:
  return {
      'vocab_padding': f'ids {tokenizer_vocab_size}..{int(mc.vocab_size) - 1} are padding rows that no '
                       'token uses; they are kept (the model softmaxes over all vocab_size logits, as in '
                       'training), so mask them when sampling',
      'tokenizer_vocab_size': int(tokenizer_vocab_size),
      'model': keys,
  }


def to_hf_tensors(mc, params, model_state=None) -> dict[str, np.ndarray]:
  """HF tensor name -> float32 array (numpy), from sktlm params (numpy or jax arrays, any float dtype); SP weights
  (write_folder folds a muP model's multipliers in first). model_state: the train state's (MoE routing biases,
  exported as DeepSeek-V3's e_score_correction_bias)."""
  if is_deepseek(mc):
    return deepseek.to_hf_tensors(mc, params, model_state)
  return llama.to_hf_tensors(mc, params)


def from_hf_tensors(mc, tensors: dict[str, np.ndarray]) -> dict:
  """sktlm params of a Llama checkpoint (float32 numpy, the layout of model.scan_layers); a DeepSeek-V3 one:
  deepseek.from_hf_tensors (params and model_state)."""
  return llama.from_hf_tensors(mc, tensors)


def check_importable(mc, cfg: dict) -> None:
  """UserError unless the HF config describes exactly sktlm's model `mc` (shapes and function)."""
  if cfg.get('model_type') == 'deepseek_v3':
    return deepseek.check_importable(mc, cfg)
  if cfg.get('model_type') != 'llama':
    raise UserError(f"HF checkpoint is a {cfg.get('model_type')!r} model; only 'llama' and 'deepseek_v3' can be "
                    'imported')
  return llama.check_importable(mc, cfg)


def read_params(mc, path: str) -> tuple[dict, dict]:
  """(params, model_state) as numpy trees from the HF folder `path` (Llama or DeepSeek-V3), for config.model
  `mc`; UserError when the checkpoint's shapes or function differ from it. sktlm/train/init_hf.py places them
  into a train state for `train.init_from_hf`."""
  cfg, tensors = read_folder(path)
  check_importable(mc, cfg)
  if cfg.get('model_type') == 'deepseek_v3':
    return deepseek.from_hf_tensors(as_dict(mc), tensors)
  return from_hf_tensors(mc, tensors), {}


# --- the folder on disk ---

def write_weights(out: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
  """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json above the limit."""
  from safetensors.numpy import save_file
  meta = {'format': 'pt'}
  total = sum(v.nbytes for v in tensors.values())
  if total <= max_shard_bytes:
    save_file(tensors, os.path.join(out, WEIGHTS), metadata=meta)
    return [WEIGHTS]
  shards, cur, size = [], {}, 0
  for name, arr in tensors.items():
    if cur and size + arr.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name] = arr
    size += arr.nbytes
  shards.append(cur)
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(out, fname), metadata=meta)
    names.append(fname)
    weight_map.update({k: fname for k in shard})
  _write_json(os.path.join(out, INDEX), {'metadata': {'total_size': total}, 'weight_map': weight_map})
  return names


def read_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) of an HF model folder on disk (single or sharded safetensors)."""
  from safetensors.numpy import load_file
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isfile(cfg_path):
    raise UserError(f'{path}: not a Hugging Face model folder (no config.json)')
  with open(cfg_path) as f:
    cfg = json.load(f)
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif os.path.isfile(os.path.join(path, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise UserError(f'{path}: no {WEIGHTS} or {INDEX} (only safetensors checkpoints can be imported)')
  tensors = {}
  for fname in files:
    tensors.update(load_file(os.path.join(path, fname)))
  return cfg, tensors


def write_folder(out: str, mc, params, *, max_position_embeddings: int, tokenizer,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, model_state=None) -> list[str]:
  """Writes config.json, weights, generation_config.json and the tokenizer files; returns the file names.
  model_state: the train state's (MoE routing biases)."""
  from sktlm.data import hf_tokenizer
  from sktlm.model import mup
  mc = rules.model_config(mc)
  if mup.is_mup(mc):  # LlamaForCausalLM computes SP attention and logits: fold muP's multipliers into the weights
    params = mup.to_sp_params(params, mc)  # (a one-line UserError for tied embeddings, which cannot be folded)
    mc.parametrization = 'sp'
  cfg = hf_config(mc, max_position_embeddings=max_position_embeddings, tokenizer_vocab_size=tokenizer.vocab_size,
                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  tensors = to_hf_tensors(mc, params, model_state)
  os.makedirs(out, exist_ok=True)
  files = write_weights(out, tensors, max_shard_bytes)
  _write_json(os.path.join(out, 'config.json'), cfg)
  _write_json(os.path.join(out, 'generation_config.json'),
              {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id, 'pad_token_id': tokenizer.pad_id,
               'do_sample': False,
               # the padding rows of the vocab are never real tokens
               'suppress_tokens': list(range(tokenizer.vocab_size, int(mc.vocab_size)))})
  files += hf_tokenizer.export(tokenizer, out)
  return ['config.json', 'generation_config.json'] + files


def _write_json(path: str, obj) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')


def human_bytes(n: float) -> str:
  units = ('B', 'KiB', 'MiB', 'GiB', 'TiB')
  i = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
  return f'{n / 1024**i:.1f} {units[i]}'

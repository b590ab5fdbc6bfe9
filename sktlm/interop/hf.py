"""Hugging Face interop: sktlm params <-> a `LlamaForCausalLM` folder (dense GQA models) or a
`DeepseekV3ForCausalLM` folder (MLA and MLA + MoE models: sktlm/interop/deepseek.py), each with config.json,
safetensors and generation_config.json. numpy + safetensors: neither jax, torch nor transformers is imported
(`read_params` returns numpy trees; sktlm/train/init_hf.py places them for `train.init_from_hf`).

Layouts. sktlm keeps wq [D, H, K], wk / wv [D, G, K], wo [H, K, D], wi_gate / wi_up [D, F], mlp wo [F, D],
embedding [V, D], head [D, V]; a torch Linear weight is [out, in], so every matrix is reshaped to 2-D and
transposed (q_proj = wq.reshape(D, H K).T, ...). RoPE: both rotate the two halves (x[:K/2], x[K/2:]) of each
head with inv_freq = theta^(-2i/K) and scale q by K^-1/2, so q/k need no permutation (the permutation in
transformers' Meta-to-HF script is for Meta's interleaved pairs; tests/test_hf.py shows applying it breaks
parity). RMSNorm: x * rsqrt(mean(x^2) + eps) * scale in float32, as LlamaRMSNorm. The padded vocabulary is
kept: the model softmaxes over all `vocab_size` rows, padding included (config.json says so under `sktlm`).

Anything LlamaForCausalLM would compute differently is refused (MoE, a model key this module does not know),
never exported approximately.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from sktlm.errors import UserError

# config.model keys that change neither the function nor the parameter layout, or that check_exportable checks on
# their own (base_width and parametrization: muP is folded into the weights; mla: read only under attention=mla).
NEUTRAL_KEYS = frozenset(('size', 'vocab_multiple', 'init_std', 'z_loss', 'dtype', 'param_dtype', 'scan_layers',
                          'scan_unroll', 'remat', 'attention_dtype', 'attention_impl', 'attention_block', 'kernels',
                          'base_width', 'mla', 'parametrization', 'rope_scaling'))
# config.model keys the Llama mapping reads.
MAPPED_KEYS = frozenset(('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'vocab_size',
                         'rope_theta', 'norm_eps', 'tie_embeddings', 'moe'))
# Strings of an unknown key that mean "feature off" (a key added by another feature, left at its default).
OFF_STRINGS = ('', 'none', 'default', 'standard', 'sp', 'mha', 'gqa')
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


def head_dim(mc) -> int:
  return mc['head_dim'] or mc['d_model'] // mc['n_heads']


def as_dict(mc) -> dict:
  """config.model (ConfigDict, FrozenConfigDict or dict) as a plain dict."""
  return mc.to_dict() if hasattr(mc, 'to_dict') else dict(mc)


def is_deepseek(mc) -> bool:
  """MLA (with or without MoE) and MoE models map to DeepseekV3ForCausalLM, dense GQA ones to Llama."""
  mc = as_dict(mc)
  return mc.get('attention', 'gqa') == 'mla' or (mc.get('moe') or {}).get('num_experts', 0) > 0


def check_exportable(mc) -> None:
  """UserError naming what LlamaForCausalLM (or, for MLA / MoE, DeepseekV3ForCausalLM) cannot represent
  exactly; `mc` is config.model."""
  mc = as_dict(mc)
  if is_deepseek(mc):
    from sktlm.interop import deepseek
    deepseek.check_exportable(mc)
    return
  if (mc.get('rope_scaling') or {}).get('type', 'none') != 'none':
    raise UserError(f"cannot export model.rope_scaling.type={mc['rope_scaling']['type']!r} as LlamaForCausalLM "
                    "(Llama's YaRN does not scale the softmax as DeepSeek-V3's does)")
  moe = mc.get('moe') or {}
  if moe.get('num_experts', 0) > 0:
    raise UserError(f"cannot export a MoE model (model.moe.num_experts={moe['num_experts']}) as "
                    'LlamaForCausalLM; only dense models are supported')
  if mc.get('attention', 'gqa') != 'gqa':
    raise UserError(f"cannot export model.attention={mc['attention']!r} as LlamaForCausalLM (only grouped-query "
                    'attention; multi-head latent attention has no Llama equivalent)')
  param = mc.get('parametrization', 'sp')
  if param not in ('sp', 'mup') or (param == 'mup' and mc['tie_embeddings']):
    raise UserError(f"cannot export model.parametrization={param!r}" + (' with tied embeddings' if param == 'mup'
                    else '') + ": its attention scale and logit multiplier cannot be folded into LlamaForCausalLM's "
                    'weights (sp models, and muP models with an untied head, can be exported)')
  for key in sorted(set(mc) - NEUTRAL_KEYS - MAPPED_KEYS):
    value = mc[key]
    items = [(f'{key}.{k}', v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
    for name, v in items:
      if not isinstance(v, (dict, list, tuple)) and not is_off(v):
        raise UserError(f'cannot export: model.{name}={v!r} is a feature LlamaForCausalLM does not compute '
                        '(supported: dense Llama models)')
  if head_dim(mc) % 2:
    raise UserError(f'cannot export: head_dim={head_dim(mc)} is odd (RoPE needs pairs)')


def _check_sp(mc, why: str) -> None:
  if as_dict(mc).get('parametrization', 'sp') != 'sp':
    raise UserError(f"model.parametrization={as_dict(mc)['parametrization']!r} cannot {why}")


def is_off(v) -> bool:
  """None, False, 0, a 1.0 multiplier or an 'off' string: an unknown feature key left at its default."""
  if v is None or isinstance(v, bool):
    return not v
  if isinstance(v, (int, float)):
    return v == 0 or (isinstance(v, float) and v == 1.0)
  return isinstance(v, str) and v.lower() in OFF_STRINGS


def hf_config(mc, *, max_position_embeddings: int, tokenizer_vocab_size: int, bos_id: int = 1,
              eos_id: int = 2, pad_id: int = 0) -> dict:
  """config.json of the LlamaForCausalLM (DeepseekV3ForCausalLM) that computes what sktlm's model `mc`
  computes (float32)."""
  check_exportable(mc)
  if is_deepseek(mc):
    from sktlm.interop import deepseek
    mc = as_dict(mc)
    return {**deepseek.hf_config(mc, max_position_embeddings=max_position_embeddings),
            'initializer_range': float(mc.get('init_std', 0.02)), 'bos_token_id': bos_id, 'eos_token_id': eos_id,
            'pad_token_id': pad_id, 'use_cache': True, 'dtype': 'float32',
            'sktlm': _sktlm_note(mc, tokenizer_vocab_size,
                                 sorted(deepseek.MAPPED_KEYS - {'mla', 'moe', 'rope_scaling'}))}
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': int(mc['vocab_size']),
      'hidden_size': int(mc['d_model']),
      'intermediate_size': int(mc['d_ff']),
      'num_hidden_layers': int(mc['n_layers']),
      'num_attention_heads': int(mc['n_heads']),
      'num_key_value_heads': int(mc['n_kv_heads']),
      'head_dim': head_dim(mc),
      'hidden_act': 'silu',
      'max_position_embeddings': int(max_position_embeddings),
      'rms_norm_eps': float(mc['norm_eps']),
      'rope_parameters': {'rope_type': 'default', 'rope_theta': float(mc['rope_theta'])},
      'rope_theta': float(mc['rope_theta']),
      'tie_word_embeddings': bool(mc['tie_embeddings']),
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'initializer_range': float(mc.get('init_std', 0.02)),
      'bos_token_id': bos_id,
      'eos_token_id': eos_id,
      'pad_token_id': pad_id,
      'use_cache': True,
      'dtype': 'float32',
      'sktlm': _sktlm_note(mc, tokenizer_vocab_size, sorted(MAPPED_KEYS - {'moe'})),
  }


def _sktlm_note(mc, tokenizer_vocab_size: int, keys) -> dict:
  return {
      'vocab_padding': f'ids {tokenizer_vocab_size}..{int(mc["vocab_size"]) - 1} are padding rows that no '
                       'token uses; they are kept (the model softmaxes over all vocab_size logits, as in '
                       'training), so mask them when sampling',
      'tokenizer_vocab_size': int(tokenizer_vocab_size),
      'model': {k: mc[k] for k in keys},
  }


def _layers(params, n_layers: int) -> list[dict]:
  """Per-layer param dicts from the scanned (params['layers'] stacked on axis 0) or unrolled layout."""
  if 'layers' in params:
    stacked = params['layers']
    return [_tree_index(stacked, i) for i in range(n_layers)]
  return [params[f'layers_{i}'] for i in range(n_layers)]


def _tree_index(tree, i):
  return {k: _tree_index(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def to_hf_tensors(mc, params, model_state=None) -> dict[str, np.ndarray]:
  """HF tensor name -> float32 array (numpy), from sktlm params (numpy or jax arrays, any float dtype); SP weights
  (write_folder folds a muP model's multipliers in first). model_state: the train state's (MoE routing biases,
  exported as DeepSeek-V3's e_score_correction_bias)."""
  check_exportable(mc)
  if is_deepseek(mc):
    from sktlm.interop import deepseek
    return deepseek.to_hf_tensors(as_dict(mc), params, model_state)
  _check_sp(mc, 'export: fold its multipliers with mup.to_sp_params first (write_folder does)')
  D, H, G, K, L = mc['d_model'], mc['n_heads'], mc['n_kv_heads'], head_dim(mc), mc['n_layers']
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {'model.embed_tokens.weight': f32(params['embedding']),
         'model.norm.weight': f32(params['final_norm']['scale'])}
  if not mc['tie_embeddings']:
    out['lm_head.weight'] = f32(np.asarray(params['head']).T)
  for i, p in enumerate(_layers(params, L)):
    a, m, pre = p['attn'], p['mlp'], f'model.layers.{i}.'
    out[pre + 'input_layernorm.weight'] = f32(p['attn_norm']['scale'])
    out[pre + 'post_attention_layernorm.weight'] = f32(p['mlp_norm']['scale'])
    out[pre + 'self_attn.q_proj.weight'] = f32(np.asarray(a['wq']).reshape(D, H * K).T)
    out[pre + 'self_attn.k_proj.weight'] = f32(np.asarray(a['wk']).reshape(D, G * K).T)
    out[pre + 'self_attn.v_proj.weight'] = f32(np.asarray(a['wv']).reshape(D, G * K).T)
    out[pre + 'self_attn.o_proj.weight'] = f32(np.asarray(a['wo']).reshape(H * K, D).T)
    out[pre + 'mlp.gate_proj.weight'] = f32(np.asarray(m['wi_gate']).T)
    out[pre + 'mlp.up_proj.weight'] = f32(np.asarray(m['wi_up']).T)
    out[pre + 'mlp.down_proj.weight'] = f32(np.asarray(m['wo']).T)
  return out


def expected_shapes(mc) -> dict[str, tuple[int, ...]]:
  D, H, G, K, F, V = (mc['d_model'], mc['n_heads'], mc['n_kv_heads'], head_dim(mc), mc['d_ff'], mc['vocab_size'])
  out = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
  if not mc['tie_embeddings']:
    out['lm_head.weight'] = (V, D)
  per = {'input_layernorm.weight': (D,), 'post_attention_layernorm.weight': (D,),
         'self_attn.q_proj.weight': (H * K, D), 'self_attn.k_proj.weight': (G * K, D),
         'self_attn.v_proj.weight': (G * K, D), 'self_attn.o_proj.weight': (D, H * K),
         'mlp.gate_proj.weight': (F, D), 'mlp.up_proj.weight': (F, D), 'mlp.down_proj.weight': (D, F)}
  for i in range(mc['n_layers']):
    out.update({f'model.layers.{i}.{k}': v for k, v in per.items()})
  return out


def from_hf_tensors(mc, tensors: dict[str, np.ndarray]) -> dict:
  """sktlm params (float32 numpy, the layout of model.scan_layers) from HF tensors; names and shapes checked."""
  check_exportable(mc)
  _check_sp(mc, 'import: HF weights are SP weights; starting a muP run from them is not supported')
  want = expected_shapes(mc)
  missing = sorted(set(want) - set(tensors))
  extra = sorted(set(tensors) - set(want) - {'lm_head.weight'})
  if missing or extra:
    raise UserError(f'HF weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}')
  for name, shape in want.items():
    if tuple(tensors[name].shape) != shape:
      raise UserError(f'HF weight {name} has shape {tuple(tensors[name].shape)}, the model needs {shape} '
                      '(model dims differ from the checkpoint)')
  D, H, G, K, L = mc['d_model'], mc['n_heads'], mc['n_kv_heads'], head_dim(mc), mc['n_layers']
  t = lambda name: np.asarray(tensors[name], np.float32)
  params = {'embedding': t('model.embed_tokens.weight'), 'final_norm': {'scale': t('model.norm.weight')}}
  if not mc['tie_embeddings']:
    params['head'] = np.ascontiguousarray(t('lm_head.weight').T)
  layers = []
  for i in range(L):
    pre = f'model.layers.{i}.'
    T = lambda n, shape, pre=pre: np.ascontiguousarray(t(pre + n).T).reshape(shape)
    layers.append({
        'attn_norm': {'scale': t(pre + 'input_layernorm.weight')},
        'mlp_norm': {'scale': t(pre + 'post_attention_layernorm.weight')},
        'attn': {'wq': T('self_attn.q_proj.weight', (D, H, K)), 'wk': T('self_attn.k_proj.weight', (D, G, K)),
                 'wv': T('self_attn.v_proj.weight', (D, G, K)), 'wo': T('self_attn.o_proj.weight', (H, K, D))},
        'mlp': {'wi_gate': T('mlp.gate_proj.weight', (D, -1)), 'wi_up': T('mlp.up_proj.weight', (D, -1)),
                'wo': T('mlp.down_proj.weight', (-1, D))},
    })
  if mc.get('scan_layers', True):
    import jax  # tree stacking only
    params['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    params.update({f'layers_{i}': p for i, p in enumerate(layers)})
  return params


def check_importable(mc, cfg: dict) -> None:
  """UserError unless the HF config describes exactly sktlm's model `mc` (shapes and function)."""
  if cfg.get('model_type') == 'deepseek_v3':
    from sktlm.interop import deepseek
    return deepseek.check_importable(as_dict(mc), cfg)
  if cfg.get('model_type') != 'llama':
    raise UserError(f"HF checkpoint is a {cfg.get('model_type')!r} model; only 'llama' and 'deepseek_v3' can be "
                    'imported')
  if is_deepseek(mc):
    raise UserError('HF checkpoint is a Llama model; config.model is MLA / MoE (only a DeepSeek-V3 checkpoint fits)')
  for key, bad in (('hidden_act', lambda v: v not in (None, 'silu')), ('attention_bias', bool), ('mlp_bias', bool),
                   ('rope_scaling', bool), ('pretraining_tp', lambda v: v not in (None, 1))):
    if bad(cfg.get(key)):
      raise UserError(f'HF config {key}={cfg.get(key)!r} is not supported (sktlm computes plain Llama)')
  rope = cfg.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default':
    raise UserError(f"HF config rope_type={rope.get('rope_type')!r} is not supported (only default RoPE)")
  theta = rope.get('rope_theta', cfg.get('rope_theta', 10000.0))
  H = cfg['num_attention_heads']
  theirs = {'n_layers': cfg['num_hidden_layers'], 'd_model': cfg['hidden_size'], 'n_heads': H,
            'n_kv_heads': cfg.get('num_key_value_heads') or H, 'd_ff': cfg['intermediate_size'],
            'head_dim': cfg.get('head_dim') or cfg['hidden_size'] // H, 'vocab_size': cfg['vocab_size'],
            'tie_embeddings': bool(cfg.get('tie_word_embeddings', False)), 'rope_theta': float(theta),
            'norm_eps': float(cfg.get('rms_norm_eps', 1e-6))}
  ours = dict(theirs, **{k: mc[k] for k in theirs if k != 'head_dim'}, head_dim=head_dim(mc))
  ours['rope_theta'], ours['norm_eps'] = float(ours['rope_theta']), float(ours['norm_eps'])
  diff = [f'{k}: checkpoint {theirs[k]!r}, config {ours[k]!r}' for k in theirs if theirs[k] != ours[k]]
  if diff:
    raise UserError('HF checkpoint does not match config.model (set these keys to match): ' + '; '.join(diff))


def read_params(mc, path: str) -> tuple[dict, dict]:
  """(params, model_state) as numpy trees from the HF folder `path` (Llama or DeepSeek-V3), for config.model
  `mc`; UserError when the checkpoint's shapes or function differ from it. sktlm/train/init_hf.py places them
  into a train state for `train.init_from_hf`."""
  cfg, tensors = read_folder(path)
  check_importable(mc, cfg)
  if cfg.get('model_type') == 'deepseek_v3':
    from sktlm.interop import deepseek
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
  if mup.is_mup(mc):  # LlamaForCausalLM computes SP attention and logits: fold muP's multipliers into the weights
    params = mup.to_sp_params(params, mc)  # (a one-line UserError for tied embeddings, which cannot be folded)
    mc = dict(as_dict(mc), parametrization='sp')
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
               'suppress_tokens': list(range(tokenizer.vocab_size, int(mc['vocab_size'])))})
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

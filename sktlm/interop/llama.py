"""Dense grouped-query models <-> a `LlamaForCausalLM` folder's config.json and tensors (numpy only).

Layouts. sktlm keeps wq [D, H, K], wk / wv [D, G, K], wo [H, K, D], wi_gate / wi_up [D, F], mlp wo [F, D],
embedding [V, D], head [D, V]; a torch Linear weight is [out, in], so every matrix is reshaped to 2-D and
transposed (q_proj = wq.reshape(D, H K).T, ...). RoPE: both rotate the two halves (x[:K/2], x[K/2:]) of each
head with inv_freq = theta^(-2i/K) and scale q by K^-1/2, so q/k need no permutation (the permutation in
transformers' Meta-to-HF script is for Meta's interleaved pairs; tests/test_hf.py shows applying it breaks
parity); YaRN maps where Llama's computes sktlm's (interop/rope.py). RMSNorm: x * rsqrt(mean(x^2) + eps) *
scale in float32, as LlamaRMSNorm.

Anything LlamaForCausalLM would compute differently is refused (MoE, MLA, a model key whose schema rule says so),
never exported approximately. `mc` is config.model (ConfigDict or dict).
"""

from __future__ import annotations

import numpy as np

from sktlm.config import layout
from sktlm.errors import UserError
from sktlm.interop import rope, rules

FORMAT = 'llama'


def check_exportable(mc) -> None:
  """UserError naming what LlamaForCausalLM cannot represent exactly."""
  mc = rules.model_config(mc)
  if layout.moe_of(mc):
    raise UserError(f'cannot export a MoE model (model.moe.num_experts={mc.moe.num_experts}) as '
                    'LlamaForCausalLM; only dense models are supported')
  if layout.is_mla(mc):
    raise UserError(f'cannot export model.attention={mc.attention!r} as LlamaForCausalLM (only grouped-query '
                    'attention; multi-head latent attention has no Llama equivalent)')
  if mc.parametrization not in ('sp', 'mup') or (mc.parametrization == 'mup' and mc.tie_embeddings):
    raise UserError(f'cannot export model.parametrization={mc.parametrization!r}' + (
        ' with tied embeddings' if mc.parametrization == 'mup' else '') + ": its attention scale and logit "
        "multiplier cannot be folded into LlamaForCausalLM's weights (sp models, and muP models with an untied "
        'head, can be exported)')
  rope.check_exportable(mc, FORMAT)
  rules.check(mc, FORMAT)
  if layout.head_dim(mc) % 2:
    raise UserError(f'cannot export: head_dim={layout.head_dim(mc)} is odd (RoPE needs pairs)')


def _check_sp(mc, why: str) -> None:
  if mc.parametrization != 'sp':
    raise UserError(f'model.parametrization={mc.parametrization!r} cannot {why}')


def hf_config(mc, *, max_position_embeddings: int) -> dict:
  """The LlamaForCausalLM config.json fields that describe sktlm's model `mc` (hf.hf_config adds the ids)."""
  check_exportable(mc)
  mc = rules.model_config(mc)
  params = rope.hf_rope_parameters(mc, FORMAT)
  if params['rope_type'] == 'yarn':  # transformers checks yarn's factor against these two
    max_position_embeddings = max(max_position_embeddings,
                                  int(params['original_max_position_embeddings'] * params['factor']))
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': int(mc.vocab_size),
      'hidden_size': int(mc.d_model),
      'intermediate_size': int(mc.d_ff),
      'num_hidden_layers': int(mc.n_layers),
      'num_attention_heads': int(mc.n_heads),
      'num_key_value_heads': int(mc.n_kv_heads),
      'head_dim': layout.head_dim(mc),
      'hidden_act': 'silu',
      'max_position_embeddings': int(max_position_embeddings),
      'rms_norm_eps': float(mc.norm_eps),
      'rope_parameters': params,
      'rope_theta': float(mc.rope_theta),
      'tie_word_embeddings': bool(mc.tie_embeddings),
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
  }


def _layers(params, n_layers: int) -> list[dict]:
  """Per-layer param dicts from the scanned (params['layers'] stacked on axis 0) or unrolled layout."""
  if 'layers' in params:
    stacked = params['layers']
    return [_tree_index(stacked, i) for i in range(n_layers)]
  return [params[f'layers_{i}'] for i in range(n_layers)]


def _tree_index(tree, i):
  return {k: _tree_index(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def to_hf_tensors(mc, params) -> dict[str, np.ndarray]:
  """HF tensor name -> float32 array (numpy), from sktlm params (numpy or jax arrays, any float dtype); SP weights
  (hf.write_folder folds a muP model's multipliers in first)."""
  check_exportable(mc)
  mc = rules.model_config(mc)
  _check_sp(mc, 'export: fold its multipliers with mup.to_sp_params first (write_folder does)')
  D, H, G, K, L = mc.d_model, mc.n_heads, mc.n_kv_heads, layout.head_dim(mc), mc.n_layers
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  out = {'model.embed_tokens.weight': f32(params['embedding']),
         'model.norm.weight': f32(params['final_norm']['scale'])}
  if not mc.tie_embeddings:
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
  mc = rules.model_config(mc)
  D, H, G, K, F, V = mc.d_model, mc.n_heads, mc.n_kv_heads, layout.head_dim(mc), mc.d_ff, mc.vocab_size
  out = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
  if not mc.tie_embeddings:
    out['lm_head.weight'] = (V, D)
  per = {'input_layernorm.weight': (D,), 'post_attention_layernorm.weight': (D,),
         'self_attn.q_proj.weight': (H * K, D), 'self_attn.k_proj.weight': (G * K, D),
         'self_attn.v_proj.weight': (G * K, D), 'self_attn.o_proj.weight': (D, H * K),
         'mlp.gate_proj.weight': (F, D), 'mlp.up_proj.weight': (F, D), 'mlp.down_proj.weight': (D, F)}
  for i in range(mc.n_layers):
    out.update({f'model.layers.{i}.{k}': v for k, v in per.items()})
  return out


def from_hf_tensors(mc, tensors: dict[str, np.ndarray]) -> dict:
  """sktlm params (float32 numpy, the layout of model.scan_layers) from HF tensors; names and shapes checked."""
  check_exportable(mc)
  mc = rules.model_config(mc)
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
  D, H, G, K, L = mc.d_model, mc.n_heads, mc.n_kv_heads, layout.head_dim(mc), mc.n_layers
  t = lambda name: np.asarray(tensors[name], np.float32)  # noqa: E731
  params = {'embedding': t('model.embed_tokens.weight'), 'final_norm': {'scale': t('model.norm.weight')}}
  if not mc.tie_embeddings:
    params['head'] = np.ascontiguousarray(t('lm_head.weight').T)
  layers = []
  for i in range(L):
    pre = f'model.layers.{i}.'
    T = lambda n, shape, pre=pre: np.ascontiguousarray(t(pre + n).T).reshape(shape)  # noqa: E731
    layers.append({
        'attn_norm': {'scale': t(pre + 'input_layernorm.weight')},
        'mlp_norm': {'scale': t(pre + 'post_attention_layernorm.weight')},
        'attn': {'wq': T('self_attn.q_proj.weight', (D, H, K)), 'wk': T('self_attn.k_proj.weight', (D, G, K)),
                 'wv': T('self_attn.v_proj.weight', (D, G, K)), 'wo': T('self_attn.o_proj.weight', (H, K, D))},
        'mlp': {'wi_gate': T('mlp.gate_proj.weight', (D, -1)), 'wi_up': T('mlp.up_proj.weight', (D, -1)),
                'wo': T('mlp.down_proj.weight', (-1, D))},
    })
  if mc.scan_layers:
    import jax  # tree stacking only
    params['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  else:
    params.update({f'layers_{i}': p for i, p in enumerate(layers)})
  return params


def check_importable(mc, cfg: dict) -> None:
  """UserError unless the HF Llama config describes exactly sktlm's model `mc` (shapes and function)."""
  mc = rules.model_config(mc)
  if layout.is_mla(mc) or layout.moe_of(mc):
    raise UserError('HF checkpoint is a Llama model; config.model is MLA / MoE (only a DeepSeek-V3 checkpoint fits)')
  for key, bad in (('hidden_act', lambda v: v not in (None, 'silu')), ('attention_bias', bool), ('mlp_bias', bool),
                   ('pretraining_tp', lambda v: v not in (None, 1))):
    if bad(cfg.get(key)):
      raise UserError(f'HF config {key}={cfg.get(key)!r} is not supported (sktlm computes plain Llama)')
  H = cfg['num_attention_heads']
  theirs = {'n_layers': cfg['num_hidden_layers'], 'd_model': cfg['hidden_size'], 'n_heads': H,
            'n_kv_heads': cfg.get('num_key_value_heads') or H, 'd_ff': cfg['intermediate_size'],
            'head_dim': cfg.get('head_dim') or cfg['hidden_size'] // H, 'vocab_size': cfg['vocab_size'],
            'tie_embeddings': bool(cfg.get('tie_word_embeddings', False)),
            'norm_eps': float(cfg.get('rms_norm_eps', 1e-6))}
  ours = {k: mc[k] for k in theirs}
  ours.update(head_dim=layout.head_dim(mc), norm_eps=float(mc.norm_eps))
  diff = [f'{k}: checkpoint {theirs[k]!r}, config {ours[k]!r}' for k in theirs if theirs[k] != ours[k]]
  diff += rope.diffs(mc, cfg, FORMAT)
  if diff:
    raise UserError('HF checkpoint does not match config.model (set these keys to match): ' + '; '.join(diff))

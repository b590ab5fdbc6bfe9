"""MLA (and MLA + MoE) models <-> a `DeepseekV3ForCausalLM` folder's config.json and tensors.

numpy only (sktlm/interop/hf.py writes and reads the folder). Mapping, per layer (torch Linear weights are
[out, in], so every matrix is reshaped to 2-D and transposed):
- attention: q_a_proj = wq_a, q_a_layernorm = q_norm, q_b_proj = wq_b (or q_proj = wq when q_lora_rank = 0),
  kv_a_proj_with_mqa = [wkv_a | wk_rope] (DeepSeek fuses them), kv_a_layernorm = kv_norm,
  kv_b_proj = per head [wk_b_h | wv_b_h], o_proj = wo.
- RoPE: the config says rope_interleave = true, as DeepSeek's checkpoints are: their rope dims are
  interleaved pairs (x0, x1), (x2, x3), ... where sktlm rotates halves, so the rope output columns of q_b_proj
  and kv_a_proj_with_mqa are permuted (half index j <-> interleaved index PERM[j]); scores are unchanged.
- MoE layers (the first moe.n_dense_layers stay dense: first_k_dense_replace): gate.weight = router,
  gate.e_score_correction_bias = the aux-free routing bias from the train state (zeros for aux_loss models),
  experts.{e}.{gate,up,down}_proj (DeepSeek's per-expert layout; transformers fuses them on load),
  shared_experts = the shared SwiGLU (moe_intermediate_size x n_shared_experts wide).
- n_group / topk_group / routed_scaling_factor / norm_topk_prob / YaRN (interop/rope.py) map one to one.

Refused (one line): softmax gates (V3 routes with sigmoid scores), MoE without a shared expert, latent norm
epsilons other than V3's 1e-6 (transformers hard-codes it for q_a/kv_a_layernorm), muP, GQA attention, a model
key whose schema rule says so. `mc` is config.model (ConfigDict or dict).
"""

from __future__ import annotations

import numpy as np

from sktlm.config import layout
from sktlm.errors import UserError
from sktlm.interop import rope, rules

FORMAT = 'deepseek_v3'
LATENT_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a_layernorm and kv_a_layernorm


def rope_perm(R: int) -> np.ndarray:
  """sktlm's half-layout index j holds DeepSeek's interleaved index PERM[j]."""
  return np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])


def check_exportable(mc) -> None:
  """UserError naming what DeepseekV3ForCausalLM cannot compute exactly."""
  mc = rules.model_config(mc)
  if not layout.is_mla(mc):
    raise UserError('cannot export a MoE model with grouped-query attention: only MLA models map to '
                    'DeepseekV3ForCausalLM (and dense GQA models to LlamaForCausalLM)')
  if mc.parametrization != 'sp':
    raise UserError(f'cannot export model.parametrization={mc.parametrization!r} as DeepseekV3ForCausalLM '
                    '(its attention scale and logit multiplier are not folded for MLA); only sp')
  eps = mc.mla.latent_norm_eps or mc.norm_eps
  if abs(eps - LATENT_EPS) > 1e-12:
    raise UserError(f'cannot export: the MLA latent norms use epsilon {eps:g}; DeepseekV3ForCausalLM hard-codes '
                    f'{LATENT_EPS:g} (set model.mla.latent_norm_eps=1e-6)')
  moe = layout.moe_of(mc)
  if moe:
    if moe.gate != 'sigmoid':
      raise UserError(f'cannot export moe.gate={moe.gate!r}: DeepseekV3ForCausalLM routes with sigmoid scores')
    if moe.num_shared_experts < 1:
      raise UserError('cannot export a MoE model without a shared expert (DeepseekV3ForCausalLM always has one)')
    if moe.n_group > 1 and moe.num_experts // moe.n_group < 2:
      raise UserError('cannot export: DeepSeek-V3 group scores need >= 2 experts per group')
  rope.check_exportable(mc, FORMAT)
  rules.check(mc, FORMAT)


def hf_config(mc, *, max_position_embeddings: int) -> dict:
  """The DeepseekV3ForCausalLM config.json fields that describe sktlm's model `mc` (hf.hf_config adds ids)."""
  check_exportable(mc)
  mc = rules.model_config(mc)
  a, moe = mc.mla, layout.moe_of(mc)
  params = rope.hf_rope_parameters(mc, FORMAT)
  if params['rope_type'] == 'yarn':  # transformers checks yarn's factor against these two
    max_position_embeddings = max(max_position_embeddings,
                                  int(params['original_max_position_embeddings'] * params['factor']))
  cfg = {
      'architectures': ['DeepseekV3ForCausalLM'],
      'model_type': 'deepseek_v3',
      'vocab_size': int(mc.vocab_size),
      'hidden_size': int(mc.d_model),
      'intermediate_size': int(mc.d_ff),
      'num_hidden_layers': int(mc.n_layers),
      'num_attention_heads': int(mc.n_heads),
      'num_key_value_heads': int(mc.n_heads),
      'q_lora_rank': int(a.q_lora_rank) or None,
      'kv_lora_rank': int(a.kv_lora_rank),
      'qk_nope_head_dim': int(a.qk_nope_head_dim),
      'qk_rope_head_dim': int(a.qk_rope_head_dim),
      'v_head_dim': int(a.v_head_dim),
      'rope_interleave': True,
      'rope_parameters': params,
      'rms_norm_eps': float(mc.norm_eps),
      'max_position_embeddings': int(max_position_embeddings),
      'tie_word_embeddings': bool(mc.tie_embeddings),
      'hidden_act': 'silu',
      'attention_bias': False,
      'attention_dropout': 0.0,
      'num_nextn_predict_layers': 0,  # no multi-token-prediction module (sktlm does not train one)
  }
  if moe:
    cfg.update(n_routed_experts=int(moe.num_experts), num_experts_per_tok=int(moe.top_k),
               moe_intermediate_size=int(moe.expert_d_ff or mc.d_ff), n_shared_experts=int(moe.num_shared_experts),
               first_k_dense_replace=int(min(moe.n_dense_layers, mc.n_layers)), n_group=int(moe.n_group),
               topk_group=int(moe.topk_group), routed_scaling_factor=float(moe.routed_scaling_factor),
               norm_topk_prob=bool(moe.renormalize))
  else:  # every layer dense
    cfg.update(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=1, n_shared_experts=1,
               first_k_dense_replace=int(mc.n_layers), n_group=1, topk_group=1, routed_scaling_factor=1.0,
               norm_topk_prob=True)
  return cfg


def _group_layers(tree, name: str, n: int, scanned: bool) -> list[dict]:
  if n == 0:
    return []
  if scanned:
    stacked = tree[name]
    return [_index(stacked, i) for i in range(n)]
  return [tree[f'{name}_{i}'] for i in range(n)]


def _index(tree, i):
  return {k: _index(v, i) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()}


def to_hf_tensors(mc, params, model_state=None) -> dict[str, np.ndarray]:
  """HF tensor name -> float32 array, from sktlm params and the train state's model_state (routing biases)."""
  check_exportable(mc)
  mc = rules.model_config(mc)
  a = mc.mla
  D, H = mc.d_model, mc.n_heads
  N, R, V, Lq, Lkv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank, a.kv_lora_rank
  inv = np.argsort(rope_perm(R))  # hf[..., i] = sk[..., inv[i]]
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
  scanned = 'layers' in params or any(g in params for g in ('dense_layers', 'moe_layers'))
  biases = (model_state or {}).get('moe_bias', {})
  out = {'model.embed_tokens.weight': f32(params['embedding']), 'model.norm.weight': f32(params['final_norm']['scale'])}
  if not mc.tie_embeddings:
    out['lm_head.weight'] = f32(np.asarray(params['head']).T)
  i = 0
  for name, n, use_moe in layout.layer_groups(mc):
    layer_biases = _group_layers(biases, name, n, scanned) if use_moe and biases else [None] * n
    for p, bias in zip(_group_layers(params, name, n, scanned), layer_biases, strict=True):
      at, pre = p['attn'], f'model.layers.{i}.'
      out[pre + 'input_layernorm.weight'] = f32(p['attn_norm']['scale'])
      out[pre + 'post_attention_layernorm.weight'] = f32(p['mlp_norm']['scale'])
      if Lq > 0:
        wq_b = np.asarray(at['wq_b'], np.float32)
        wq_b = np.concatenate([wq_b[..., :N], wq_b[..., N:][..., inv]], axis=-1)
        out[pre + 'self_attn.q_a_proj.weight'] = f32(np.asarray(at['wq_a']).T)
        out[pre + 'self_attn.q_a_layernorm.weight'] = f32(at['q_norm']['scale'])
        out[pre + 'self_attn.q_b_proj.weight'] = f32(wq_b.reshape(Lq, H * (N + R)).T)
      else:
        wq = np.asarray(at['wq'], np.float32)
        wq = np.concatenate([wq[..., :N], wq[..., N:][..., inv]], axis=-1)
        out[pre + 'self_attn.q_proj.weight'] = f32(wq.reshape(D, H * (N + R)).T)
      kv_a = np.concatenate([np.asarray(at['wkv_a'], np.float32), np.asarray(at['wk_rope'], np.float32)[:, inv]], 1)
      out[pre + 'self_attn.kv_a_proj_with_mqa.weight'] = f32(kv_a.T)
      out[pre + 'self_attn.kv_a_layernorm.weight'] = f32(at['kv_norm']['scale'])
      kv_b = np.concatenate([np.asarray(at['wk_b'], np.float32), np.asarray(at['wv_b'], np.float32)], axis=-1)
      out[pre + 'self_attn.kv_b_proj.weight'] = f32(kv_b.reshape(Lkv, H * (N + V)).T)
      out[pre + 'self_attn.o_proj.weight'] = f32(np.asarray(at['wo']).reshape(H * V, D).T)
      if use_moe:
        m = p['moe']
        out[pre + 'mlp.gate.weight'] = f32(np.asarray(m['router']).T)
        E = np.asarray(m['router']).shape[-1]
        out[pre + 'mlp.gate.e_score_correction_bias'] = f32(np.zeros(E) if bias is None else bias['moe']['bias'])
        for e in range(E):
          ep = f'{pre}mlp.experts.{e}.'
          out[ep + 'gate_proj.weight'] = f32(np.asarray(m['wi_gate'][e]).T)
          out[ep + 'up_proj.weight'] = f32(np.asarray(m['wi_up'][e]).T)
          out[ep + 'down_proj.weight'] = f32(np.asarray(m['wo'][e]).T)
        for k, hk in (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj')):
          out[f'{pre}mlp.shared_experts.{hk}.weight'] = f32(np.asarray(m['shared'][k]).T)
      else:
        for k, hk in (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj')):
          out[f'{pre}mlp.{hk}.weight'] = f32(np.asarray(p['mlp'][k]).T)
      i += 1
  return out


def check_importable(mc, cfg: dict) -> None:
  """UserError unless the HF DeepSeek-V3 config describes exactly sktlm's model `mc`."""
  mc = rules.model_config(mc)
  for key, bad in (('hidden_act', lambda v: v not in (None, 'silu')), ('attention_bias', bool),
                   ('rope_interleave', lambda v: v is False)):
    if bad(cfg.get(key)):
      raise UserError(f'HF config {key}={cfg.get(key)!r} is not supported')
  try:
    ours = hf_config(mc, max_position_embeddings=cfg.get('max_position_embeddings', 0))
  except UserError as e:
    raise UserError(f'config.model cannot hold a DeepSeek-V3 checkpoint: {e}') from None
  keys = ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
          'q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'rms_norm_eps',
          'tie_word_embeddings']
  if layout.moe_of(mc):
    keys += ['n_routed_experts', 'num_experts_per_tok', 'moe_intermediate_size', 'n_shared_experts',
             'first_k_dense_replace', 'n_group', 'topk_group', 'routed_scaling_factor', 'norm_topk_prob']
  elif cfg.get('first_k_dense_replace', 0) < cfg['num_hidden_layers']:
    raise UserError('HF checkpoint has MoE layers; config.model is a dense MLA model (set model.moe.*)')
  theirs = dict(cfg, tie_word_embeddings=bool(cfg.get('tie_word_embeddings', False)))
  diff = [f'{k}: checkpoint {theirs.get(k)!r}, config {ours[k]!r}' for k in keys if theirs.get(k) != ours[k]]
  diff += rope.diffs(mc, cfg, FORMAT)
  if diff:
    raise UserError('HF checkpoint does not match config.model (set these keys to match): ' + '; '.join(diff))


def from_hf_tensors(mc, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(params, model_state) in sktlm's layout (model.scan_layers) from DeepSeek-V3 tensors; names and shapes
  checked against to_hf_tensors of the same model."""
  mc = rules.model_config(mc)
  a = mc.mla
  D, H = mc.d_model, mc.n_heads
  N, R, V, Lq, Lkv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank, a.kv_lora_rank
  perm = rope_perm(R)
  missing, unexpected = _expected_names(mc) - set(tensors), set(tensors) - _expected_names(mc) - {'lm_head.weight'}
  unexpected = {k for k in unexpected if not k.startswith(f'model.layers.{mc.n_layers}.')}  # MTP module: skipped
  if missing or unexpected:
    raise UserError(f'HF weights do not match the model: missing {sorted(missing)[:3]}, unexpected '
                    f'{sorted(unexpected)[:3]}')
  t = lambda name: np.asarray(tensors[name], np.float32)  # noqa: E731

  def T(name, shape):
    arr = t(name).T
    if int(np.prod(arr.shape)) != int(np.prod(shape)):
      raise UserError(f'HF weight {name} has shape {tuple(t(name).shape)}, which does not fit the model')
    return np.ascontiguousarray(arr).reshape(shape)

  params = {'embedding': t('model.embed_tokens.weight'), 'final_norm': {'scale': t('model.norm.weight')}}
  if not mc.tie_embeddings:
    params['head'] = np.ascontiguousarray(t('lm_head.weight').T)
  state = {}
  i = 0
  scanned = mc.scan_layers
  aux_free = layout.moe_of(mc) is not None and mc.moe.balance == 'aux_free'
  for name, n, use_moe in layout.layer_groups(mc):
    group, group_bias = [], []
    for _ in range(n):
      pre = f'model.layers.{i}.'
      at = {'kv_norm': {'scale': t(pre + 'self_attn.kv_a_layernorm.weight')}}
      if Lq > 0:
        wq_b = T(pre + 'self_attn.q_b_proj.weight', (Lq, H, N + R))
        at.update(wq_a=T(pre + 'self_attn.q_a_proj.weight', (D, Lq)),
                  q_norm={'scale': t(pre + 'self_attn.q_a_layernorm.weight')},
                  wq_b=np.concatenate([wq_b[..., :N], wq_b[..., N:][..., perm]], axis=-1))
      else:
        wq = T(pre + 'self_attn.q_proj.weight', (D, H, N + R))
        at['wq'] = np.concatenate([wq[..., :N], wq[..., N:][..., perm]], axis=-1)
      kv_a = T(pre + 'self_attn.kv_a_proj_with_mqa.weight', (D, Lkv + R))
      kv_b = T(pre + 'self_attn.kv_b_proj.weight', (Lkv, H, N + V))
      at.update(wkv_a=np.ascontiguousarray(kv_a[:, :Lkv]), wk_rope=np.ascontiguousarray(kv_a[:, Lkv:][:, perm]),
                wk_b=np.ascontiguousarray(kv_b[..., :N]), wv_b=np.ascontiguousarray(kv_b[..., N:]),
                wo=T(pre + 'self_attn.o_proj.weight', (H, V, D)))
      layer = {'attn': at, 'attn_norm': {'scale': t(pre + 'input_layernorm.weight')},
               'mlp_norm': {'scale': t(pre + 'post_attention_layernorm.weight')}}
      mlp = lambda pfx: {k: np.ascontiguousarray(t(f'{pfx}{hk}.weight').T)  # noqa: E731
                         for k, hk in (('wi_gate', 'gate_proj'), ('wi_up', 'up_proj'), ('wo', 'down_proj'))}
      if use_moe:
        E = mc.moe.num_experts
        experts = [mlp(f'{pre}mlp.experts.{e}.') for e in range(E)]
        layer['moe'] = {'router': np.ascontiguousarray(t(pre + 'mlp.gate.weight').T),
                        'shared': mlp(pre + 'mlp.shared_experts.'),
                        **{k: np.stack([x[k] for x in experts]) for k in ('wi_gate', 'wi_up', 'wo')}}
        bias = t(pre + 'mlp.gate.e_score_correction_bias')
        if not aux_free and np.any(bias != 0):
          raise UserError(f'{pre}mlp.gate.e_score_correction_bias is non-zero: set model.moe.balance=aux_free to '
                          'route with it')
        group_bias.append({'moe': {'bias': bias}})
      else:
        layer['mlp'] = mlp(pre + 'mlp.')
      group.append(layer)
      i += 1
    if scanned:
      params[name] = _stack(group)
      if group_bias and aux_free:
        state[name] = _stack(group_bias)
    else:
      params.update({f'{name}_{j}': p for j, p in enumerate(group)})
      if group_bias and aux_free:
        state.update({f'{name}_{j}': b for j, b in enumerate(group_bias)})
  return params, ({'moe_bias': state} if state else {})


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def _expected_names(mc) -> set[str]:
  a = mc.mla
  names = {'model.embed_tokens.weight', 'model.norm.weight'}
  if not mc.tie_embeddings:
    names.add('lm_head.weight')
  i = 0
  for _, n, use_moe in layout.layer_groups(mc):
    for _ in range(n):
      pre = f'model.layers.{i}.'
      names |= {pre + s for s in ('input_layernorm.weight', 'post_attention_layernorm.weight',
                                  'self_attn.kv_a_proj_with_mqa.weight', 'self_attn.kv_a_layernorm.weight',
                                  'self_attn.kv_b_proj.weight', 'self_attn.o_proj.weight')}
      names |= ({pre + 'self_attn.q_a_proj.weight', pre + 'self_attn.q_a_layernorm.weight',
                 pre + 'self_attn.q_b_proj.weight'} if a.q_lora_rank else {pre + 'self_attn.q_proj.weight'})
      proj = ('gate_proj', 'up_proj', 'down_proj')
      if use_moe:
        names |= {pre + 'mlp.gate.weight', pre + 'mlp.gate.e_score_correction_bias'}
        names |= {f'{pre}mlp.experts.{e}.{p}.weight' for e in range(mc.moe.num_experts) for p in proj}
        names |= {f'{pre}mlp.shared_experts.{p}.weight' for p in proj}
      else:
        names |= {f'{pre}mlp.{p}.weight' for p in proj}
      i += 1
  return names

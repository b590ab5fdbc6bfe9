"""Parameter and FLOP accounting from a model config: the one source used by MFU logging, sweep
planning, `sktlm plan` and scaling analysis.

`mc` is the `config.model` ConfigDict (every key of sktlm/config/schema.py) with a resolved vocab_size
(see `layout.resolved_vocab_size`); the model's layout (head dims, layer groups) is sktlm/config/layout.py's.

FLOP conventions (per token, training = forward + backward; a matmul weight costs 2 FLOPs forward and 4
backward). These definitions are stated once, here; README and docs/ refer to them:
- `6N`: 6 x N, N = every matmul weight a token passes through, including the output head (for MoE only
  the active experts and the router). Embedding lookups are not matmuls and are not in N.
- `exact` (= model FLOPs, recorded as `flops_model`): 6N + 6 * L * n_heads * (qk_dim + v_dim) * T (GQA: qk_dim =
  v_dim = head_dim, i.e. 12 L H head_dim T; MLA: qk_dim = nope + rope, v_dim = v_head_dim): adds the two
  attention matmuls (QK^T and AV) over the full T x T score matrix, whatever the kernel skips. This is
  PaLM's model-FLOPs definition (Chowdhery et al. 2022, App. B): MFU uses it, and so do `sktlm scaling`
  (default `--flops=exact`) and the sweep planners.
- `causal`: 6N + 3 * L * n_heads * (qk_dim + v_dim) * T: only the unmasked half, i.e. useful work.
- `executed` (recorded as `flops_executed`): the matmul FLOPs the configured kernels (`model.kernels`,
  resolved by sktlm.train.resolve; unresolved `auto` counts as the plain model) run. Blocked attention (every
  `attention_impl` but `dense`) computes only the key blocks up to each query block's end ((1 + block/T)/2
  of the attention term when block divides T). The cpu kernels embed vocabularies up to
  ONE_HOT_EMBED_MAX_VOCAB with a one-hot matmul (2 V d forward + 2 V d for the table gradient). Recompute
  in the backward pass: `model.remat='full'` reruns each block's forward matmuls but the last (the MLP or
  shared-expert down projection, whose output the backward pass does not need); 'dots_no_batch' reruns
  the attention score matmuls (they have batch dimensions); with cpu kernels 'dots' and 'dots_no_batch'
  also rerun the attention projections (their custom-VJP outputs are not saved). MoE with a capacity factor
  runs the routed experts on E x C / T slots per token instead of top_k. Elementwise work (norms, softmax,
  optimizer) is in no convention. tests/test_flops.py checks `executed` against the traced train step's
  matmuls for the plain and cpu kernels (the fused tpu/gpu attention kernels are assumed to skip blocks of
  model.attention_block like `blocked`; not checked).
"""

from __future__ import annotations

import math

from sktlm.config.layout import attention_dims, head_dim, is_mla, layer_groups, moe_of

# sktlm/model/kernels/cpu.py embeds vocabularies up to this size with a one-hot matmul (cheaper than a gather's
# scatter-add gradient on small tables); tests/test_flops.py checks the two stay equal.
ONE_HOT_EMBED_MAX_VOCAB = 2048


def _attention_weights(mc) -> tuple[int, int]:
  """(matmul weights, norm scales) of one attention layer."""
  d, h = mc.d_model, mc.n_heads
  if not is_mla(mc):
    hd = head_dim(mc)
    return d * h * hd * 2 + d * mc.n_kv_heads * hd * 2, 0  # q, o + k, v
  a = mc.mla
  qk = a.qk_nope_head_dim + a.qk_rope_head_dim
  q = d * a.q_lora_rank + a.q_lora_rank * h * qk if a.q_lora_rank > 0 else d * h * qk
  kv = d * a.kv_lora_rank + d * a.qk_rope_head_dim + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
  o = h * a.v_head_dim * d
  return q + kv + o, a.q_lora_rank + a.kv_lora_rank  # latent RMSNorms (q_lora_rank 0: no query norm)


def _layer_counts(mc) -> dict[str, int]:
  """Per-layer weight counts: attention, dense MLP, MoE (total and active), norms."""
  d = mc.d_model
  attn, attn_norms = _attention_weights(mc)
  dense_mlp = 3 * d * mc.d_ff  # SwiGLU: gate, up, down
  out = dict(attn=attn, dense_mlp=dense_mlp, norms=2 * d + attn_norms)
  moe = moe_of(mc)
  if moe:
    e_ff = moe.expert_d_ff or mc.d_ff
    expert = 3 * d * e_ff
    router = d * moe.num_experts
    out['moe_total'] = expert * (moe.num_experts + moe.num_shared_experts) + router
    out['moe_active'] = expert * (moe.top_k + moe.num_shared_experts) + router
  return out


def _layer_split(mc) -> tuple[int, int]:
  """(number of dense-MLP layers, number of MoE layers)."""
  groups = layer_groups(mc)
  return sum(n for _, n, m in groups if not m), sum(n for _, n, m in groups if m)


def param_counts(mc) -> dict[str, int]:
  """Parameter counts.

  total: every parameter. embedding: the input token table. head: the output projection (0 if tied).
  non_embedding: total - embedding - head. active / active_non_embedding: per token (MoE counts only
  top_k routed + shared experts + router; equal to total for dense models).
  """
  lc = _layer_counts(mc)
  n_dense, n_moe = _layer_split(mc)
  d, v = mc.d_model, mc.vocab_size
  embedding = v * d
  head = 0 if mc.tie_embeddings else v * d
  common = lc['attn'] + lc['norms']
  blocks_total = n_dense * (common + lc['dense_mlp']) + n_moe * (common + lc.get('moe_total', 0))
  blocks_active = n_dense * (common + lc['dense_mlp']) + n_moe * (common + lc.get('moe_active', 0))
  non_embedding = blocks_total + d  # + final norm
  active_non_embedding = blocks_active + d
  return dict(
      total=embedding + head + non_embedding,
      embedding=embedding,
      head=head,
      non_embedding=non_embedding,
      active=embedding + head + active_non_embedding,
      active_non_embedding=active_non_embedding,
  )


def matmul_params(mc) -> int:
  """N of the 6N rule: active matmul weights a token passes through, including the output head."""
  lc = _layer_counts(mc)
  n_dense, n_moe = _layer_split(mc)
  per = n_dense * (lc['attn'] + lc['dense_mlp']) + n_moe * (lc['attn'] + lc.get('moe_active', 0))
  return per + mc.vocab_size * mc.d_model


def attention_fraction(mc, seq_len: int) -> float:
  """Fraction of the full T x T attention matmuls the configured kernel computes: query block [s, e) meets
  keys [0, e) (sktlm.model.attention._blocks); 1 for `attention_impl='dense'` or one block."""
  block = mc.attention_block
  if mc.attention_impl == 'dense' or block <= 0 or block >= seq_len:
    return 1.0
  work = sum((min(s + block, seq_len) - s) * min(s + block, seq_len) for s in range(0, seq_len, block))
  return work / seq_len ** 2


def _moe_slots_per_token(mc, seq_len: int) -> float:
  """Routed-expert slots each token pays for: top_k (dropless), or E x C / T with a capacity factor (as
  sktlm.model.moe.capacity: C = clip(ceil(cf T top_k / E), 1, T) per group of T tokens)."""
  moe = moe_of(mc)
  if moe.capacity_factor <= 0:
    return float(moe.top_k)
  c = max(1, min(math.ceil(moe.capacity_factor * seq_len * moe.top_k / moe.num_experts), seq_len))
  return moe.num_experts * c / seq_len


def _executed(mc, seq_len: int, attn_full: float) -> float:
  lc = _layer_counts(mc)
  n_dense, n_moe = _layer_split(mc)
  blocks = n_dense * (lc['attn'] + lc['dense_mlp']) + n_moe * lc['attn']
  down = n_dense * mc.d_model * mc.d_ff  # the last matmul of each block: its output is not needed backward
  moe = moe_of(mc)
  if moe:
    e_ff, experts = moe.expert_d_ff or mc.d_ff, _moe_slots_per_token(mc, seq_len) + moe.num_shared_experts
    blocks += n_moe * (3 * mc.d_model * e_ff * experts + mc.d_model * moe.num_experts)
    down += n_moe * mc.d_model * e_ff * moe.num_shared_experts  # routed outputs feed the gate gradient
  attn = attn_full * attention_fraction(mc, seq_len)
  out = 6.0 * (blocks + mc.vocab_size * mc.d_model) + attn
  cpu = mc.kernels == 'cpu'  # unresolved 'auto' builds the plain model
  if cpu and mc.vocab_size <= ONE_HOT_EMBED_MAX_VOCAB:
    out += 4.0 * mc.vocab_size * mc.d_model
  remat = mc.remat
  if remat == 'full':
    out += 2.0 * (blocks - down) + attn / 3
  elif remat in ('dots', 'dots_no_batch'):
    # cpu kernels: the q/k/v/o projections' custom-VJP outputs are not saved; the score matmuls have batch dims
    out += (2.0 * mc.n_layers * lc['attn'] if cpu else 0.0) + (attn / 3 if remat == 'dots_no_batch' else 0.0)
  return out


def flops_per_token(mc, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token (forward + backward) under the conventions in the module doc."""
  n = matmul_params(mc)
  qk_dim, v_dim = attention_dims(mc)
  attn_full = 6.0 * mc.n_layers * mc.n_heads * (qk_dim + v_dim) * seq_len
  return {
      '6N': 6.0 * n,
      'exact': 6.0 * n + attn_full,
      'causal': 6.0 * n + attn_full / 2,
      # MLA's attention core runs v zero-padded to the qk dim (sktlm/model/mla.py)
      'executed': _executed(mc, seq_len, 6.0 * mc.n_layers * mc.n_heads * (qk_dim + max(qk_dim, v_dim)) * seq_len),
  }


def human(n: float) -> str:
  for unit, scale in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.3g}'


def kv_cache_per_token(mc) -> dict[str, int]:
  """Values a decoding KV cache holds per token and layer (sktlm/tools/decode.py): `cached` is what sktlm
  stores (MLA: the kv_lora_rank latent + the shared qk_rope_head_dim key, sktlm/model/mla.py; GQA: keys and
  values of n_kv_heads), `expanded` what per-head keys and values would take (MLA: H x (nope + rope + v)), and
  `mha` 2 x n_heads x head_dim (multi-head attention of the same heads, GQA's upper end)."""
  qk, v = attention_dims(mc)
  if is_mla(mc):
    cached = mc.mla.kv_lora_rank + mc.mla.qk_rope_head_dim
  else:
    cached = 2 * mc.n_kv_heads * head_dim(mc)
  return dict(cached=cached, expanded=mc.n_heads * (qk + v), mha=2 * mc.n_heads * head_dim(mc),
              layers=mc.n_layers)


def routing_groups(mc) -> dict[str, int] | None:
  """Group-limited routing (moe.n_group > 1): a token's top_k experts come from at most topk_group of n_group
  groups of contiguous experts. None when off or for dense models."""
  moe = moe_of(mc)
  if not moe or moe.n_group <= 1:
    return None
  return dict(n_group=moe.n_group, topk_group=moe.topk_group, top_k=moe.top_k,
              experts_per_group=moe.num_experts // moe.n_group)

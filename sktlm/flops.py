"""Parameter and FLOP accounting from a model config: the one source used by MFU logging, sweep
planning, `sktlm plan` and scaling analysis.

`mc` is the `config.model` ConfigDict (or anything with the same attributes) with a resolved
vocab_size (see `resolved_vocab_size`).

Conventions (per token, training = forward + backward = 3x forward):
- `6N`: 6 x N, N = every matmul weight a token passes through, including the output head (for MoE only
  the active experts and the router). Embedding lookups are not matmuls and are not in N.
- `exact`: 6N + 12 * L * (n_heads * head_dim) * T: adds the two attention matmuls (QK^T and AV) over the
  full T x T score matrix: PaLM's MFU convention, and the work of `model.attention_impl='dense'`. MFU uses
  this count. The default blocked attention skips fully masked key blocks and computes (1 + block/T)/2 of
  the attention term (sktlm.attention.blocked).
- `causal`: 6N + 6 * L * (n_heads * head_dim) * T: only the unmasked half, i.e. useful work.
"""

from __future__ import annotations


def pad_vocab(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def head_dim(mc) -> int:
  return mc.head_dim or mc.d_model // mc.n_heads


def _moe(mc):
  moe = getattr(mc, 'moe', None)
  return moe if moe is not None and moe.num_experts > 0 else None


def _layer_counts(mc) -> dict[str, int]:
  """Per-layer weight counts: attention, dense MLP, MoE (total and active), norms."""
  d, hd = mc.d_model, head_dim(mc)
  attn = d * mc.n_heads * hd * 2 + d * mc.n_kv_heads * hd * 2  # q, o + k, v
  dense_mlp = 3 * d * mc.d_ff  # SwiGLU: gate, up, down
  out = dict(attn=attn, dense_mlp=dense_mlp, norms=2 * d)
  moe = _moe(mc)
  if moe:
    e_ff = moe.expert_d_ff or mc.d_ff
    expert = 3 * d * e_ff
    router = d * moe.num_experts
    out['moe_total'] = expert * (moe.num_experts + moe.num_shared_experts) + router
    out['moe_active'] = expert * (moe.top_k + moe.num_shared_experts) + router
  return out


def layer_groups(mc) -> list[tuple[str, int, bool]]:
  """(name, number of layers, uses MoE) of each homogeneous stack of layers, in order: the model's parameter
  tree (sktlm/model.py) and the counts here both follow it. MoE models keep a dense MLP in the first
  moe.n_dense_layers layers."""
  moe = _moe(mc)
  if not moe:
    return [('layers', mc.n_layers, False)]
  n_dense = min(moe.n_dense_layers, mc.n_layers)
  groups = [('dense_layers', n_dense, False), ('moe_layers', mc.n_layers - n_dense, True)]
  return [g for g in groups if g[1] > 0]


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


def flops_per_token(mc, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token (forward + backward) under the three conventions in the module doc."""
  n = matmul_params(mc)
  attn_width = mc.n_heads * head_dim(mc)
  attn_full = 12.0 * mc.n_layers * attn_width * seq_len
  return {
      '6N': 6.0 * n,
      'exact': 6.0 * n + attn_full,
      'causal': 6.0 * n + attn_full / 2,
  }


def resolved_vocab_size(mc, tokenizer_vocab_size: int) -> int:
  """The model's vocab: the configured one, or the tokenizer's padded to mc.vocab_multiple."""
  if mc.vocab_size:
    return mc.vocab_size
  return pad_vocab(tokenizer_vocab_size, mc.vocab_multiple)


def human(n: float) -> str:
  for unit, scale in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.3g}'

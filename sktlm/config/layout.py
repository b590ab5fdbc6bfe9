"""The model's layout from its config: head and attention dims, the homogeneous layer stacks, the vocabulary.

The model (sktlm/model/transformer.py) builds its parameter tree from these, and the accounting
(sktlm/config/accounting.py) counts over them, so the two cannot disagree. `mc` is `config.model`. A leaf.
"""

from __future__ import annotations


def pad_vocab(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def head_dim(mc) -> int:
  return mc.head_dim or mc.d_model // mc.n_heads


def attention_dims(mc) -> tuple[int, int]:
  """(qk_dim, v_dim) per query head: the widths of the QK^T and AV matmuls."""
  if is_mla(mc):
    a = mc.mla
    return a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
  return head_dim(mc), head_dim(mc)


def is_mla(mc) -> bool:
  return mc.attention == 'mla'


def moe_of(mc):
  """config.model.moe when the model has experts, else None."""
  return mc.moe if mc.moe.num_experts > 0 else None


def layer_groups(mc) -> list[tuple[str, int, bool]]:
  """(name, number of layers, uses MoE) of each homogeneous stack of layers, in order: the model's parameter
  tree (sktlm/model/transformer.py) and sktlm/config/accounting.py both follow it. MoE models keep a dense
  MLP in the first moe.n_dense_layers layers."""
  moe = moe_of(mc)
  if not moe:
    return [('layers', mc.n_layers, False)]
  n_dense = min(moe.n_dense_layers, mc.n_layers)
  groups = [('dense_layers', n_dense, False), ('moe_layers', mc.n_layers - n_dense, True)]
  return [g for g in groups if g[1] > 0]


def resolved_vocab_size(mc, tokenizer_vocab_size: int) -> int:
  """The model's vocab: the configured one, or the tokenizer's padded to mc.vocab_multiple."""
  if mc.vocab_size:
    return mc.vocab_size
  return pad_vocab(tokenizer_vocab_size, mc.vocab_multiple)

"""Parametrisations: standard (`sp`, today's GPT-style model) and maximal update (`mup`, Yang et al. 2022,
Tensor Programs V), selected by `model.parametrization` with `model.base_width`. All the rules live here;
model/layers.py, model/transformer.py and train/optim.py call them.

muP, for Adam, relative to a base model (this config with d_model = base_width; same layers and heads; every
hidden width, d_ff and head_dim included, is assumed to grow with d_model by m = d_model / base_width):

| class     | what                                  | init std        | Adam LR     | forward multiplier |
|-----------|---------------------------------------|-----------------|-------------|--------------------|
| embedding | the token table                       | init_std        | peak_lr     | 1                  |
| hidden    | matrices with fan_in and fan_out ~ m  | init_std / √m   | peak_lr / m | 1                  |
| head      | the output projection (readout)       | init_std        | peak_lr     | 1 / m on logits    |
| norm      | RMSNorm scales (and any bias)         | 1               | peak_lr     | 1                  |

(the residual output projections keep the GPT-2 1/sqrt(2 L) on top), and attention logits are q.k / d_head
instead of q.k / sqrt(d_head), with the constant sqrt(d_head at base width) in front so that at m = 1 the
two parametrisations are the same function with the same optimiser: muP at base width *is* SP (tested), so
an LR tuned on the base model is the muP LR of every width. This is the "multiplier" form of TP5's Table 8
(the output multiplier 1/m instead of a 1/m^2 init variance and a 1/m LR, equivalent for Adam).
A MoE router (fan_out = num_experts, fixed) is readout-like: init std init_std / m, LR peak_lr / m (Table 3).

Weight decay (decoupled AdamW): the decay of every decayed parameter is peak-schedule x weight_decay per step,
independent of its muP LR multiplier ("independent" weight decay: the decay timescale 1 / (lr x wd) then stays
the same at every width, cf. Wortsman et al. 2023 and Wang & Aitchison 2024; coupling it to the hidden LR would
make wider models decay m times more slowly). Norm scales and biases are not decayed, as in SP.
"""

from __future__ import annotations

import math

import jax

from sktlm.config import layout, schema
from sktlm.errors import UserError

PARAMETRIZATIONS = schema.choices('model.parametrization')
CLASSES = ('embedding', 'hidden', 'head', 'norm', 'router')
NORM_NAMES = ('scale', 'bias')


def is_mup(mc) -> bool:
  return mc.parametrization == 'mup'


def width_mult(mc) -> float:
  """m = d_model / base_width under muP; 1 under SP."""
  return mc.d_model / mc.base_width if is_mup(mc) else 1.0


def init_std(mc, kind: str = 'hidden', scale_by_depth: bool = False) -> float:
  """Normal init std of a weight of class `kind` (SP: init_std for every class, as before)."""
  std = mc.init_std
  if scale_by_depth:
    std = std / math.sqrt(2 * mc.n_layers)
  m = width_mult(mc)
  if kind == 'hidden':
    return std / math.sqrt(m) if m != 1 else std
  if kind == 'router':
    return std / m if m != 1 else std
  return std


def attention_scale(mc, head_dim: int) -> float:
  """The factor on q: 1/sqrt(d_head) (SP) or sqrt(d_head_base) / d_head (muP, d_head_base = d_head / m)."""
  if not is_mup(mc):
    return head_dim**-0.5
  return math.sqrt(head_dim / width_mult(mc)) / head_dim


def logit_multiplier(mc) -> float:
  """The factor on the output logits: 1 (SP) or 1 / m (muP)."""
  return 1.0 / width_mult(mc)


def param_class(names: tuple[str, ...]) -> str:
  """The muP class of a parameter from its path of dict keys ('layers', 'attn', 'wq')."""
  leaf = names[-1] if names else ''
  if leaf in NORM_NAMES:
    return 'norm'
  if leaf == 'embedding':
    return 'embedding'
  if leaf == 'head':
    return 'head'
  if leaf == 'router':
    return 'router'
  return 'hidden'


def _names(path) -> tuple[str, ...]:
  # Dict keys name the parameter (boxed params add a trailing `.value` attribute key).
  return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def param_labels(params):
  """The class label of every parameter, as a tree of strings with the params' structure."""
  return jax.tree_util.tree_map_with_path(lambda path, _: param_class(_names(path)), params)


def lr_multipliers(mc) -> dict[str, float]:
  """Adam LR multiplier per class."""
  m = width_mult(mc)
  return dict(embedding=1.0, hidden=1.0 / m, head=1.0, norm=1.0, router=1.0 / m)


def to_sp_params(params, mc):
  """The same function as SP parameters: the head scaled by the logit multiplier and wq by the ratio of the
  attention scales (for exporting a muP model to code that knows only SP, e.g. a plain Llama). Unboxed params of
  the scanned or unscanned dense model; SP params are returned as they are."""
  if not is_mup(mc):
    return params
  k = layout.head_dim(mc)
  q_ratio = attention_scale(mc, k) / k**-0.5

  def fold(path, x):
    names = _names(path)
    if names[-1:] == ('head',):
      return x * logit_multiplier(mc)
    if names[-2:] == ('attn', 'wq'):
      return x * q_ratio
    return x

  if mc.tie_embeddings:
    raise UserError('to_sp_params: tied embeddings under muP have no SP equivalent with one shared table')
  return jax.tree_util.tree_map_with_path(fold, params)

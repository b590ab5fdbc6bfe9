"""Parametrisations, selected by `model.parametrization`: standard (`sp`, today's GPT-style model), maximal update
(`mup`, Yang et al. 2022, Tensor Programs V) relative to `model.base_width`, and its depth extensions `completep`
(alpha = 1) and `depth_mup` (alpha = 0.5) relative to `model.base_width` and `model.base_depth` (Dey et al. 2025,
"Don't be lazy: CompleteP enables compute-efficient deep transformers"). All the rules live here;
model/layers.py, model/transformer.py and train/optim.py call them.

muP, for Adam, relative to a base model (this config with d_model = base_width; same layers and heads; every
hidden width, d_ff and head_dim included, is assumed to grow with d_model by m = d_model / base_width, unless
model.base_head_dim fixes the head dim):

| class     | what                                  | init std        | Adam LR     | forward multiplier |
|-----------|---------------------------------------|-----------------|-------------|--------------------|
| embedding | the token table                       | init_std        | peak_lr     | 1                  |
| hidden    | matrices with fan_in and fan_out ~ m  | init_std / √m   | peak_lr / m | 1                  |
| head      | the output projection (readout)       | init_std        | peak_lr     | 1 / m on logits    |
| norm      | RMSNorm scales (and any bias) in the blocks | 1         | peak_lr     | 1                  |
| final_norm| the RMSNorm after the last block      | 1               | peak_lr     | 1                  |

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

CompleteP / depth-muP (alpha = 1 / 0.5), m_N = d_model / base_width, m_L = n_layers / base_depth; muP in width
as above, plus (Table 1 of the paper; each rule checked against the authors' code, EleutherAI/nanoGPT-mup
branch `completep` at 6f8bc3b, model.py; where in it after the arrow):

- residual branches: x + m_L^-alpha Attn(LN x), x + m_L^-alpha MLP(LN x) (GQA or MLA, MLP or MoE)
  -> Block.__init__ residual_scaling, Block.forward
- hidden weights: init std init_std / sqrt(m_N), no depth factor (*) -> GPT.__init__ (c_attn, c_fc, c_proj);
  Adam LR peak_lr m_N^-1 m_L^(alpha-1) -> configure_optimizers, hidden_weight_params lr_scale;
  weight decay lambda m_N under coupled AdamW = here schedule x wd x m_L^(alpha-1) (**) -> its weight_decay
- pre-LN gains and hidden biases: LR peak_lr m_L^(alpha-1), not decayed -> hidden_ln_params, hidden_bias_params
- embedding, final norm, head: LR and init unchanged -> emb_params, final_ln_params (lr_scale 1), _init_weights;
  logits x 1/m_N -> GPT.forward (x *= mup_output_alpha / mup_width_multiplier)
- attention: q.k / d_head (muP's) -> CausalSelfAttention.forward (attention_scale = 1 / k.size(-1))
- AdamW epsilon: inside the blocks eps m_N^-1 m_L^-alpha -> configure_optimizers (adam_eps *= ...); outside them
  (embedding, head, final norm) eps m_N^-1 (***)

(*) The GPT-2 1/sqrt(2 L) of the residual output projections becomes the constant 1/sqrt(2 base_depth): the init
does not depend on depth (the table's sigma^2 / m_N), and at m_L = 1 it is the SP init. The reference drops the
GPT-2 factor altogether under muP; a constant is absorbed in the tuned init_std either way.
(**) The reference's torch AdamW decays by lr_group x wd_group = (eta m_N^-1 m_L^(alpha-1)) (lambda m_N) =
eta lambda m_L^(alpha-1) per step: width-independent, which is this module's "independent" decay, and at
alpha = 1 exactly muP's schedule x wd; under depth_mup it keeps the reference's m_L^-0.5.
(***) The reference (6f8bc3b) multiplies its one AdamW eps by m_N^-1 m_L^-alpha for every group; the paper's
Table 1 scopes it to the residual blocks, and here the parameters outside the blocks (embedding, head, final
norm), whose gradients are O(1/m_N) and depth-independent, get eps m_N^-1 (issue 28's table calls this a later
fix of the reference; the stored snapshot 6f8bc3b does not have it).
The MoE router keeps muP's width rule (init std / m_N, LR / m_N) and, like every parameter inside a residual
block, the depth LR factor m_L^(alpha-1), the hidden decay factor and the in-block epsilon.
At m_N = m_L = 1 every parametrisation is the same function with the same optimiser, step for step (tested).
"""

from __future__ import annotations

import math

import jax

from sktlm.config import layout, schema
from sktlm.errors import UserError

PARAMETRIZATIONS = schema.choices('model.parametrization')
DEPTH_ALPHA = {'completep': 1.0, 'depth_mup': 0.5}  # the residual multiplier's exponent: m_L^-alpha
# 'norm': RMSNorm scales and biases inside the residual blocks (pre-LN gains, MLA's latent norms); 'final_norm': the
# one after the last block (its rules are the embedding's, not the blocks').
CLASSES = ('embedding', 'hidden', 'head', 'norm', 'final_norm', 'router')
NORM_NAMES = ('scale', 'bias')
OUTSIDE_BLOCKS = ('embedding', 'head', 'final_norm')


def is_mup(mc) -> bool:
  """muP in width: mup, completep and depth_mup."""
  return mc.parametrization in ('mup',) + tuple(DEPTH_ALPHA)


def depth_alpha(mc) -> float:
  """alpha of completep (1) / depth_mup (0.5); 0 under sp and mup (no depth rule)."""
  return DEPTH_ALPHA.get(mc.parametrization, 0.0)


def width_mult(mc) -> float:
  """m_N = d_model / base_width under muP (and its depth extensions); 1 under SP."""
  return mc.d_model / mc.base_width if is_mup(mc) else 1.0


def depth_mult(mc) -> float:
  """m_L = n_layers / base_depth under completep / depth_mup; 1 otherwise."""
  return mc.n_layers / mc.base_depth if depth_alpha(mc) else 1.0


def residual_multiplier(mc) -> float:
  """The factor on every residual branch's output: m_L^-alpha (reference: Block.residual_scaling); 1 under sp/mup."""
  return depth_mult(mc) ** -depth_alpha(mc) if depth_alpha(mc) else 1.0


def init_std(mc, kind: str = 'hidden', scale_by_depth: bool = False) -> float:
  """Normal init std of a weight of class `kind` (SP: init_std for every class, as before)."""
  std = mc.init_std
  if scale_by_depth:  # GPT-2's 1/sqrt(2 L); a constant at base depth under the depth rules (module doc, *)
    std = std / math.sqrt(2 * (mc.base_depth if depth_alpha(mc) else mc.n_layers))
  m = width_mult(mc)
  if kind == 'hidden':
    return std / math.sqrt(m) if m != 1 else std
  if kind == 'router':
    return std / m if m != 1 else std
  return std


def attention_scale(mc, head_dim: int) -> float:
  """The factor on q: 1/sqrt(d_head) (SP) or sqrt(d_head_base) / d_head (muP): d_head_base = model.base_head_dim,
  or d_head / m when it is 0 (the head dim grows with width at a fixed number of heads)."""
  if not is_mup(mc):
    return head_dim**-0.5
  base = getattr(mc, 'base_head_dim', 0)  # configs written before the key existed: 0
  return math.sqrt(base or head_dim / width_mult(mc)) / head_dim


def logit_multiplier(mc) -> float:
  """The factor on the output logits: 1 (SP) or 1 / m (muP)."""
  return 1.0 / width_mult(mc)


def param_class(names: tuple[str, ...]) -> str:
  """The muP class of a parameter from its path of dict keys ('layers', 'attn', 'wq')."""
  leaf = names[-1] if names else ''
  if leaf in NORM_NAMES:
    return 'final_norm' if 'final_norm' in names else 'norm'
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
  """Adam LR multiplier per class: muP's 1/m_N on hidden weights and the router, times m_L^(alpha-1) on every
  parameter inside a residual block under the depth rules (reference: configure_optimizers, lr_scale)."""
  m = width_mult(mc)
  out = dict(embedding=1.0, hidden=1.0 / m, head=1.0, norm=1.0, final_norm=1.0, router=1.0 / m)
  if depth_alpha(mc):
    d = depth_mult(mc) ** (depth_alpha(mc) - 1)
    out = {k: v if k in OUTSIDE_BLOCKS else v * d for k, v in out.items()}
  return out


def eps_multipliers(mc) -> dict[str, float]:
  """Adam epsilon multiplier per class (depth rules only; sp and mup keep one epsilon): m_N^-1 m_L^-alpha inside
  the residual blocks (reference: adam_eps *= ...), m_N^-1 outside them (module doc, ***)."""
  if not depth_alpha(mc):
    return dict.fromkeys(CLASSES, 1.0)
  m, inside = width_mult(mc), width_mult(mc) ** -1 * depth_mult(mc) ** -depth_alpha(mc)
  return {k: 1.0 / m if k in OUTSIDE_BLOCKS else inside for k in CLASSES}


def decay_multipliers(mc) -> dict[str, float]:
  """Multiplier on the decoupled decay schedule x weight_decay per class (norms are never decayed: optim's mask).
  1 under sp/mup ("independent" decay); under the depth rules the hidden weights' and the router's
  m_L^(alpha-1) = their LR multiplier x m_N, the table's lambda m_N under coupled AdamW (module doc, **)."""
  out = dict.fromkeys(CLASSES, 1.0)
  if depth_alpha(mc):
    out.update(hidden=depth_mult(mc) ** (depth_alpha(mc) - 1), router=depth_mult(mc) ** (depth_alpha(mc) - 1))
  return out


def to_sp_params(params, mc):
  """The same function as SP parameters: the head scaled by the logit multiplier, wq by the ratio of the
  attention scales and the residual branches' output projections by the residual multiplier (for exporting a
  muP model to code that knows only SP, e.g. a plain Llama). Unboxed params of the scanned or unscanned dense
  model; SP params are returned as they are."""
  if not is_mup(mc):
    return params
  k = layout.head_dim(mc)
  q_ratio = attention_scale(mc, k) / k**-0.5
  r = residual_multiplier(mc)

  def fold(path, x):
    names = _names(path)
    if names[-1:] == ('head',):
      return x * logit_multiplier(mc)
    if names[-2:] == ('attn', 'wq'):
      return x * q_ratio
    if r != 1.0 and names[-2:] in (('attn', 'wo'), ('mlp', 'wo')):
      return x * r
    return x

  if mc.tie_embeddings:
    raise UserError('to_sp_params: tied embeddings under muP have no SP equivalent with one shared table')
  return jax.tree_util.tree_map_with_path(fold, params)

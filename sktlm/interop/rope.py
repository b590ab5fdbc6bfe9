"""RoPE between a Hugging Face config.json and sktlm's model.rope_theta / model.rope_scaling.

transformers 5 reads RoPE from several forms of config.json into one `rope_parameters` dict
(PreTrainedConfig.convert_rope_params_to_dict, standardize_rope_params):
- `rope_parameters` {rope_type, rope_theta, ...}: the form it writes;
- `rope_scaling` (older files, DeepSeek-V3's own): the type under `rope_type` or `type` (`rope_type` wins); it
  replaces `rope_parameters` when both are set;
- a top-level `rope_theta` where the dict has none (else 10000); for YaRN a top-level
  `original_max_position_embeddings` over the dict's, and `max_position_embeddings` where neither has one.
`hf_parameters` reads config.json the same way, so an import checks the function transformers computes.

sktlm computes default RoPE and YaRN in DeepSeek-V3's form (sktlm/model/layers.py): cos/sin x
mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the softmax x mscale(factor, mscale_all_dim)^2.
DeepseekV3ForCausalLM computes the same. LlamaForCausalLM's YaRN scales cos/sin by its attention factor and
never the softmax: a Llama checkpoint maps where that factor is mscale(factor) (sktlm's YaRN with
mscale_all_dim = 0) and is refused otherwise. Linear, dynamic, llama3 and the other types are refused. Each
refusal is one line naming the field of config.json.
"""

from __future__ import annotations

import math

import ml_collections

from sktlm.config import schema
from sktlm.errors import UserError
from sktlm.model import layers

DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
YARN_FIELDS = ('factor', 'original_max_position', 'beta_fast', 'beta_slow')  # sktlm's, beside the two mscales


def hf_parameters(cfg: dict) -> tuple[dict, str]:
  """(rope_parameters as transformers reads the config.json `cfg`, the field they came from)."""
  scaling = cfg.get('rope_scaling')
  field = 'rope_scaling' if scaling else 'rope_parameters'
  rp = dict(scaling or cfg.get('rope_parameters') or {})
  rp.setdefault('rope_theta', cfg.get('rope_theta', DEFAULT_THETA))
  if 'partial_rotary_factor' in cfg:
    rp.setdefault('partial_rotary_factor', cfg['partial_rotary_factor'])
  if rope_type(rp) == 'yarn':
    if 'original_max_position_embeddings' in cfg:
      rp['original_max_position_embeddings'] = cfg['original_max_position_embeddings']
    rp.setdefault('original_max_position_embeddings', cfg.get('max_position_embeddings'))
  return rp, field


def rope_type(rp: dict) -> str:
  return rp.get('rope_type', rp.get('type', 'default'))


def _hf_mscale(factor: float, mscale=1.0) -> float:
  """transformers' get_mscale (YaRN's attention factor)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _scales(theta: float, ys: dict) -> tuple[float, float]:
  """(cos/sin factor, softmax factor) of sktlm's model with these RoPE keys (sktlm/model/layers.py)."""
  mc = ml_collections.ConfigDict({'rope_theta': theta, 'rope_scaling': dict(ys)})
  return layers.rope_frequencies(mc, 2)[1], layers.softmax_scale_factor(mc)


def to_sktlm(cfg: dict, fmt: str) -> tuple[float, dict]:
  """(model.rope_theta, model.rope_scaling) of the sktlm model that computes the RoPE transformers reads from
  `cfg` for format `fmt` ('llama' | 'deepseek_v3'); UserError naming the field that cannot map."""
  rp, field = hf_parameters(cfg)
  off = {k.key.rpartition('.')[2]: k.default for k in schema.KEYS if k.key.startswith('model.rope_scaling.')}
  partial = rp.get('partial_rotary_factor')
  if partial not in (None, 1, 1.0):
    raise UserError(f'HF config {field}.partial_rotary_factor={partial!r} is not supported (sktlm rotates whole '
                    'heads)')
  theta, kind = float(rp['rope_theta']), rope_type(rp)
  if kind == 'default':
    return theta, off
  if kind != 'yarn':
    key = 'rope_type' if 'rope_type' in rp else 'type'
    raise UserError(f"HF config {field}.{key}={kind!r} is not supported (sktlm's model computes default RoPE and "
                    "YaRN in DeepSeek-V3's form)")
  if not rp.get('truncate', True):
    raise UserError(f"HF config {field}.truncate={rp['truncate']!r} is not supported (sktlm's YaRN rounds the ramp "
                    'to whole dims, as truncate=true)')
  orig = rp['original_max_position_embeddings']
  if not isinstance(orig, (int, float)) or orig < 1 or orig != int(orig):
    raise UserError(f'HF config {field}.original_max_position_embeddings={orig!r}: YaRN needs a whole number >= 1')
  factor = rp.get('factor')
  if factor is None:  # transformers derives it from the two context lengths
    factor = (cfg.get('max_position_embeddings') or 0) / orig
  if not isinstance(factor, (int, float)) or factor < 1:
    raise UserError(f"HF config {field}.factor={rp.get('factor')!r} is not supported (sktlm's YaRN needs a factor "
                    '>= 1)')
  factor = float(factor)
  ms, msad = rp.get('mscale'), rp.get('mscale_all_dim')
  ys = dict(off, type='yarn', factor=factor, original_max_position=int(orig),
            beta_fast=float(rp.get('beta_fast') or 32), beta_slow=float(rp.get('beta_slow') or 1),
            mscale=float(ms or 0.0), mscale_all_dim=float(msad or 0.0))
  attention = rp.get('attention_factor')
  if attention is None:
    attention = _hf_mscale(factor, ms) / _hf_mscale(factor, msad) if ms and msad else _hf_mscale(factor)
  if fmt == 'llama':  # softmax unscaled: sktlm's YaRN with mscale_all_dim = 0, cos/sin x mscale(factor)
    ys.update(mscale=off['mscale'], mscale_all_dim=0.0)
  cos = _scales(theta, ys)[0]
  if not math.isclose(attention, cos, rel_tol=1e-9):
    name = ('attention_factor' if rp.get('attention_factor') is not None
            else 'mscale_all_dim' if fmt == 'llama' else 'mscale')
    raise UserError(f'HF config {field}.{name}={rp.get(name)!r} is not supported: transformers then scales cos/sin '
                    f"by {attention:.6g}, sktlm's YaRN here by {cos:.6g}")
  return theta, ys


def diffs(mc, cfg: dict, fmt: str) -> list[str]:
  """'key: checkpoint x, config y' for each RoPE key of config.model (rope_theta, rope_scaling.*) that differs
  from what the checkpoint computes; UserError when the checkpoint's RoPE cannot map at all."""
  theta, ys = to_sktlm(cfg, fmt)
  have = mc.rope_scaling
  out = [f'rope_theta: checkpoint {theta!r}, config {float(mc.rope_theta)!r}'] if theta != mc.rope_theta else []
  if have.type != ys['type']:
    return out + [f"rope_scaling.type: checkpoint {ys['type']!r}, config {have.type!r}"]
  if ys['type'] == 'none':
    return out
  out += [f'rope_scaling.{k}: checkpoint {ys[k]!r}, config {have[k]!r}' for k in YARN_FIELDS if have[k] != ys[k]]
  want, got = _scales(theta, ys), _scales(theta, have.to_dict())
  if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(want, got, strict=True)):
    out.append(f"rope_scaling.mscale, mscale_all_dim: checkpoint {ys['mscale']!r}, {ys['mscale_all_dim']!r}, "
               f'config {have.mscale!r}, {have.mscale_all_dim!r}')
  return out


def check_exportable(mc, fmt: str) -> None:
  """UserError unless `fmt` computes sktlm's RoPE (Llama: YaRN only with an unscaled softmax)."""
  ys = layers.rope_scaling(mc)  # UserError for a type or factor the model refuses
  if ys is None or fmt != 'llama':
    return
  cos, softmax = _scales(mc.rope_theta, ys.to_dict())
  if softmax != 1.0 or not math.isclose(cos, _hf_mscale(ys.factor), rel_tol=1e-9):
    raise UserError(f'cannot export model.rope_scaling.mscale_all_dim={ys.mscale_all_dim!r} as LlamaForCausalLM: '
                    "Llama's YaRN does not scale the softmax as DeepSeek-V3's does (mscale_all_dim=0 exports)")


def hf_rope_parameters(mc, fmt: str) -> dict:
  """The `rope_parameters` of config.json that make `fmt` compute sktlm's RoPE (check_exportable first)."""
  out = {'rope_type': 'default', 'rope_theta': float(mc.rope_theta)}
  ys = layers.rope_scaling(mc)
  if ys is not None:
    out.update(rope_type='yarn', factor=float(ys.factor),
               original_max_position_embeddings=int(ys.original_max_position), beta_fast=float(ys.beta_fast),
               beta_slow=float(ys.beta_slow))
    if fmt == 'deepseek_v3':
      out.update(mscale=float(ys.mscale), mscale_all_dim=float(ys.mscale_all_dim))
  return out

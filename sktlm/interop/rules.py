"""Which of sktlm's model keys a Hugging Face format carries: each key's export rule, read from the schema
(sktlm/config/schema.py, `Export`: mapped / neutral / default). The format modules (llama.py, deepseek.py) map
the 'mapped' keys themselves; this module refuses what no rule covers. A leaf of interop/ (no jax).
"""

from __future__ import annotations

import ml_collections

from sktlm.config import schema
from sktlm.errors import UserError

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'deepseek_v3': 'DeepseekV3ForCausalLM'}


def model_config(mc) -> ml_collections.ConfigDict:
  """A copy of config.model (ConfigDict, FrozenConfigDict or a dict of its keys) that config/layout.py and the
  model code read by attribute."""
  return ml_collections.ConfigDict(mc.to_dict() if hasattr(mc, 'to_dict') else dict(mc))


def leaves(mc) -> dict:
  """'rope_scaling.factor' -> value, for every leaf key of config.model."""
  out = {}
  for k, v in (mc.to_dict() if hasattr(mc, 'to_dict') else dict(mc)).items():
    out.update({f'{k}.{kk}': vv for kk, vv in leaves(v).items()} if isinstance(v, dict) else {k: v})
  return out


def check(mc, fmt: str) -> None:
  """UserError for a model key `fmt` cannot carry: one the schema does not list (a config of another sktlm
  version), or one whose rule is 'default' away from its default."""
  arch = ARCHITECTURES[fmt]
  for name, value in sorted(leaves(mc).items()):
    entry = schema.BY_KEY.get(f'model.{name}')
    if entry is None:
      raise UserError(f'cannot export: model.{name} is not a key of this sktlm version, so whether {arch} computes '
                      'it is unknown')
    if entry.export.rule(fmt) == 'default' and value != entry.default:
      raise UserError(f'cannot export: model.{name}={value!r} is a feature {arch} does not compute (it exports at '
                      f'its default, {entry.default!r})')


def mapped(mc, fmt: str) -> dict:
  """The top-level model keys `fmt` maps, with their values (config.json's `sktlm` note)."""
  top = {k.key[len('model.'):] for k in schema.KEYS
         if k.key.startswith('model.') and k.key.count('.') == 1 and k.export.rule(fmt) == 'mapped'}
  return {name: value for name, value in sorted(leaves(mc).items()) if name in top}

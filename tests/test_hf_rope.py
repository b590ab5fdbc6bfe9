"""RoPE forms of a Hugging Face config.json (sktlm/interop/rope.py): every form transformers reads for DeepSeek-V3
and Llama imports with transformers' logits, or is refused in one line naming the field.

Each case is built by transformers itself: a tiny model from a config given in that form, random weights,
save_pretrained, then config.json rewritten into the form (save_pretrained writes `rope_parameters`). The
reference is transformers loading that folder (float32, eager attention); sktlm imports it into a config.model
whose RoPE keys the case states by hand, and must match to 1e-4. Where YaRN is on, the same weights with plain
RoPE must be refused by the import and must miss transformers' logits by far more (the bug of issue 31)."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from test_hf import hf_logits, hf_model, small_model  # noqa: E402

from sktlm.errors import UserError  # noqa: E402
from sktlm.interop import deepseek, hf  # noqa: E402
from sktlm.model import transformer as model_lib  # noqa: E402

TOL = 1e-4
THETA = 500.0
YARN_HF = dict(factor=8.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
               mscale_all_dim=1.0)  # DeepSeek-V3's own fields (its factor is 40, its context 4096)
YARN_SK = dict(type='yarn', factor=8.0, original_max_position=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
               mscale_all_dim=1.0)
V3_DIMS = dict(q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6)
FORMS = {'rope_parameters', 'rope_scaling', 'rope_theta'}  # where config.json may hold RoPE
T = 40  # tokens: past original_max_position_embeddings, so YaRN's interpolated frequencies matter

# name: (model_type, the RoPE fields of config.json, sktlm's rope_theta and rope_scaling for it)
IMPORTS = {
    'v3 rope_parameters yarn': ('deepseek_v3', {'rope_parameters': dict(YARN_HF, rope_type='yarn', rope_theta=THETA)},
                                (THETA, YARN_SK)),
    'v3 rope_scaling type + rope_theta': ('deepseek_v3', {'rope_scaling': dict(YARN_HF, type='yarn'),
                                                          'rope_theta': THETA}, (THETA, YARN_SK)),
    'v3 rope_scaling rope_type, own mscales': (
        'deepseek_v3', {'rope_scaling': dict(YARN_HF, rope_type='yarn', beta_fast=16, beta_slow=2, mscale=0.8,
                                             mscale_all_dim=0.5), 'rope_theta': THETA},
        (THETA, dict(YARN_SK, beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5))),
    'v3 rope_scaling without mscales': ('deepseek_v3', {'rope_scaling': {'type': 'yarn', 'factor': 8.0,
                                                                         'original_max_position_embeddings': 16},
                                                        'rope_theta': THETA},
                                        (THETA, dict(YARN_SK, mscale=0.0, mscale_all_dim=0.0))),
    'v3 rope_scaling over rope_parameters': ('deepseek_v3', {'rope_scaling': dict(YARN_HF, type='yarn'),
                                                             'rope_parameters': {'rope_type': 'default',
                                                                                 'rope_theta': THETA}},
                                             (10000.0, YARN_SK)),  # rope_scaling replaces the whole dict
    'v3 rope_theta alone': ('deepseek_v3', {'rope_theta': THETA}, (THETA, dict(type='none'))),
    'llama rope_theta alone': ('llama', {'rope_theta': THETA}, (THETA, dict(type='none'))),
    'llama rope_parameters default': ('llama', {'rope_parameters': {'rope_type': 'default', 'rope_theta': THETA}},
                                      (THETA, dict(type='none'))),
    'llama rope_scaling type yarn': ('llama', {'rope_scaling': {'type': 'yarn', 'factor': 8.0,
                                                                'original_max_position_embeddings': 16},
                                               'rope_theta': THETA}, (THETA, dict(YARN_SK, mscale_all_dim=0.0))),
    'llama yarn, top-level original_max_position_embeddings': (
        'llama', {'rope_parameters': {'rope_type': 'yarn', 'rope_theta': THETA, 'factor': 8.0, 'beta_fast': 16.0,
                                      'original_max_position_embeddings': 64}, 'original_max_position_embeddings': 16},
        (THETA, dict(YARN_SK, beta_fast=16.0, mscale_all_dim=0.0))),  # the top-level one wins
}

# name: (model_type, the RoPE fields of config.json, the field the refusal names)
REFUSALS = {
    'llama linear': ('llama', {'rope_scaling': {'type': 'linear', 'factor': 2.0}}, "rope_scaling.type='linear'"),
    'llama dynamic': ('llama', {'rope_scaling': {'rope_type': 'dynamic', 'factor': 2.0}},
                      "rope_scaling.rope_type='dynamic'"),
    'llama llama3': ('llama', {'rope_parameters': {'rope_type': 'llama3', 'rope_theta': THETA, 'factor': 8.0,
                                                   'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                                   'original_max_position_embeddings': 16}},
                     "rope_parameters.rope_type='llama3'"),
    "llama yarn with DeepSeek's mscales": ('llama', {'rope_parameters': dict(YARN_HF, rope_type='yarn')},
                                           'rope_parameters.mscale_all_dim=1.0'),
    'llama yarn attention_factor': ('llama', {'rope_parameters': dict(YARN_HF, rope_type='yarn', mscale=None,
                                                                      mscale_all_dim=None, attention_factor=1.0)},
                                    'rope_parameters.attention_factor=1.0'),
    'llama yarn truncate false': ('llama', {'rope_scaling': {'type': 'yarn', 'factor': 8.0, 'truncate': False,
                                                             'original_max_position_embeddings': 16}},
                                  'rope_scaling.truncate=False'),
    'v3 linear': ('deepseek_v3', {'rope_scaling': {'type': 'linear', 'factor': 2.0}, 'rope_theta': THETA},
                  "rope_scaling.type='linear'"),
    'v3 yarn attention_factor': ('deepseek_v3', {'rope_scaling': dict(YARN_HF, type='yarn', attention_factor=0.5)},
                                 'rope_scaling.attention_factor=0.5'),
}


def hf_config_kwargs(model_type):
  common = dict(vocab_size=384, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
  if model_type == 'llama':
    return transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(common, num_key_value_heads=2, head_dim=16)
  return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, dict(
      common, num_key_value_heads=4, first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1,
      moe_intermediate_size=8, n_shared_experts=1, n_group=1, topk_group=1, **V3_DIMS)


def build(tmp_path, model_type, rope_fields, seed=0):
  """A folder saved by transformers whose config.json holds RoPE in the form `rope_fields` (and nothing else)."""
  config_cls, model_cls, kw = hf_config_kwargs(model_type)
  config = config_cls(**kw, **json.loads(json.dumps(rope_fields)))  # (a copy: transformers edits the dicts)
  torch.manual_seed(seed)
  model = model_cls(config)
  with torch.no_grad():
    for p in model.parameters():
      p.uniform_(0.5, 1.5) if p.ndim == 1 else p.normal_(0.0, 0.15)
  folder = str(tmp_path / 'hf')
  model.save_pretrained(folder)
  path = os.path.join(folder, 'config.json')
  cfg = {k: v for k, v in json.load(open(path)).items() if k not in FORMS}
  json.dump({**cfg, **rope_fields}, open(path, 'w'), indent=2)
  return folder


def sktlm_model(model_type, theta, rope_scaling):
  mc = small_model(rope_theta=theta, norm_eps=1e-5)
  mc.rope_scaling.update(rope_scaling)
  if model_type == 'deepseek_v3':
    mc.update(attention='mla')
    mc.mla.update(V3_DIMS, latent_norm_eps=1e-6)
  return mc


def sktlm_logits(mc, params, tokens):
  logits, _ = jax.jit(model_lib.make_model(mc).apply)({'params': params}, jnp.asarray(tokens))
  return np.asarray(logits)


def import_params(mc, folder):
  cfg, tensors = hf.read_folder(folder)
  hf.check_importable(mc, cfg)
  if cfg['model_type'] == 'deepseek_v3':
    return deepseek.from_hf_tensors(mc, tensors)[0]
  return hf.from_hf_tensors(mc, tensors)


@pytest.mark.parametrize('case', sorted(IMPORTS))
def test_every_rope_form_imports_with_transformers_logits(tmp_path, case):
  model_type, fields, (theta, rope_scaling) = IMPORTS[case]
  folder = build(tmp_path, model_type, fields)
  assert set(json.load(open(os.path.join(folder, 'config.json')))) & FORMS == set(fields) & FORMS
  tokens = np.random.default_rng(1).integers(3, 259, (2, T))
  theirs = hf_logits(hf_model(folder), tokens)
  mc = sktlm_model(model_type, theta, rope_scaling)
  params = import_params(mc, folder)
  ours = sktlm_logits(mc, params, tokens)
  assert ours.std() > 0.3, 'logits too small for the tolerance to mean anything'
  assert np.abs(ours - theirs).max() < TOL, np.abs(ours - theirs).max()
  if rope_scaling['type'] == 'yarn':  # plain RoPE is refused, and would be far off
    plain = sktlm_model(model_type, theta, dict(type='none'))
    with pytest.raises(UserError, match="rope_scaling.type: checkpoint 'yarn', config 'none'"):
      import_params(plain, folder)
    assert np.abs(sktlm_logits(plain, params, tokens) - theirs).max() > 100 * TOL


@pytest.mark.parametrize('case', sorted(REFUSALS))
def test_a_rope_form_sktlm_cannot_compute_is_refused_in_one_line(tmp_path, case):
  model_type, fields, field = REFUSALS[case]
  folder = build(tmp_path, model_type, fields)
  tokens = np.random.default_rng(1).integers(3, 259, (1, T))
  assert np.isfinite(hf_logits(hf_model(folder), tokens)).all()  # a form transformers reads and computes
  cfg, _ = hf.read_folder(folder)
  for rope_scaling in (dict(type='none'), YARN_SK):
    with pytest.raises(UserError, match=f'HF config {field}') as e:
      hf.check_importable(sktlm_model(model_type, THETA, rope_scaling), cfg)
    assert '\n' not in str(e.value)


def test_llama_yarn_with_an_unscaled_softmax_exports_with_sktlm_logits(tmp_path):
  """sktlm's YaRN with mscale_all_dim = 0 is Llama's: the exported folder loads in transformers with sktlm's
  logits and imports back; the same weights without YaRN miss them by far more."""
  from test_hf import export, random_params
  mc = sktlm_model('llama', THETA, dict(YARN_SK, mscale_all_dim=0.0))
  params = random_params(mc)
  folder = export(tmp_path, 'yarn', mc, params)
  assert json.load(open(os.path.join(folder, 'config.json')))['rope_parameters']['rope_type'] == 'yarn'
  tokens = np.random.default_rng(2).integers(3, 259, (2, T))
  theirs = hf_logits(hf_model(folder), tokens)
  assert np.abs(sktlm_logits(mc, params, tokens) - theirs).max() < TOL
  assert np.abs(sktlm_logits(mc, import_params(mc, folder), tokens) - theirs).max() < TOL
  plain = sktlm_model('llama', THETA, dict(type='none'))
  assert np.abs(sktlm_logits(plain, params, tokens) - theirs).max() > 100 * TOL

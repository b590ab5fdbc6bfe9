"""DeepSeek-V3 interop (sktlm/interop/deepseek.py): MLA and MLA + MoE models exported as DeepseekV3ForCausalLM
load in real transformers (torch, CPU, float32, eager attention) and compute sktlm's logits to 1e-4; the
folder imports back to the same params and routing bias. Small random models shaped like the flagship (MLA with
a query bottleneck, a dense first layer, sigmoid routing with a non-zero aux-free bias, a shared expert,
group-limited routing, routed_scaling_factor, YaRN). Negative controls: skipping the rope permutation, or
exporting without the train state's bias, breaks parity."""

import os

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from test_hf import hf_model, random_params, small_model  # noqa: E402

from sktlm.data import tokenizers  # noqa: E402
from sktlm.errors import UserError  # noqa: E402
from sktlm.interop import deepseek, hf  # noqa: E402
from sktlm.model import transformer as model_lib  # noqa: E402

TOL = 1e-4
MLA = dict(attention='mla', mla=dict(q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                     v_head_dim=6, latent_norm_eps=1e-6))
MOE = dict(num_experts=8, top_k=3, num_shared_experts=1, expert_d_ff=24, n_dense_layers=1, gate='sigmoid',
           renormalize=True, balance='aux_free', n_group=4, topk_group=2, routed_scaling_factor=2.5)
YARN = dict(type='yarn', factor=8.0, original_max_position=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
            mscale_all_dim=1.0)
CASES = {
    'dense_mla': dict(n_layers=2, **MLA),
    'mla_moe_bias': dict(n_layers=3, **MLA, moe=MOE),
    'mla_moe_yarn_direct_q': dict(n_layers=2, attention='mla', mla=dict(MLA['mla'], q_lora_rank=0),
                                  moe=dict(MOE, n_group=1, topk_group=1), rope_scaling=YARN, tie_embeddings=True),
}


def bias_state(mc, seed=1):
  m = model_lib.make_model(mc)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
  if 'moe_bias' not in shapes:
    return {}
  rng = np.random.default_rng(seed)
  return {'moe_bias': jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes['moe_bias'])}


def logits_of(mc, params, state, tokens):
  out, _ = jax.jit(model_lib.make_model(mc).apply)({'params': params, **state}, jnp.asarray(tokens))
  return np.asarray(out)


def export(tmp_path, mc, params, state, name='hf'):
  out = str(tmp_path / name)
  hf.write_folder(out, mc, params, max_position_embeddings=64, tokenizer=tokenizers.ByteTokenizer(),
                  model_state=state)
  return out


def torch_logits(folder, tokens):
  with torch.no_grad():
    return hf_model(folder)(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize('case', sorted(CASES))
def test_exported_deepseek_v3_matches_sktlm_logits(tmp_path, case):
  mc = small_model(**CASES[case])
  params, state = random_params(mc, seed=2), bias_state(mc)
  tokens = np.random.default_rng(3).integers(3, 259, (2, 40))  # 40 > original_max_position 16 of the yarn case
  ref = logits_of(mc, params, state, tokens)
  folder = export(tmp_path, mc, params, state)
  model = hf_model(folder)
  assert type(model).__name__ == 'DeepseekV3ForCausalLM'
  got = torch_logits(folder, tokens)
  assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()
  # The folder imports back to the same params and routing bias.
  import json
  cfg, tensors = hf.read_folder(folder)
  hf.check_importable(mc, cfg)
  params2, state2 = deepseek.from_hf_tensors(hf.as_dict(mc), tensors)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (params, state),
               (params2, state2))
  assert json.load(open(os.path.join(folder, 'config.json')))['rope_interleave'] is True


def test_negative_controls_rope_permutation_and_bias(tmp_path, monkeypatch):
  mc = small_model(**CASES['mla_moe_bias'])
  params, state = random_params(mc, seed=2), bias_state(mc)
  tokens = np.random.default_rng(3).integers(3, 259, (2, 24))
  ref = logits_of(mc, params, state, tokens)
  no_bias = torch_logits(export(tmp_path, mc, params, {}, 'no_bias'), tokens)
  assert np.abs(no_bias - ref).max() > 100 * TOL  # routing bias dropped: other experts
  monkeypatch.setattr(deepseek, 'rope_perm', lambda R: np.arange(R))
  no_perm = torch_logits(export(tmp_path, mc, params, state, 'no_perm'), tokens)
  assert np.abs(no_perm - ref).max() > 100 * TOL  # half-layout rope columns read as interleaved pairs


@pytest.mark.parametrize('over, msg', [
    (dict(moe=dict(MOE, gate='softmax')), 'sigmoid'),
    (dict(moe=dict(MOE, num_shared_experts=0)), 'shared expert'),
    (dict(mla=dict(MLA['mla'], latent_norm_eps=0.0)), 'latent_norm_eps'),
    (dict(attention='gqa', moe=MOE), 'grouped-query'),
    (dict(parametrization='mup', base_width=32), 'parametrization'),
])
def test_what_cannot_map_is_refused_in_one_line(over, msg):
  mc = small_model(**{**CASES['mla_moe_bias'], **over})
  with pytest.raises(UserError, match=msg) as e:
    hf.check_exportable(mc)
  assert '\n' not in str(e.value)


def test_import_refuses_a_checkpoint_of_another_shape(tmp_path):
  mc = small_model(**CASES['mla_moe_bias'])
  folder = export(tmp_path, mc, random_params(mc, seed=2), bias_state(mc))
  cfg, _ = hf.read_folder(folder)
  other = small_model(**{**CASES['mla_moe_bias'], 'moe': dict(MOE, topk_group=1)})
  with pytest.raises(UserError, match='topk_group'):
    hf.check_importable(other, cfg)
  with pytest.raises(UserError, match='Llama'):
    hf.check_importable(mc, dict(cfg, model_type='llama'))

"""Hugging Face interop: exported folders load in transformers (torch, CPU) and compute sktlm's logits.

The reference is transformers' own LlamaForCausalLM in float32 (eager attention); negative controls (a
Meta-style q/k rotary permutation, a transposed weight) must break parity, so the comparison can fail.
"""

import os

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sktlm.config import layout, schema  # noqa: E402
from sktlm.data import tokenizers  # noqa: E402
from sktlm.errors import UserError  # noqa: E402
from sktlm.interop import hf  # noqa: E402
from sktlm.model import transformer as model_lib  # noqa: E402
from sktlm.tools import evaluate  # noqa: E402

TOL = 1e-4


def small_model(**over):
  mc = schema.get_config('pico').model
  mc.update(dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=384, init_std=0.1,
                 attention_block=16, rope_theta=500.0, norm_eps=1e-5))
  mc.update(over)
  return mc


def random_params(mc, seed=0):
  """model.init with a large init_std, and norm scales drawn from U(0.5, 1.5) (not the trivial ones)."""
  import flax.linen as nn
  m = model_lib.make_model(mc)
  init = jax.jit(lambda rng: m.init(rng, jnp.zeros((1, 8), jnp.int32))['params'])
  params = nn.meta.unbox(init(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32) if 'scale' in jax.tree_util.keystr(p)
      else np.asarray(x), params)


def sktlm_logits(mc, params, tokens_BxT, positions=None, segment_ids=None):
  apply = jax.jit(model_lib.make_model(mc).apply)
  logits, _ = apply({'params': params}, jnp.asarray(tokens_BxT), positions, segment_ids)
  return np.asarray(logits)


def hf_model(folder):
  m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation='eager',
                                                        local_files_only=True)
  return m.eval()


def hf_logits(m, tokens_BxT):
  with torch.no_grad():
    return m(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.numpy()


def export(tmp_path, name, mc, params, **kw):
  out = str(tmp_path / name)
  hf.write_folder(out, mc, params, max_position_embeddings=256, tokenizer=tokenizers.ByteTokenizer(), **kw)
  return out


def meta_permute(w_OxD, n_heads):
  """transformers' Meta->HF q/k permutation (interleaved pairs -> halves): wrong for sktlm's layout."""
  O, D = w_OxD.shape
  return w_OxD.reshape(n_heads, O // n_heads // 2, 2, D).transpose(0, 2, 1, 3).reshape(O, D)


@pytest.mark.parametrize('variant,shard', [
    (dict(tie_embeddings=False), False),                                            # GQA 4/2, untied
    (dict(tie_embeddings=True, n_kv_heads=4, head_dim=24, scan_layers=False), True),  # MHA, tied, K != D/H
])
def test_logit_parity_with_transformers(tmp_path, variant, shard):
  mc = small_model(**variant)
  params = random_params(mc)
  folder = export(tmp_path, 'm', mc, params, **({'max_shard_bytes': 64 * 1024} if shard else {}))
  files = os.listdir(folder)
  assert (hf.INDEX in files) == shard and (hf.WEIGHTS in files) != shard
  assert sum(f.endswith('.safetensors') for f in files) > (3 if shard else 0)
  m = hf_model(folder)
  assert type(m).__name__ == 'LlamaForCausalLM'
  assert m.config.tie_word_embeddings == mc.tie_embeddings and m.config.head_dim == layout.head_dim(mc)
  rng = np.random.default_rng(1)
  T = 3 * mc.attention_block + 5  # several attention blocks
  tokens = rng.integers(3, 259, (2, T))
  # Row 3: a packed row (two documents + padding), compared against each document alone in transformers.
  lens = (29, 23)
  docs = [rng.integers(3, 259, n) for n in lens]
  row, seg, pos = np.zeros(T, np.int64), np.zeros(T, np.int32), np.zeros(T, np.int32)
  s = 0
  for i, d in enumerate(docs):
    row[s:s + len(d)], seg[s:s + len(d)], pos[s:s + len(d)] = d, i + 1, np.arange(len(d))
    s += len(d)
  positions = np.concatenate([np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)), pos[None]])
  segments = np.concatenate([np.ones((2, T), np.int32), seg[None]])
  all_logits = sktlm_logits(mc, params, np.concatenate([tokens, row[None]]), jnp.asarray(positions),
                            jnp.asarray(segments))
  ours, packed = all_logits[:2], all_logits[2]
  theirs = hf_logits(m, tokens)
  assert ours.std() > 0.3, 'logits too small for the tolerance to mean anything'
  assert np.abs(ours - theirs).max() < TOL
  s = 0
  for d in docs:
    assert np.abs(packed[s:s + len(d)] - hf_logits(m, d[None])[0]).max() < TOL
    s += len(d)

  # Negative controls: the same comparison with a wrong mapping must fail.
  tensors = hf.to_hf_tensors(mc, params)
  wrong = dict(tensors)
  for k in [k for k in tensors if k.endswith(('q_proj.weight', 'k_proj.weight'))]:
    n = mc.n_heads if 'q_proj' in k else mc.n_kv_heads
    wrong[k] = np.ascontiguousarray(meta_permute(tensors[k], n))
  bad_rope = _load_tensors(m, wrong)
  assert np.abs(ours - hf_logits(bad_rope, tokens)).max() > 100 * TOL
  gate = 'model.layers.0.mlp.gate_proj.weight'  # square (d_ff == d_model): transposing it still loads
  wrong = dict(tensors, **{gate: np.ascontiguousarray(tensors[gate].T)})
  bad_transpose = _load_tensors(m, wrong)
  assert np.abs(ours - hf_logits(bad_transpose, tokens)).max() > 100 * TOL


def _load_tensors(m, tensors):
  import copy
  m2 = copy.deepcopy(m)
  m2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False)
  return m2


def test_mup_model_exports_with_its_multipliers_folded(tmp_path):
  """A muP model (width 2x its base: attention 1/d_head scale and logit multiplier != SP's) loads in transformers
  with the same logits; exporting the unfolded weights (a wrong mapping) does not match."""
  mc = small_model(parametrization='mup', base_width=32)
  params = random_params(mc)
  m = hf_model(export(tmp_path, 'mup', mc, params))
  tokens = np.random.default_rng(2).integers(3, 259, (2, 2 * mc.attention_block + 3))
  ours, theirs = sktlm_logits(mc, params, tokens), hf_logits(m, tokens)
  assert np.abs(ours - theirs).max() < TOL
  unfolded = _load_tensors(m, hf.to_hf_tensors(dict(hf.as_dict(mc), parametrization='sp'), params))
  assert np.abs(ours - hf_logits(unfolded, tokens)).max() > 1e-2
  with pytest.raises(UserError, match='tied embeddings'):
    export(tmp_path, 'tied', small_model(parametrization='mup', base_width=32, tie_embeddings=True), params)
  assert not os.path.exists(tmp_path / 'tied')


def test_round_trip_is_bit_exact(tmp_path):
  """sktlm -> HF folder (sharded) -> sktlm: every parameter bit-exact, scanned and unrolled layouts."""
  import flax.linen as nn
  for scan in (True, False):
    mc = small_model(scan_layers=scan)
    init = model_lib.make_model(mc).init
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s, rng=rng: rng.standard_normal(s.shape).astype(np.float32), nn.meta.unbox(shapes))
    folder = export(tmp_path, f'sharded{scan}', mc, params, max_shard_bytes=64 * 1024)
    cfg, tensors = hf.read_folder(folder)
    hf.check_importable(mc, cfg)
    back = hf.from_hf_tensors(mc, tensors)
    assert jax.tree.structure(params) == jax.tree.structure(back)
    jax.tree.map(np.testing.assert_array_equal, params, back)


def test_refusals():
  mc = small_model()
  mc.moe.num_experts = 4
  with pytest.raises(UserError, match='MoE'):
    hf.check_exportable(mc)
  with pytest.raises(UserError, match='model.logit_multiplier is not a key of this sktlm version'):
    hf.check_exportable(dict(small_model().to_dict(), logit_multiplier=1.0))  # unknown: no rule says it maps
  hf.check_exportable(small_model(parametrization='mup', base_width=32))  # write_folder folds its multipliers
  with pytest.raises(UserError, match="parametrization='mup' with tied embeddings"):
    hf.check_exportable(small_model(parametrization='mup', base_width=32, tie_embeddings=True))
  with pytest.raises(UserError, match="parametrization='mup' cannot"):
    hf.to_hf_tensors(small_model(parametrization='mup', base_width=32), random_params(small_model()))
  # MLA exports as DeepseekV3ForCausalLM (tests/test_hf_deepseek.py), whose latent norms need V3's epsilon.
  with pytest.raises(UserError, match='latent_norm_eps=1e-6'):
    hf.check_exportable(small_model(attention='mla'))
  yarn = dict(small_model().rope_scaling.to_dict(), type='yarn', factor=4.0)  # mscale_all_dim=1: softmax scaled
  with pytest.raises(UserError, match=r"mscale_all_dim=1.0 as LlamaForCausalLM: Llama's YaRN does not scale"):
    hf.check_exportable(small_model(rope_scaling=yarn))
  hf.check_exportable(small_model(rope_scaling=dict(yarn, mscale_all_dim=0.0)))  # exports (tests/test_hf_rope.py)
  cfg = hf.hf_config(small_model(), max_position_embeddings=64, tokenizer_vocab_size=259)
  with pytest.raises(UserError, match='n_kv_heads: checkpoint 2, config 4'):
    hf.check_importable(small_model(n_kv_heads=4), cfg)
  with pytest.raises(UserError, match='rope_theta'):
    hf.check_importable(small_model(rope_theta=10000.0), cfg)
  with pytest.raises(UserError, match='attention_bias'):
    hf.check_importable(small_model(), dict(cfg, attention_bias=True))


def test_a_new_model_key_at_its_default_leaves_llama_export_working(tmp_path, monkeypatch):
  """A string model key whose default is no 'off' word (a future model.activation='swiglu'), added to the schema
  with no export rule: a Llama model leaving it at its default exports and imports back with transformers'
  logits; another value is refused in one line (the rule comes from the schema, sktlm/interop/rules.py)."""
  key = schema.Key('model.activation', 'swiglu', ('swiglu', 'gelu'), schema.BREAKS, 'MLP activation')
  monkeypatch.setattr(schema, 'KEYS', schema.KEYS + (key,))
  monkeypatch.setitem(schema.BY_KEY, key.key, key)
  mc = small_model()
  assert mc.activation == 'swiglu'
  params = random_params(mc)
  folder = export(tmp_path, 'm', mc, params)
  cfg, tensors = hf.read_folder(folder)
  hf.check_importable(mc, cfg)
  back = hf.from_hf_tensors(mc, tensors)
  tokens = np.random.default_rng(4).integers(3, 259, (2, 2 * mc.attention_block + 3))
  theirs = hf_logits(hf_model(folder), tokens)
  for p in (params, back):
    assert np.abs(sktlm_logits(mc, p, tokens) - theirs).max() < TOL
  with pytest.raises(UserError, match="model.activation='gelu' is a feature LlamaForCausalLM does not compute") as e:
    hf.check_exportable(small_model(activation='gelu'))
  assert '\n' not in str(e.value)


def test_every_model_key_states_a_known_export_rule():
  for k in schema.KEYS:
    assert {k.export.llama, k.export.deepseek_v3} <= set(schema.EXPORT_RULES), k.key
    assert k.key.startswith('model.') or k.export == schema.DEFAULT_ONLY, k.key  # a rule only where export reads


SAMPLES = ['hello world', '  two  spaces\n\ttab\r\n', 'naïve café 日本語 🙂', '', ' leading', 'ß\x00\x01\x7f',
           '<s> a literal </s> <pad>', 'def f(x):\n    return x  # é\n' * 3]


def test_tokenizer_export_encodes_identically(tmp_path):
  toks = [tokenizers.ByteTokenizer()]
  import glob
  texts = [open(p, encoding='utf-8', errors='replace').read() for p in sorted(glob.glob(os.path.join(
      os.path.dirname(os.__file__), 'json', '*.py')))]
  toks.append(tokenizers.train_sentencepiece(texts, str(tmp_path / 'sp.model'), 400, num_threads=1))
  for i, tok in enumerate(toks):
    out = tmp_path / f't{i}'
    out.mkdir()
    from sktlm.data import hf_tokenizer
    hf_tokenizer.export(tok, str(out))
    ht = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    nbytes = evaluate.token_bytes(tok, 512)
    n = 0
    for text in SAMPLES + texts[:4]:
      ids = tok.encode(text)
      assert ht(text, add_special_tokens=False)['input_ids'] == ids, (i, text[:30])
      assert ht(text)['input_ids'] == [tok.bos_id] + ids
      assert ht.decode(ids) == text
      assert nbytes[ids].sum() == len(text.encode('utf-8'))  # sktlm eval's bits-per-byte denominator
      n += len(ids)
    assert n > 1000 and (ht.bos_token_id, ht.eos_token_id, ht.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)

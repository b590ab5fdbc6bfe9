"""KV-cached decoding (sktlm/tools/decode.py) against the plain model's full forward passes.

The reference: the uncached model run on the whole sequence (prompt + generated tokens): by causality its
logits at position t are what a fresh full forward pass over tokens[:t+1] gives. Negative controls show the
comparison catches a wrong RoPE offset and a wrong cache slot.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sktlm import sharding
from sktlm.config import schema
from sktlm.model import transformer as model_lib
from sktlm.tools import decode
from sktlm.train import resolve, step

TOL = 1e-4


def small_model(**over):
  mc = schema.get_config('pico').model
  mc.update(dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=384, init_std=0.1,
                 attention_block=8))
  mc.update(over)
  return mc


def random_params(mc, seed=0):
  m = model_lib.make_model(mc)
  params = nn.meta.unbox(jax.jit(lambda r: m.init(r, jnp.zeros((1, 8), jnp.int32))['params'])(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)  # non-trivial norm scales
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32) if 'scale' in jax.tree_util.keystr(p)
      else x, params)


def full_logits(mc, params, tokens_BxT):
  return np.asarray(jax.jit(model_lib.make_model(mc).apply)({'params': params}, jnp.asarray(tokens_BxT))[0])


@pytest.fixture(scope='module')
def model():
  mc = small_model()
  return mc, random_params(mc)


def test_greedy_equals_full_forward_argmax_also_sharded(model):
  mc, params = model
  P, N = 19, 24  # the prompt spans three attention blocks
  prompt = np.random.default_rng(0).integers(3, 259, (2, P))
  opts = decode.SamplingOptions(max_new_tokens=N, temperature=0.0, vocab_limit=259, keep_logits=True)
  toks, lens, step_logits = decode.Sampler(mc, 2, P, opts)(params, prompt, jax.random.PRNGKey(0))
  assert toks.shape == (2, N) and list(lens) == [N, N]
  ref = full_logits(mc, params, np.concatenate([prompt, toks], 1))[:, P - 1:-1]
  assert np.abs(step_logits - ref).max() < TOL
  assert (ref[..., :259].argmax(-1) == toks).all()
  assert len(set(toks.ravel().tolist())) > 5  # not a degenerate repetition

  # The same on a mesh that shards the params (fsdp x tensor) as training does.
  config = schema.get_config('pico')
  config.model = mc
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  sharded = jax.device_put(params, setup.state_shardings.params)
  assert not sharded['layers']['attn']['wq'].sharding.is_fully_replicated
  toks2, _, logits2 = decode.Sampler(mc, 2, P, opts, mesh, setup.rules)(sharded, prompt, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(toks2, toks)
  assert np.abs(logits2 - step_logits).max() < TOL


def _manual_step(mc, params, seq, P):
  """Prefills seq[:, :P], then returns step(position, slot): the logits of one decode step of seq[:, P] written
  at cache slot `slot` with RoPE position `position` (the bookkeeping decode.py does, by hand)."""
  sampler = decode.Sampler(mc, 1, P, decode.SamplingOptions(max_new_tokens=3))
  _, cache = sampler.prefill(params, jnp.asarray(seq[:, :P]))
  m = model_lib.make_model(mc, decode=True)

  @jax.jit
  def decode_step(position, slot):
    c = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, slot) if 'index' in jax.tree_util.keystr(p) else x, cache)
    (logits, _), _ = m.apply({'params': params, 'cache': c}, jnp.asarray(seq[:, P:]), jnp.full((1, 1), position),
                             mutable=['cache'])
    return logits[0, 0]
  return decode_step


def test_wrong_rope_offset_or_cache_slot_is_caught(model):
  """One decode step by hand: right position and slot match the full forward; a shifted RoPE position or a
  shifted cache slot does not (what a bug in decode.py's bookkeeping would do)."""
  mc, params = model
  P = 11
  seq = np.random.default_rng(1).integers(3, 259, (1, P + 1))
  ref = full_logits(mc, params, seq)[0, P]
  decode_step = _manual_step(mc, params, seq, P)

  assert np.abs(decode_step(P, P) - ref).max() < TOL
  assert np.abs(decode_step(P + 1, P) - ref).max() > 100 * TOL  # RoPE offset off by one
  assert np.abs(decode_step(P, P + 1) - ref).max() > 100 * TOL  # cache slot off by one (a stale zero key is seen)
  assert np.abs(decode_step(P, P - 1) - ref).max() > 100 * TOL  # overwrites the last prompt key


def test_stop_at_end_of_document(model):
  mc, params = model
  prompt = np.random.default_rng(2).integers(3, 259, (1, 5))
  greedy = decode.SamplingOptions(max_new_tokens=12, temperature=0.0, vocab_limit=259)
  toks, _, _ = decode.Sampler(mc, 1, 5, greedy)(params, prompt, jax.random.PRNGKey(0))
  eos = int(toks[0, 4])  # pretend the 5th generated token ends the document
  first = int(np.argmax(toks[0] == eos))
  stop = decode.SamplingOptions(max_new_tokens=12, temperature=0.0, vocab_limit=259, eos_id=eos, pad_id=0)
  toks2, lens, _ = decode.Sampler(mc, 1, 5, stop)(params, prompt, jax.random.PRNGKey(0))
  assert int(lens[0]) == first + 1
  np.testing.assert_array_equal(toks2[0, :first + 1], toks[0, :first + 1])
  assert (toks2[0, first + 1:] == 0).all()


def test_sampling_distribution_top_k_top_p():
  """Frequencies over 20000 draws against the renormalised softmax (6 sigma), masks exact."""
  logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
  n = 20000
  batch = jnp.asarray(np.tile(logits, (n, 1)))

  def freqs(**kw):
    opts = decode.SamplingOptions(**kw)
    ids = np.asarray(decode.sample_logits(batch, jax.random.PRNGKey(0), opts))  # eager: no compile per option
    return np.bincount(ids, minlength=6) / n

  def check(f, keep, temperature=1.0):
    p = np.zeros(6)
    p[keep] = np.exp(logits[keep] / temperature)
    p /= p.sum()
    assert np.all(np.abs(f - p) <= 6 * np.sqrt(p * (1 - p) / n) + 1e-9), (f, p)

  check(freqs(), list(range(6)))
  check(freqs(temperature=0.5), list(range(6)), 0.5)
  check(freqs(top_k=3), [0, 1, 2])
  check(freqs(top_p=0.7), [0, 1, 2])     # 0.4 + 0.25 < 0.7 <= 0.8
  check(freqs(top_p=0.6), [0, 1])        # 0.4 + 0.25 reaches 0.6
  check(freqs(vocab_limit=4), [0, 1, 2, 3])
  assert freqs(temperature=0.0)[0] == 1.0


# ---------------------------------------------------------------- MLA (latent cache) and MoE (routing bias)
MLA = dict(attention='mla', mla=dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                     v_head_dim=6, latent_norm_eps=1e-6))
MOE = dict(num_experts=8, top_k=2, num_shared_experts=1, expert_d_ff=32, n_dense_layers=1, gate='sigmoid',
           capacity_factor=0.0, dispatch='dropless')


def moe_state(mc, seed=3):
  """A non-zero routing bias per MoE layer, large enough to change which experts win (as after training)."""
  m = model_lib.make_model(mc)
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)
  return {'moe_bias': jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                                   nn.meta.unbox(shapes['moe_bias']))}


def full_logits_state(mc, params, state, tokens_BxT):
  return np.asarray(jax.jit(model_lib.make_model(mc).apply)({'params': params, **state}, jnp.asarray(tokens_BxT))[0])


@pytest.mark.parametrize('kind', ['mla', 'mla_moe', 'mla_moe_aux_free', 'gqa_moe_aux_free'])
def test_greedy_mla_moe_equals_full_forward_argmax(kind):
  """Greedy decoding of MLA (latent cache, absorbed up-projections), MLA + MoE, MLA + aux-free MoE and GQA +
  aux-free MoE with a non-zero routing bias from the train state: every step's logits equal the full forward
  pass's (1e-4) and the tokens are its argmax. Negative control: the aux-free models decoded without their bias
  (zero bias) differ."""
  over = dict(MLA) if kind.startswith('mla') else {}
  if kind != 'mla':
    over['moe'] = dict(MOE, balance='aux_free' if kind.endswith('aux_free') else 'aux_loss')
  mc = small_model(**over)
  params = random_params(mc, seed=4)
  state = moe_state(mc) if kind.endswith('aux_free') else {}
  P, N = 13, 12
  prompt = np.random.default_rng(5).integers(3, 259, (2, P))
  opts = decode.SamplingOptions(max_new_tokens=N, temperature=0.0, vocab_limit=259, keep_logits=True)
  sampler = decode.Sampler(mc, 2, P, opts)
  toks, _, step_logits = sampler(params, prompt, jax.random.PRNGKey(0), model_state=state)
  ref = full_logits_state(mc, params, state, np.concatenate([prompt, toks], 1))[:, P - 1:-1]
  assert np.abs(step_logits - ref).max() < TOL
  assert (ref[..., :259].argmax(-1) == toks).all()
  assert len(set(toks.ravel().tolist())) > 4
  # The cache is the latent (kv_lora_rank) and the shared rope key (qk_rope_head_dim) per token, never expanded.
  cache = jax.eval_shape(sampler.prefill, params, jnp.asarray(prompt), state)[1]
  shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(cache)}
  widths = {'ckv': 8, 'krope': 4} if kind.startswith('mla') else {'k': 16, 'v': 16}
  for k, s in shapes.items():
    name = k.split("'")[-2]
    assert name == 'index' or (name in widths and s[2] == P + N and s[-1] == widths[name]), shapes  # L x B x S x ..
  if state:
    _, _, no_bias = sampler(params, prompt, jax.random.PRNGKey(0), model_state={})
    assert np.abs(no_bias - ref).max() > 100 * TOL  # decoding without the train state's bias: other experts


def test_mla_wrong_cache_slot_is_caught():
  """One MLA decode step by hand against the full forward: right slot matches; a slot past the prompt (a stale
  zero latent is attended) or one that overwrites the last prompt latent does not."""
  mc = small_model(**MLA)
  params = random_params(mc, seed=6)
  P = 9
  seq = np.random.default_rng(7).integers(3, 259, (1, P + 1))
  ref = full_logits(mc, params, seq)[0, P]
  decode_step = _manual_step(mc, params, seq, P)

  assert np.abs(decode_step(P, P) - ref).max() < TOL
  assert np.abs(decode_step(P + 1, P) - ref).max() > 100 * TOL  # RoPE offset off by one
  assert np.abs(decode_step(P, P + 1) - ref).max() > 100 * TOL  # a stale zero latent is attended
  assert np.abs(decode_step(P, P - 1) - ref).max() > 100 * TOL  # overwrites the last prompt latent

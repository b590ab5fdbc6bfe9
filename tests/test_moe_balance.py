"""Auxiliary-loss-free balancing (DeepSeek-V3 routing bias): numpy reference, dynamics, train state, resume."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from conftest import run_steps, train_config
from flax import linen as nn

from sktlm import sharding
from sktlm.config import schema
from sktlm.model import moe
from sktlm.train import loop
from sktlm.train.checkpoint import Checkpointer


def model_cfg(rate=1e-2, balance='aux_free', E=8, K=2, gate='sigmoid'):
  mc = schema.get_config().model  # every key, with these settings
  mc.update(dict(n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=24, vocab_size=32,
                 init_std=0.3, dtype='float32', param_dtype='float32', norm_eps=1e-5, tie_embeddings=False))
  mc.moe.update(dict(num_experts=E, top_k=K, num_shared_experts=0, expert_d_ff=0, n_dense_layers=0, gate=gate,
                     renormalize=True, aux_loss_coef=0.01, router_z_loss_coef=0.001, capacity_factor=0.0,
                     balance=balance, bias_update_rate=rate, seq_aux_loss_coef=0.0, dispatch='auto',
                     ep_buffer_factor=0.0, ep_overflow='exchange'))
  return ml_collections.FrozenConfigDict(mc)


def skewed(c, x):
  """Module, params whose router strongly prefers expert 0 for inputs x, and the initial bias state."""
  m = moe.MoEFeedForward(c)
  v = m.init(jax.random.PRNGKey(0), x)
  params = nn.unbox(v['params'])
  params['router'] = params['router'].at[:, 0].add(0.5)
  return m, params, {moe.BIAS_COLLECTION: v[moe.BIAS_COLLECTION]}


def x_of(B=4, T=32, D=16):
  return jax.random.normal(jax.random.PRNGKey(1), (B, T, D), jnp.float32) + 1.0


def test_bias_picks_experts_gate_weights_stay_unbiased_and_update_matches_numpy():
  c = model_cfg(rate=1e-2)
  x = x_of(B=2, T=8)
  m, params, _ = skewed(c, x)
  E, K, u = 8, 2, 1e-2
  bias = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (E,)), np.float32) * 0.3
  state = {moe.BIAS_COLLECTION: {'bias': jnp.asarray(bias)}}
  (y, aux), loads = m.apply({'params': params, **state}, x, mutable=[moe.LOAD_COLLECTION])
  new = moe.update_bias(c.moe, state, loads)[moe.BIAS_COLLECTION]['bias']

  # float64 numpy: sigmoid scores, top-k of score + bias, gates = renormalised unbiased scores.
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = np.asarray(x, np.float64).reshape(-1, 16)
  s = 1 / (1 + np.exp(-(xs @ p['router'])))
  top = np.argsort(-(s + bias), axis=1, kind='stable')[:, :K]
  assert (top != np.argsort(-s, axis=1, kind='stable')[:, :K]).any()  # the bias really changes the choice
  y_ref = np.zeros_like(xs)
  for n in range(xs.shape[0]):
    g = s[n, top[n]] / s[n, top[n]].sum()
    for e, w in zip(top[n], g, strict=True):
      h = xs[n] @ p['wi_gate'][e]
      y_ref[n] += w * ((h / (1 + np.exp(-h)) * (xs[n] @ p['wi_up'][e])) @ p['wo'][e])
  load = np.bincount(top.ravel(), minlength=E) / top.size
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), y_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux['expert_load'], load, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(new), bias + np.float32(u) * np.sign(1 / E - load).astype(np.float32))
  # Sequence-wise balance loss: E * sum_e f_e P_e per sequence (normalised scores), averaged over sequences.
  sn = (s / s.sum(1, keepdims=True)).reshape(2, 8, E)
  f = np.stack([np.bincount(t.ravel(), minlength=E) / t.size for t in top.reshape(2, 8, K)])
  np.testing.assert_allclose(aux['seq_aux_loss'], np.mean(E * np.sum(f * sn.mean(1), axis=1)), rtol=1e-5)


def test_aux_free_bias_evens_out_a_skewed_router():
  """Load max/mean over 8 experts: 4.0 (all top-1 choices on expert 0) stays 4.0 without updates; the bias
  brings it under 1.3 (measured 1.09-1.13 from step 50 on)."""
  x = x_of()
  ratios = {}
  for rate in (0.0, 1e-2):  # rate 0: the plain router (negative control)
    c = model_cfg(rate=rate)
    m, params, state = skewed(c, x)

    @jax.jit
    def step(state, m=m, params=params, c=c):
      (_, aux), loads = m.apply({'params': params, **state}, x, mutable=[moe.LOAD_COLLECTION])
      return moe.update_bias(c.moe, state, loads), aux['expert_load']

    hist = []
    for _ in range(150):
      state, load = step(state)
      hist.append(np.asarray(load))
    h = np.array(hist)
    ratios[rate] = h.max(1) / h.mean(1)
  assert ratios[0.0][0] > 3.5 and ratios[1e-2][0] > 3.5  # same skewed start
  assert ratios[0.0][-20:].min() > 3.5
  assert ratios[1e-2][-20:].max() < 1.3, ratios[1e-2][-20:]


MOE = {'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.n_dense_layers': 1,
       'model.moe.expert_d_ff': 64, 'model.moe.balance': 'aux_free', 'model.moe.bias_update_rate': 1e-2,
       'model.moe.seq_aux_loss_coef': 1e-4}


def test_bias_lives_in_the_train_state_and_resumes_bit_exact(data_dir, tmp_path):
  """Real loop: 2 steps, then resumed to 4 from the Orbax checkpoint; the final bias must equal, bit for bit,
  4 uninterrupted steps and the float32 numpy recurrence b += u * sign(1/E - load) over the logged loads."""
  over = {**MOE, 'train.steps': 2, 'train.checkpoint_every': 2, 'train.log_every': 1, 'train.eval_batches': 0}
  config = train_config(data_dir, **over)
  assert loop.run(config, str(tmp_path)) == 0
  config = train_config(data_dir, **{**over, 'train.steps': 4})
  assert loop.run(config, str(tmp_path)) == 0

  ref, state, setup = run_steps(config, sharding.make_mesh(config.mesh), 4)
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), read_only=True, async_save=False)
  restored, _ = ckpt.restore(4, setup.abstract_state)
  ckpt.close()
  got = np.asarray(restored.model_state[moe.BIAS_COLLECTION]['moe_layers']['moe']['bias'])  # [1 layer, E]
  want = np.asarray(state.model_state[moe.BIAS_COLLECTION]['moe_layers']['moe']['bias'])
  np.testing.assert_array_equal(got, want)
  b = np.zeros(4, np.float32)
  for m in ref:  # one MoE layer, so the logged (layer-mean) load is that layer's load
    b = b + np.float32(1e-2) * np.sign(np.float32(0.25) - m['moe_expert_load']).astype(np.float32)
  np.testing.assert_array_equal(got[0], b)
  assert np.abs(b).max() > 0
  logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl') if '"train"' in line]
  np.testing.assert_allclose([r['loss'] for r in logged], [float(m['loss']) for m in ref], rtol=1e-6)
  assert 'moe_seq_aux_loss' in logged[-1]

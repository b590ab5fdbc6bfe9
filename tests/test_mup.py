"""muP (sktlm/model/mup.py): the rules against closed forms, muP at base width = SP, the muP forward pass against the SP
one with reparametrised weights, and the coordinate check's slopes (with a negative control)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_config

from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.model import mup
from sktlm.model import transformer as model_lib
from sktlm.tools import coord_check
from sktlm.train import optim


def pico(data_dir, **over):
  return train_config(data_dir, **{'model.vocab_size': 384, **over})


def init_params(config):
  model = model_lib.make_model(config.model)
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 16), jnp.int32))['params']))
  return init(jax.random.PRNGKey(0)), model


def test_param_classes_init_scales_and_optimizer(data_dir):
  """At width 4x base: every class gets TP5's init std (measured on a real init) and its Adam LR multiplier
  (one optimizer step against the closed form)."""
  config = pico(data_dir, **{'model.d_model': 128, 'model.d_ff': 384, 'model.parametrization': 'mup',
                             'model.base_width': 32})
  params, _ = init_params(config)
  labels = mup.param_labels(params)
  flat = {'/'.join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert flat['embedding'] == 'embedding' and flat['head'] == 'head'
  assert flat['layers/attn/wq'] == 'hidden' and flat['layers/mlp/wo'] == 'hidden'
  assert flat['final_norm/scale'] == 'final_norm' and flat['layers/attn_norm/scale'] == 'norm'
  sigma, m, L = 0.02, 4.0, config.model.n_layers
  expect = {'embedding': sigma, 'head': sigma, 'layers/attn/wq': sigma / math.sqrt(m),
            'layers/mlp/wi_gate': sigma / math.sqrt(m), 'layers/mlp/wo': sigma / math.sqrt(m * 2 * L)}
  for path, std in expect.items():
    node = params
    for k in path.split('/'):
      node = node[k]
    assert np.std(np.asarray(node)) == pytest.approx(std, rel=0.03), path
  assert mup.lr_multipliers(config.model) == dict(embedding=1.0, hidden=0.25, head=1.0, norm=1.0, final_norm=1.0,
                                                  router=0.25)
  assert mup.logit_multiplier(config.model) == 0.25
  assert mup.attention_scale(config.model, 32) == pytest.approx(1 / 32 * math.sqrt(8))

  # One muP AdamW step against the closed form: -lr * (mult * g / (|g| + eps) + wd * p); the decay is not scaled
  # by the class multiplier, and norm scales are not decayed.
  with config.unlocked():
    config.optim.update(warmup_steps=0, schedule='constant', clip_norm=0.0)
  tx, _ = optim.make_optimizer(config.optim, 10, config.model)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr, wd, eps = config.optim.peak_lr, config.optim.weight_decay, config.optim.eps
  mults = mup.lr_multipliers(config.model)
  seen = set()
  for u, g, p, c in zip(*(jax.tree.leaves(t) for t in (upd, grads, params, labels)), strict=True):
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    decay = 0.0 if c in ('norm', 'final_norm') else wd
    want = -lr * (mults[c] * g / (np.abs(g) + eps) + decay * p)  # Adam's bias-corrected first step
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-5, atol=1e-9)
    seen.add(c)
  assert seen == {'embedding', 'hidden', 'head', 'norm', 'final_norm'}


def test_mup_forward_is_sp_with_reparametrised_weights(data_dir):
  """Second code path: muP logits = the SP model's logits with the head scaled by 1/m and wq by
  attention_scale_mup / attention_scale_sp (everything else equal)."""
  over = {'model.d_model': 128, 'model.d_ff': 384}
  sp = pico(data_dir, **over)
  mp = pico(data_dir, **over, **{'model.parametrization': 'mup', 'model.base_width': 32})
  params, mp_model = init_params(mp)
  sp_model = model_lib.make_model(sp.model)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 0, 384)
  m, K = 4.0, 32
  ratio = mup.attention_scale(mp.model, K) / K**-0.5
  assert ratio == pytest.approx(1 / math.sqrt(m))
  sp_params = jax.tree.map(lambda x: x, params)
  sp_params['head'] = params['head'] / m
  sp_params['layers']['attn']['wq'] = params['layers']['attn']['wq'] * ratio
  got, _ = jax.jit(mp_model.apply)({'params': params}, tokens)
  want, _ = jax.jit(sp_model.apply)({'params': sp_params}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
  folded = mup.to_sp_params(params, mp.model)  # the export helper does the same folding
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(sp_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain, _ = jax.jit(sp_model.apply)({'params': params}, tokens)  # negative control: the multipliers do change it
  assert np.max(np.abs(np.asarray(plain) - np.asarray(got))) > 1e-2


def test_bad_parametrization_is_a_user_error(data_dir):
  with pytest.raises(UserError, match='base_width'):
    validate(pico(data_dir, **{'model.parametrization': 'mup'}))
  with pytest.raises(UserError, match='parametrization'):
    validate(pico(data_dir, **{'model.parametrization': 'umup'}))


def flat_under_width(slopes, after: int = 2, tol: float = 0.3) -> bool:
  """Every coordinate's |d log RMS / d log width| < tol from step `after` on."""
  return all(np.all(np.abs(s[after:]) < tol) for s in slopes.values())


def test_coord_check_slopes(data_dir, monkeypatch):
  """muP: every coordinate's RMS is width-flat after a few steps; SP: the logits and the residual stream grow
  with width. At the base width muP trains exactly like SP. Negative control: muP with its LR and logit
  multipliers dropped (init kept) fails the flatness check."""
  config = train_config(data_dir, **{'data.seq_len': 32, 'train.batch_size': 8, 'model.n_layers': 1,
                                     'optim.peak_lr': 1e-2})
  widths, steps = [64, 256], 3
  res = coord_check.run(config, widths, steps)
  sp, mp = res.slopes('sp'), res.slopes('mup')
  assert flat_under_width(mp), mp
  assert sp['logits'][-1] > 0.5 and sp['layers_0/out'][-1] > 1.0, sp
  assert not flat_under_width(sp)
  # at the base width (64) the two parametrisations are one function with one optimiser
  np.testing.assert_allclose(res.losses['mup'][0], res.losses['sp'][0], rtol=1e-5)
  for name in res.rms['sp']:
    np.testing.assert_allclose(res.rms['mup'][name][0], res.rms['sp'][name][0], rtol=1e-4, err_msg=name)

  monkeypatch.setattr(mup, 'lr_multipliers', lambda mc: dict.fromkeys(mup.CLASSES, 1.0))
  monkeypatch.setattr(mup, 'logit_multiplier', lambda mc: 1.0)
  broken = coord_check.run(config, widths, steps, parametrizations=('mup',)).slopes('mup')
  assert not flat_under_width(broken), broken
  assert broken['logits'][-1] > 0.4, broken


def test_coord_check_cli_bad_input_is_one_line():
  from conftest import run_cli
  p = run_cli('coord-check', '--config=experiments/lm.py:size=pico', '--parametrization=sp,umup')
  assert p.returncode == 2 and 'umup' in p.stderr and 'Traceback' not in p.stderr, p.stderr
  p = run_cli('coord-check', '--config=experiments/lm.py:size=pico', '--widths=64')
  assert p.returncode == 2 and 'at least two widths' in p.stderr and 'Traceback' not in p.stderr, p.stderr

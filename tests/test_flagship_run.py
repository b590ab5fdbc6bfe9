"""The flagship's architecture at small widths (MLA with a query bottleneck, a dense first layer, sigmoid
aux-free MoE with a shared expert, group-limited routing, routed_scaling_factor, V3's latent epsilon), trained
for a few steps on the embedded corpus, then used as a user would: `sktlm sample` (CLI) greedy text equals the
argmax of full forward passes with the trained routing bias; `sktlm export` (CLI) loads in transformers as
DeepseekV3ForCausalLM with sktlm's logits (1e-4); `train.init_from_hf` of that folder restores params and bias."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, train_config

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from sktlm import sharding  # noqa: E402
from sktlm.model import transformer as model_lib  # noqa: E402
from sktlm.tools import runs  # noqa: E402
from sktlm.train import init_hf, loop, resolve, step  # noqa: E402

SMALL_FLAGSHIP = {
    'model.attention': 'mla', 'model.mla.q_lora_rank': 16, 'model.mla.kv_lora_rank': 12,
    'model.mla.qk_nope_head_dim': 8, 'model.mla.qk_rope_head_dim': 8, 'model.mla.v_head_dim': 8,
    'model.mla.latent_norm_eps': 1e-6, 'model.n_layers': 3,
    'model.moe.num_experts': 8, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
    'model.moe.expert_d_ff': 32, 'model.moe.n_dense_layers': 1, 'model.moe.gate': 'sigmoid',
    'model.moe.balance': 'aux_free', 'model.moe.bias_update_rate': 0.15, 'model.moe.n_group': 4,
    'model.moe.topk_group': 2, 'model.moe.routed_scaling_factor': 2.5,
}


def greedy_by_full_forward(mc, variables, prompt, n, vocab_limit, eos):
  """Greedy tokens, each the argmax of a full (uncached) forward pass over everything so far."""
  P = len(prompt)
  buf = np.zeros((1, P + n), np.int32)
  buf[0, :P] = prompt
  fwd = jax.jit(lambda v, t: model_lib.make_model(mc).apply(v, t)[0])
  out = []
  for i in range(n):
    logits = np.asarray(fwd(variables, jnp.asarray(buf)))[0, P + i - 1, :vocab_limit]
    tok = int(np.argmax(logits))
    out.append(tok)
    buf[0, P + i] = tok
    if tok == eos:
      break
  return out


def test_small_flagship_samples_exports_and_imports(data_dir, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  wd = str(tmp_path / 'run')
  # A tiny LR keeps the weights near their (wide) init, so greedy text is varied rather than a run of spaces,
  # while the bias moves by 0.15 per step: the text then depends on the routing bias (checked below).
  config = train_config(data_dir, **{'train.steps': 4, 'train.checkpoint_every': 4, 'optim.peak_lr': 1e-5,
                                     'model.init_std': 0.1, **SMALL_FLAGSHIP})
  assert loop.run(config, wd) == 0
  run = runs.load(wd, mesh_cfg=runs.single_device_mesh())
  bias = np.concatenate([np.ravel(b) for b in jax.tree.leaves(run.state.model_state)])
  assert np.abs(bias).max() > 0.1  # trained routing bias, not zeros

  # sktlm sample (CLI), greedy: the text of the argmax of full forward passes with the train state's bias
  prompt, n = 'def main():\n    ', 16
  r = run_cli('sample', f'--workdir={wd}', f'--prompt={prompt}', f'--max_new_tokens={n}', '--temperature=0')
  assert r.returncode == 0, r.stderr
  tok = run.tokenizer
  variables = {'params': run.params, **run.state.model_state}
  ids = [tok.bos_id] + tok.encode(prompt)
  want = greedy_by_full_forward(run.config.model, variables, ids, n, tok.vocab_size, tok.eos_id)
  assert prompt + tok.decode(want) in r.stdout, (r.stdout, tok.decode(want))
  no_bias = greedy_by_full_forward(run.config.model, {'params': run.params}, ids, n, tok.vocab_size, tok.eos_id)
  assert len(set(want)) > 3, want
  assert no_bias != want  # negative control: without the bias the run decodes other text

  # sktlm export (CLI) -> transformers DeepseekV3ForCausalLM: the same logits
  out = str(tmp_path / 'hf')
  r = run_cli('export', f'--workdir={wd}', f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert 'DeepseekV3ForCausalLM' in r.stdout
  m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation='eager',
                                                        local_files_only=True).eval()
  tokens = np.asarray([ids + want], np.int64)
  with torch.no_grad():
    theirs = m(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(jax.jit(model_lib.make_model(run.config.model).apply)(variables, jnp.asarray(tokens))[0])
  assert np.abs(theirs - ours).max() < 1e-4, np.abs(theirs - ours).max()

  # train.init_from_hf of that folder: params and routing bias restored bit-exact
  config.train.init_from_hf = out
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = init_hf.init_state(config, setup)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (jax.device_get(run.params), jax.device_get(run.state.model_state)),
               (jax.device_get(state.params), jax.device_get(state.model_state)))

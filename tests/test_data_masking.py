"""Packed rows through the real model: a document's logits never see another document in the same row."""

import os

import numpy as np

from sktlm import data
from sktlm.config import load
from sktlm.model import transformer as model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_logits_independent_of_other_documents_in_the_row(tmp_path):
  import jax
  import jax.numpy as jnp
  corpus = tmp_path / 'c'
  corpus.mkdir()
  for i in range(20):
    (corpus / f'{i}.txt').write_text(f'short document number {i}: ' + 'abc ' * (i % 5))
  cfg = load.load_config(os.path.join(ROOT, 'experiments/lm.py:size=pico'), {
      'data.name': 'text_files', 'data.path': str(corpus), 'data.data_dir': str(tmp_path / 'tfds'),
      'data.seq_len': 128, 'model.vocab_size': 384})
  batch = next(data.make_train_iter(cfg.data, batch_size=2, seed=0))
  seg = batch['segment_ids'][0]
  assert seg.max() >= 3  # several documents share the row
  net = model.make_model(cfg.model)
  tokens = jnp.asarray(batch['inputs'][:1])
  pos, segs = jnp.asarray(batch['positions'][:1]), jnp.asarray(batch['segment_ids'][:1])
  params = net.init(jax.random.PRNGKey(0), tokens, pos, segs)
  fwd = jax.jit(lambda t: net.apply(params, t, pos, segs)[0])
  base = np.asarray(fwd(tokens))
  first, second = seg == 1, seg == 2
  rng = np.random.default_rng(0)
  changed = np.array(batch['inputs'][:1])
  changed[0, first] = rng.integers(3, 259, first.sum())
  out = np.asarray(fwd(jnp.asarray(changed)))
  # Other documents: unchanged (exactly, up to float32 reassociation); the edited one: changed.
  np.testing.assert_allclose(out[0, ~first], base[0, ~first], rtol=0, atol=1e-5)
  assert np.abs(out[0, first] - base[0, first]).max() > 1e-3
  # Control: editing the first token of document 2 does move document 2's later logits.
  changed = np.array(batch['inputs'][:1])
  k = np.flatnonzero(second)[1]
  changed[0, k] = 3 + (changed[0, k] - 3 + 7) % 256
  out = np.asarray(fwd(jnp.asarray(changed)))
  assert np.abs(out[0, k:][second[k:]] - base[0, k:][second[k:]]).max() > 1e-4
  np.testing.assert_allclose(out[0, first], base[0, first], rtol=0, atol=1e-5)

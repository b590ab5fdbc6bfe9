"""The commands around a finished run: `sktlm export | sample | eval`, `train.init_from_hf`, and
`sktlm scaling --loss=eval:NAME`, on real runs of the embedded corpus (Orbax checkpoints, subprocesses)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_cli, train_config

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from sktlm import sharding  # noqa: E402
from sktlm.config import schema
from sktlm.data import tokenizers
from sktlm.errors import UserError  # noqa: E402
from sktlm.interop import hf
from sktlm.tools import runs
from sktlm.train import init_hf, loop, resolve, step


def test_init_from_hf_round_trip_is_bit_exact_on_a_mesh(tmp_path):
  """sktlm params -> HF folder -> train state on an fsdp x tensor mesh: every parameter bit-exact (float32)."""
  config = schema.get_config('pico')
  config.model.update(n_kv_heads=2, vocab_size=384, init_std=0.1)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  params = jax.device_get(state.params)
  folder = str(tmp_path / 'hf')
  hf.write_folder(folder, config.model, params, max_position_embeddings=64, tokenizer=tokenizers.ByteTokenizer())
  config.train.init_from_hf = folder
  state2 = init_hf.init_state(config, setup)
  assert int(state2.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params, state2.params)
  assert jax.tree.map(lambda x: x.sharding, state2.params) == setup.state_shardings.params
  config.model.d_ff = 256  # a different shape: refused with the key named
  with pytest.raises(UserError, match='d_ff: checkpoint 192, config 256'):
    init_hf.init_state(config, step.build(config, mesh))


@pytest.mark.slow
def test_export_sample_eval_and_init_from_hf_on_a_trained_run(data_dir, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  wd = str(tmp_path / 'run')
  config = train_config(data_dir, **{'train.steps': 8, 'train.checkpoint_every': 4, 'mesh.data': 2,
                                     'mesh.fsdp': 2, 'mesh.tensor': 2, 'model.n_kv_heads': 2})
  assert loop.run(config, wd) == 0

  # export (CLI) -> transformers: greedy generation equals sktlm's KV-cached greedy decode
  out = str(tmp_path / 'hf')
  r = run_cli('export', f'--workdir={wd}', f'--out={out}', '--step=8')
  assert r.returncode == 0, r.stderr
  assert 'LlamaForCausalLM' in r.stdout
  m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ids = tok('def main():\n    ', return_tensors='pt')['input_ids']
  theirs = m.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].numpy()
  from sktlm.tools import decode
  run = runs.load(wd, 8, mesh_cfg=runs.single_device_mesh())
  opts = decode.SamplingOptions(max_new_tokens=12, temperature=0.0, vocab_limit=259, eos_id=2)
  ours, _, _ = decode.Sampler(run.config.model, 1, ids.shape[1], opts)(run.params, ids.numpy(), jax.random.PRNGKey(0))
  n = int(np.argmax(theirs == 2)) + 1 if (theirs == 2).any() else len(theirs)
  np.testing.assert_array_equal(ours[0, :n], theirs[:n])

  # sample (CLI): text and the tokens/s line
  r = run_cli('sample', f'--workdir={wd}', '--prompt=import ', '--max_new_tokens=16', '--num_samples=2',
              '--temperature=0.8', '--top_k=40', '--top_p=0.95', '--seed=3')
  assert r.returncode == 0, r.stderr
  assert r.stdout.count('--- sample') == 2 and 'tok/s' in r.stdout and 'decode' in r.stdout

  # eval (CLI) on the run's own data, then on a text folder; scaling reads the record
  r = run_cli('eval', f'--workdir={wd}', '--max_batches=2', f'--data.data_dir={data_dir}')
  assert r.returncode == 0, r.stderr
  rec = json.load(open(os.path.join(wd, 'evals', 'stdlib.json')))
  assert rec['step'] == 8 and rec['tokens'] == 2 * 8 * 64 and abs(rec['ppl'] - np.exp(rec['loss'])) < 1e-9
  assert abs(rec['bpb'] * np.log(2) * rec['bytes'] - rec['loss'] * rec['tokens']) < 1e-6 * rec['tokens']
  texts = tmp_path / 'texts'
  texts.mkdir()
  for i in range(6):
    (texts / f'{i}.txt').write_text(f'document {i}: ' + 'the quick brown fox jumps over the lazy dog. ' * 40)
  r = run_cli('eval', f'--workdir={wd}', '--data.name=text_files', f'--data.path={texts}',
              f'--data.data_dir={tmp_path / "tfds"}', '--name=fox')
  assert r.returncode == 0, r.stderr
  assert json.load(open(os.path.join(wd, 'evals', 'fox.json')))['dataset']['name'] == 'text_files'
  from sktlm.scaling import io
  sweep = io.load_sweep(str(tmp_path))
  data, _ = io.select(sweep, 'non_embedding', 'eval:fox', 'exact')
  assert list(data['loss']) == [json.load(open(os.path.join(wd, 'evals', 'fox.json')))['loss']]

  # train.init_from_hf: a new run starts from the exported weights: its first loss is the trained params' loss
  # on the same first batch (evaluated here with the sktlm checkpoint itself)
  wd2 = str(tmp_path / 'from_hf')
  config2 = train_config(data_dir, **{'train.steps': 2, 'train.log_every': 1, 'model.n_kv_heads': 2,
                                      'train.init_from_hf': out})
  assert loop.run(config2, wd2) == 0
  first = [json.loads(x) for x in open(os.path.join(wd2, 'metrics.jsonl'))][0]
  from sktlm import data
  batch = next(data.make_train_iter(config2.data, batch_size=8, seed=config2.seed))
  sums = run.setup.eval_step(run.state, step.device_batch(batch, run.setup, 8))
  assert abs(first['loss'] - float(sums['loss_sum']) / float(sums['weight_sum'])) < 1e-5
  assert first['loss'] < 5.2  # from scratch: ~ln(384) = 5.95


@pytest.mark.parametrize('cmd,args,expect', [
    ('export', ['--workdir=/nonexistent', '--out=/tmp/x'], 'not a run directory'),
    ('sample', ['--workdir=/nonexistent'], 'exactly one of --prompt'),
    ('eval', ['--workdir=/nonexistent'], 'not a run directory'),
])
def test_bad_input_is_one_line(cmd, args, expect):
  r = run_cli(cmd, *args)
  assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_scaling_reads_eval_records(tmp_path):
  """`sktlm scaling --loss=eval:NAME` takes each run's RUN/evals/NAME.json loss; runs without one are skipped."""
  from sktlm.scaling import io
  for i, loss in enumerate((3.0, 2.5, None)):
    wd = tmp_path / f'run{i}'
    (wd / 'evals').mkdir(parents=True)
    (wd / 'summary.json').write_text(json.dumps({'status': 'done', 'params': {'non_embedding': 1e5 * (i + 1)},
                                                 'tokens': 1e6, 'flops': {'exact': 1e12}, 'best_eval_loss': 9.0}))
    if loss is not None:
      (wd / 'evals' / 'ood.json').write_text(json.dumps({'loss': loss}))
  data, warnings = io.select(io.load_sweep(str(tmp_path)), 'non_embedding', 'eval:ood', 'exact')
  assert list(data['loss']) == [3.0, 2.5] and 'run2' in ' '.join(warnings)
  r = run_cli('scaling', str(tmp_path), f'--out={tmp_path / "rep"}', '--loss=eval_ood')
  assert r.returncode == 2 and 'eval:NAME' in r.stderr

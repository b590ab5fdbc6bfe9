"""`sktlm plan`: bytes per device vs a real initialised state, FLOPs vs the analytic count, TPU AOT compile,
batch search, CLI errors. Runs on the 8 simulated CPU devices of conftest.py."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sktlm import sharding
from sktlm.config import accounting, load
from sktlm.model import moe_ep
from sktlm.model.kernels import cpu
from sktlm.plan import planner
from sktlm.train import resolve, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


def small_config(size='pico', **overrides):
  base = {'model.vocab_size': 256, 'train.batch_size': 8, 'data.seq_len': 64, 'model.scan_layers': True}
  base.update(overrides)
  return load.load_config(os.path.join(ROOT, f'experiments/lm.py:size={size}'), base)


MOE = {'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.num_shared_experts': 1,
       'model.moe.n_dense_layers': 1, 'model.moe.capacity_factor': 1.0}


def device_bytes(tree, device) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


@pytest.mark.parametrize('mesh, extra', [
    (dict(data=2, fsdp=4), {}),
    (dict(data=2, fsdp=2, expert=2), MOE),
])
def test_state_bytes_equal_real_state(mesh, extra):
  over = {f'mesh.{k}': v for k, v in mesh.items()}
  config = small_config(**over, **extra)
  target = planner.get_target('cpu:8')
  mesh = planner.make_mesh(config, target)
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  predicted = planner.state_bytes(setup.abstract_state)
  state = setup.init_state(jax.random.PRNGKey(0))
  for d in target.devices[:3]:
    assert predicted['params'] == device_bytes(state.params, d)
    assert predicted['opt_state'] == device_bytes(state.opt_state, d)
  # Sharding really splits something (else the test could not tell per-device from global bytes).
  total_params = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert predicted['params'] < total_params


@pytest.mark.parametrize('scan, extra', [(False, {}), (True, {}), (True, MOE)])
def test_compiled_flops_match_analytic(scan, extra):
  """The analytic `exact` count (full T x T attention, as computed) within 10% of the compiled step.

  XLA's cost_analysis counts a while-loop body once, so it is compared only without scan (on 'micro', where
  elementwise work - norms, softmax, AdamW - is ~7% of it); the traced matmul FLOPs (jaxpr, scan bodies x
  length) are compared in every case. The MoE case uses capacity factor 1.0: E x C slots = T x top_k, so the
  computed expert FLOPs equal the active ones.
  """
  config = small_config('pico' if scan else 'micro', **{'model.scan_layers': scan}, **extra)
  rep = planner.plan(config, planner.get_target('cpu:8'))
  analytic = rep['analytic_flops_per_device']
  assert analytic == pytest.approx(accounting.flops_per_token(config.model, 64)['exact'] * 8 * 64 / 8)
  assert rep['traced_flops_per_device'] == pytest.approx(analytic, rel=0.10)
  # Sharper: small vocabularies embed with a one-hot matmul (sktlm/model/kernels/cpu.py), 4 V D FLOPs/token (fwd + grad)
  # that 6N leaves out as a lookup; with it added the traced matmuls equal the analytic count.
  v, d = config.model.vocab_size, config.model.d_model
  one_hot = 4 * v * d * 8 * 64 / 8 if v <= cpu.ONE_HOT_EMBED_MAX_VOCAB else 0
  assert rep['traced_flops_per_device'] == pytest.approx(analytic + one_hot, rel=0.005)
  if not scan:
    assert rep['xla_flops_per_device'] == pytest.approx(analytic + one_hot, rel=0.10)
  m = rep['memory']
  assert m['peak'] >= m['arguments'] > 0 and 'fits' not in rep  # no chip: no verdict


@pytest.mark.parametrize('remat, buffer', [('none', 0.0), ('full', 0.0), ('full', 1.0)])
def test_all_to_all_bytes_match_closed_form(remat, buffer):
  """dropless_ep's exchange, counted from the traced step, equals the closed form: per MoE layer the forward
  sends the token buffer [X, S, D], the expert ids [X, S] (int32) and the outputs [X, S, D] back; the backward
  sends both buffers' cotangents; full remat repeats the forward. (X - 1) / X of each leaves the device.
  buffer 1.0: a first exchange of S = the balanced load, and the overflow exchange (W - S rows) in a cond:
  counted in the maximum, not in the minimum. Its branch is checkpointed, so its backward pass sends the
  tokens and ids once more (the outputs' return trip is not needed for the gradients)."""
  config = small_config(**{**MOE, 'model.moe.capacity_factor': 0.0, 'model.moe.dispatch': 'dropless_ep',
                           'model.moe.ep_buffer_factor': buffer, 'mesh.data': 2, 'mesh.expert': 4,
                           'model.remat': remat, 'model.n_layers': 3})
  rep = planner.plan(config, planner.get_target('cpu:8', chip='v5p'))
  mc = config.model
  X, n_moe = 4, mc.n_layers - mc.moe.n_dense_layers
  N = 8 * 64 // 8                                  # tokens per device: the batch splits over all 8
  S, W = moe_ep.buffer_rows(mc.moe, N, X), moe_ep.worst_rows(mc.moe, N, X)
  assert (S < W) == (buffer > 0)

  def closed(rows, checkpointed=False):
    big, ids = X * rows * mc.d_model * jnp.dtype(mc.dtype).itemsize, X * rows * 4
    forward = 2 * big + ids
    per_layer = forward + 2 * big + (forward if remat == 'full' else 0) + (big + ids if checkpointed else 0)
    return n_moe * per_layer * (X - 1) / X

  assert n_moe == 2
  assert rep['all_to_all_bytes_min_per_device'] == pytest.approx(closed(S), rel=1e-12)
  assert rep['all_to_all_bytes_per_device'] == pytest.approx(closed(S) + (closed(W - S, True) if S < W else 0),
                                                            rel=1e-12)
  assert rep['all_to_all_s_at_least'] == pytest.approx(rep['all_to_all_bytes_per_device'] / 600e9)
  text = planner.format_report(rep, 'pico')
  assert 'all-to-all (traced, MoE dropless_ep)' in text
  assert ('when no device pair overflows' in text) == (buffer > 0)
  # Capacity dispatch's all-to-alls come from sharding constraints, not the jaxpr: none counted.
  cap = planner.plan(small_config(**MOE, **{'mesh.data': 2, 'mesh.expert': 4}), planner.get_target('cpu:8'))
  assert cap['all_to_all_bytes_per_device'] == 0


def test_report_names_the_attention_a_context_parallel_step_runs():
  """With a context axis the kernel set's attention is not used (sktlm/model/context.py): the report says so."""
  for ctx, expected in ((1, 'attention dense'), (4, 'all-gather form of sktlm/model/context.py over context=4')):
    config = small_config(**{'mesh.fsdp': 8 // ctx, 'mesh.context': ctx, 'model.attention_impl': 'dense'})
    assert expected in planner.format_report(planner.plan(config, planner.get_target('cpu:8'), compile=False), 'pico')


def test_verdict_and_step_time():
  config = small_config()
  rep = planner.plan(config, planner.get_target('cpu:8', chip='h100'), mfu=0.5)
  assert rep['fits'] and rep['headroom_bytes'] == rep['hbm_per_device'] - rep['memory']['peak']
  assert rep['step_time_s'] == pytest.approx(rep['analytic_flops_per_device'] / (989e12 * 0.5))
  assert rep['tokens_per_s'] == pytest.approx(8 * 64 / rep['step_time_s'])
  text = planner.format_report(rep, 'pico')
  assert 'verdict: FITS' in text and '50% MFU' in text


def test_compiler_refusal_is_a_does_not_fit_verdict():
  """libtpu refuses to compile a step whose temporaries exceed HBM; `plan` reports that as DOES NOT FIT."""
  msg = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (103.90G) '
         'exceeds available HBM (95.74G).')
  r = planner.compiler_refusal(jax.errors.JaxRuntimeError(msg))
  assert r['temp'] == pytest.approx(103.90 * planner.GiB) and r['available'] == pytest.approx(95.74 * planner.GiB)
  assert planner.compiler_refusal(jax.errors.JaxRuntimeError('INTERNAL: something else')) is None
  rep = planner.plan(small_config(), planner.get_target('cpu:8', chip='v5p'), compile=False)
  r['peak_at_least'] = r['temp'] + rep['state_bytes']['params'] + rep['state_bytes']['opt_state']
  rep.update(compiler_refused=r, fits=False, headroom_bytes=rep['hbm_per_device'] - r['peak_at_least'])
  text = planner.format_report(rep, 'pico')
  assert 'refused by the compiler, temporaries 103.90 GiB' in text and 'verdict: DOES NOT FIT: peak >= ' in text


def test_search_batch_finds_largest_fit():
  config = small_config(**{'mesh.data': 2})
  target = planner.get_target('cpu:2', chip='h100')
  config.train.batch_size = 6  # per-device batch 3 on 2 batch shards
  mesh = planner.make_mesh(config, target)
  resolve.resolve(config, mesh)
  three = planner.compile_step(config, mesh).memory['peak']
  import dataclasses
  target.chip = dataclasses.replace(target.chip, hbm_bytes=three - 1)  # just below: 3 must not fit
  logs = []
  res = planner.search_batch(config, target, max_per_device=3, log=logs.append)
  assert res['per_device_batch'] == 2 and res['global_batch'] == 4, logs
  assert res['peak_bytes'] <= three - 1 and len(logs) == 3  # tried 1, 2, 3


def test_flagship_counts_and_reduced_widths():
  flag = load.load_config(os.path.join(ROOT, 'experiments/flagship.py'))
  p = accounting.param_counts(flag.model)
  assert 500e9 <= p['total'] <= 540e9, p['total']
  assert 30e9 <= p['active'] <= 36e9, p['active']
  small = load.load_config(os.path.join(ROOT, 'experiments/flagship.py:layers=2,experts=8,top_k=2'))
  for k in ('d_model', 'n_heads', 'n_kv_heads', 'head_dim', 'vocab_size'):
    assert small.model[k] == flag.model[k]
  assert small.model.moe.expert_d_ff == 2048 and small.model.n_layers == 2


def test_flagship_routes_as_v3_and_its_decode_cache_is_the_latent():
  """DeepSeek-V3's routing constants in the flagship, and the KV cache per token and layer: 512 + 64 = 576 latent
  values against 64 x (192 + 128) expanded and 2 x 64 x 128 for multi-head attention of the same heads."""
  flag = load.load_config(os.path.join(ROOT, 'experiments/flagship.py'))
  moe = flag.model.moe
  assert (moe.n_group, moe.topk_group, moe.routed_scaling_factor, flag.model.mla.latent_norm_eps) == (8, 4, 2.5, 1e-6)
  assert accounting.kv_cache_per_token(flag.model) == dict(cached=576, expanded=20480, mha=16384, layers=61)
  assert accounting.routing_groups(flag.model) == dict(n_group=8, topk_group=4, top_k=8, experts_per_group=24)
  gqa = load.load_config(os.path.join(ROOT, 'experiments/flagship.py'), {'model.attention': 'gqa'})
  assert accounting.kv_cache_per_token(gqa.model)['cached'] == 2 * 8 * 128
  off = load.load_config(os.path.join(ROOT, 'experiments/flagship.py:groups=1'))
  assert accounting.routing_groups(off.model) is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu absent (pip install 'jax[tpu]==0.10.2')")
def test_reduced_flagship_compiles_for_v5p():
  config = load.load_config(os.path.join(
      ROOT, 'experiments/flagship.py:layers=2,experts=8,top_k=2,fsdp=2,expert=2,batch=4,seq_len=1024,ep_buffer=1'))
  target = planner.get_target('v5p:2x2x1')
  assert len(target.devices) == 4 and target.chip.name == 'v5p'
  rep = planner.plan(config, target)
  assert rep['fits'] and 0 < rep['memory']['peak'] < 95 * planner.GiB
  # The platform's kernel, compiled ahead of time by libtpu on this CPU host: Mosaic splash attention with
  # segment ids, forward and both backward kernels.
  assert [k.split('_segmented')[0] for k in rep['fused_kernels']] == [
      'splash_mha_dkv', 'splash_mha_dq', 'splash_mha_fwd'], rep['fused_kernels']
  assert rep['traced_flops_per_device'] == pytest.approx(rep['analytic_flops_per_device'], rel=0.25)
  # auto resolves for the TPU devices although the host tracing the step is a CPU: a rolled loop, tpu kernels.
  assert config.model.scan_unroll == 1 and config.model.kernels == 'tpu'
  assert rep['kernels']['attention_impl'] == 'splash'
  # Dropless EP with a first buffer of the balanced load (8 experts over 2 shards: the worst case is twice
  # that) compiles its overflow exchange too: a cond whose costlier branch moves more.
  assert 0 < rep['all_to_all_bytes_min_per_device'] < rep['all_to_all_bytes_per_device']


def run_cli(*args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', 'plan', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args, message', [
    (['--topology=v9z:2x2'], "unknown target 'v9z:2x2'"),
    (['--devices=cpu:8', '--config.mesh.fsdp=3'], 'do not divide the 8 devices'),
    (['--devices=cpu:4', '--config.mesh.data=8'], 'has 8 devices but 4 are available'),
    (['--devices=v5p:2x2x1'], '--devices must be cpu:N'),
    ([], 'exactly one of'),
    (['--devices=cpu:8', '--chip=tpu9'], "unknown chip 'tpu9'"),
])
def test_cli_errors_are_one_line(args, message):
  r = run_cli('--config=experiments/lm.py:size=pico', '--config.model.vocab_size=256', *args)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(HAS_LIBTPU, reason='checks the message shown when libtpu is absent')
def test_cli_tpu_without_libtpu():
  r = run_cli('--config=experiments/lm.py:size=pico', '--config.model.vocab_size=256', '--topology=v5p:2x2x1')
  assert r.returncode == 2 and 'needs libtpu' in r.stderr


def test_cli_cpu_sets_device_count(tmp_path):
  """--devices=cpu:4 runs on 4 simulated devices even though this process's XLA_FLAGS asks for 8."""
  out = tmp_path / 'plan.json'
  r = run_cli('--config=experiments/lm.py:size=pico', '--config.model.vocab_size=256',
              '--config.train.batch_size=4', '--devices=cpu:4', '--chip=v5e', f'--json={out}')
  assert r.returncode == 0, r.stderr
  rep = json.loads(out.read_text())
  assert rep['n_devices'] == 4 and rep['mesh']['data'] == 4 and rep['fits'] is True
  assert 'verdict: FITS' in r.stdout


def test_mesh_matches_sharding_helper():
  config = small_config(**{'mesh.data': -1, 'mesh.expert': 2})
  mesh = planner.make_mesh(config, planner.get_target('cpu:8'))
  assert dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)) == dict(data=4, fsdp=1, expert=2, context=1,
                                                                           tensor=1)
  assert sharding.batch_axis_size(mesh, sharding.logical_rules(config)) == 8

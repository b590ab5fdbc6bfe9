"""MoE routing paths compared: capacity dispatch (gathers into [B, E, C, D]) vs dropless (sort + ragged_dot).

  python benchmarks/bench_moe.py [--experts=8 --top_k=2 --d_model=256 --d_ff=512 --batch=8 --seq=256]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_moe.py --expert_axis=4

With --expert_axis=X > 1 the paths run on a mesh (data = devices / X, expert = X) and the table adds the
dropless expert-parallel path (sktlm/model/moe_ep.py) and each compiled step's temporary bytes per device.

Times jitted forward+backward of sktlm.model.moe.MoEFeedForward on the default device and prints, per path: time,
tokens/s, useful FLOP/s (active experts only: 6 x tokens x top_k x 3 x D x F) and that as a fraction of a
matmul peak measured in the same run (sktlm.chips.measure_matmul_peak), next to a dense SwiGLU with the same
active width (top_k x F), which is the ceiling either routing could reach.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from sktlm import chips
from sktlm.model import layers, moe

RULES = (('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('exp', 'expert'))


def config(a, cf, dispatch='auto', buffer=0.0):
  return ml_collections.FrozenConfigDict(dict(
      d_model=a.d_model, d_ff=a.d_ff, n_layers=1, init_std=0.02, dtype=a.dtype, param_dtype='float32',
      moe=dict(num_experts=a.experts, top_k=a.top_k, num_shared_experts=0, expert_d_ff=a.d_ff, n_dense_layers=0,
               gate='softmax', renormalize=True, aux_loss_coef=0.01, router_z_loss_coef=0.001,
               capacity_factor=cf, dispatch=dispatch, ep_buffer_factor=buffer, balance='aux_loss')))


def time_fwd_bwd(module, x, repeats, mesh=None):
  """Best-of-`repeats` seconds of a jitted forward+backward, and the compiled temporaries per device (bytes)."""
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x)['params'])
  if mesh is not None:
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))['params']
    params = jax.device_put(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      return _time(module, params, x, repeats)
  return _time(module, params, x, repeats)


def _time(module, params, x, repeats):

  def loss(p, x):
    out = module.apply({'params': p}, x)
    y = out[0] if isinstance(out, tuple) else out
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss))
  temp = step.lower(params, x).compile().memory_analysis().temp_size_in_bytes
  jax.block_until_ready(step(params, x))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x))
    best = min(best, time.perf_counter() - t0)
  return best, temp


def main():
  p = argparse.ArgumentParser()
  for name, default in (('experts', 8), ('top_k', 2), ('d_model', 256), ('d_ff', 512), ('batch', 8), ('seq', 256),
                        ('repeats', 5), ('expert_axis', 1)):
    p.add_argument(f'--{name}', type=int, default=default)
  p.add_argument('--dtype', default='float32')
  a = p.parse_args()
  tokens = a.batch * a.seq
  useful = 6 * tokens * a.top_k * 3 * a.d_model * a.d_ff
  peak = chips.measure_matmul_peak(a.dtype)
  x = jax.random.normal(jax.random.PRNGKey(1), (a.batch, a.seq, a.d_model), jnp.dtype(a.dtype))
  print(f'device {jax.devices()[0].device_kind}; E={a.experts} top_k={a.top_k} D={a.d_model} F={a.d_ff} '
        f'tokens={tokens} {a.dtype}; measured matmul peak {peak / 1e9:.1f} GFLOP/s')
  mesh = None
  if a.expert_axis > 1:
    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()).reshape(n // a.expert_axis, 1, a.expert_axis, 1),
                ('data', 'fsdp', 'expert', 'tensor'))
    print(f'mesh data={n // a.expert_axis} expert={a.expert_axis}')
  dense = layers.Mlp(config(a, 1.0), d_ff=a.top_k * a.d_ff)
  rows = [('dense SwiGLU (top_k x F wide)', time_fwd_bwd(dense, x, a.repeats, mesh))]
  for cf in (1.0, 1.25, 2.0):
    rows.append((f'capacity factor {cf}', time_fwd_bwd(moe.MoEFeedForward(config(a, cf)), x, a.repeats, mesh)))
  rows.append(('dropless (sort + ragged_dot)',
               time_fwd_bwd(moe.MoEFeedForward(config(a, 0.0, 'dropless')), x, a.repeats, mesh)))
  if mesh is not None:
    for f in (0.0, 2.0):
      name = 'dropless_ep, worst-case buffer' if f == 0 else f'dropless_ep, buffer {f}x load'
      rows.append((name, time_fwd_bwd(moe.MoEFeedForward(config(a, 0.0, 'dropless_ep', f)), x, a.repeats, mesh)))
  print(f'{"path":<32}{"fwd+bwd ms":>11}{"tokens/s":>12}{"useful GFLOP/s":>16}{"of peak":>9}{"vs dense":>10}'
        f'{"temp MiB/dev":>14}')
  for name, (t, temp) in rows:
    print(f'{name:<32}{t * 1e3:>11.2f}{tokens / t:>12,.0f}{useful / t / 1e9:>16.1f}{useful / t / peak:>9.1%}'
          f'{rows[0][1][0] / t:>10.2f}{temp / 2**20:>14.1f}')


if __name__ == '__main__':
  main()

"""Platform kernels behind one interface, chosen once (`model.kernels`, resolved by sktlm/train/resolve.py).

The model (transformer.py, layers.py, moe.py) calls the few operations whose best implementation depends on the
platform through an `Ops`; everything else is plain jnp. Kernel sets:

- `plain`: the reference, defined here and in sktlm/model/attention.py: plain jnp, float32 accumulation, JAX autodiff.
- `cpu` (sktlm/model/kernels/cpu.py): hand-written backward passes and row-major layouts for XLA:CPU; attention
  `blocked_vjp`. Same forward math as plain.
- `tpu` (sktlm/model/kernels/tpu.py: Pallas splash attention) and `gpu` (sktlm/model/kernels/gpu.py: Pallas flash
  attention): plain matmuls (XLA fuses them well there) and a fused attention (`splash` / `flash`).

`resolve(model_cfg, platform)` turns `auto` into explicit choices (kernels, attention_impl, scan_unroll) from
the platform of the mesh's devices; sktlm.train.resolve writes them into the config, so the run records
what ran and nothing below train.build looks at the platform. A model built from an unresolved config
(kernels `auto`) runs the plain path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sktlm.config import schema
from sktlm.errors import UserError
from sktlm.model import attention
from sktlm.sharding import constrain

KERNELS = schema.choices('model.kernels')  # validated by sktlm.config.validate
# model.attention_impl -> (the kernel set that owns it, its function); 'plain' is sktlm/model/attention.py
ATTENTION = {'dense': ('plain', 'dense'), 'blocked': ('plain', 'blocked'),
             'blocked_vjp': ('cpu', 'causal_attention'), 'splash': ('tpu', 'causal_attention'),
             'flash': ('gpu', 'causal_attention')}
ATTENTION_IMPLS = schema.choices('model.attention_impl')
assert set(ATTENTION_IMPLS) == {'auto', *ATTENTION}, 'the schema and the kernels list different attention impls'
PLATFORM_KERNELS = {'cpu': 'cpu', 'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}
FUSED_ATTENTION = {'tpu': 'splash', 'gpu': 'flash'}


@dataclasses.dataclass(frozen=True)
class Ops:
  """The operations the model takes from its kernel set (signatures of the plain functions below)."""
  name: str
  dense: Callable             # (x_NxD, w_DxF, out_dtype=None) -> y_NxF
  swiglu: Callable            # (x_NxD, wi_gate_DxF, wi_up_DxF, wo_FxD) -> y_NxD
  embed: Callable             # (tokens_N, table_VxD, dtype) -> x_NxD
  transposed: Callable        # x_AxB -> x_BxA (the tied output head)
  causal_attention: Callable  # (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, *, block) -> out_BxTxHxK


def ops(model_cfg) -> Ops:
  """The Ops of a model config; unresolved `auto` choices mean the plain path (see the module doc)."""
  kernels, impl = model_cfg.kernels, model_cfg.attention_impl
  return _ops('plain' if kernels == 'auto' else kernels, 'blocked' if impl == 'auto' else impl)


@functools.cache
def _ops(kernels: str, impl: str) -> Ops:
  if kernels == 'cpu':
    cpu = _module('cpu')
    return Ops(kernels, cpu.dense, cpu.swiglu, cpu.embed, cpu.transposed_param, attention_fn(impl))
  return Ops(kernels, dense, swiglu, embed, transposed, attention_fn(impl))  # tpu/gpu: plain matmuls


def attention_fn(impl: str) -> Callable:
  """The causal attention function of `model.attention_impl` (resolved, not auto)."""
  owner, name = ATTENTION[impl]
  return getattr(attention if owner == 'plain' else _module(owner), name)


def _module(name: str):
  return importlib.import_module(f'{__name__}.{name}')


def available(name: str) -> bool:
  """Whether kernel module sktlm/model/kernels/<name>.py exists (a failing import inside it is not hidden)."""
  try:
    _module(name)
  except ModuleNotFoundError as e:
    if e.name == f'{__name__}.{name}':
      return False
    raise
  return True


# --- resolution, once, by sktlm.train.resolve before train.build --------------------------------------------

def resolve(model_cfg, platform: str) -> list[str]:
  """Replaces `auto` in model.kernels, model.attention_impl and model.scan_unroll (0) by the choice for devices
  of `platform` ('cpu', 'tpu', 'gpu', ...); explicit values are kept. Returns notes on fallbacks.

  kernels: the platform's set (cpu | tpu | gpu; plain for an unknown platform). attention: blocked_vjp for
  16-bit attention with cpu kernels (blocked for float32, where autodiff's backward is as fast), the fused
  kernel with tpu/gpu kernels (plain blocked while its module is absent), blocked with plain kernels.
  scan_unroll: every layer on CPU (a rolled scan's stacked activations cost 5-13% of a CPU step), 1 elsewhere
  (compile time independent of depth).
  """
  mc, notes = model_cfg, []
  if mc.kernels == 'auto':
    mc.kernels = PLATFORM_KERNELS.get(platform, 'plain')
  if mc.attention_impl == 'auto':
    fused = FUSED_ATTENTION.get(mc.kernels)
    if mc.kernels == 'cpu':
      mc.attention_impl = 'blocked_vjp' if jnp.dtype(mc.attention_dtype or mc.dtype).itemsize < 4 else 'blocked'
    elif fused and available(mc.kernels):
      mc.attention_impl = fused
    else:
      mc.attention_impl = 'blocked'
      if fused:
        notes.append(f'sktlm/model/kernels/{mc.kernels}.py is absent: attention is the plain blocked form, not {fused}')
  owner = ATTENTION[mc.attention_impl][0]
  if owner != 'plain' and not available(owner):
    raise UserError(f'model.attention_impl={mc.attention_impl} needs sktlm/model/kernels/{owner}.py, absent here')
  if mc.scan_unroll == 0:
    mc.scan_unroll = mc.n_layers if platform == 'cpu' else 1
  return notes


# --- the plain reference ---------------------------------------------------------------------------------------

def dense(x_NxD, w_DxF, out_dtype=None):
  """x @ w in x's dtype, accumulated in float32, returned in out_dtype (default x's dtype)."""
  y_NxF = jnp.matmul(x_NxD, w_DxF.astype(x_NxD.dtype), preferred_element_type=jnp.float32)
  return y_NxF.astype(out_dtype or x_NxD.dtype)


def swiglu(x_NxD, wi_gate_DxF, wi_up_DxF, wo_FxD):
  """(silu(x Wg) * (x Wu)) Wo in x's dtype; matmuls accumulate in float32 and silu is taken in float32."""
  gate_NxF = constrain(dense(x_NxD, wi_gate_DxF), ('batch', 'act_mlp'))
  up_NxF = constrain(dense(x_NxD, wi_up_DxF), ('batch', 'act_mlp'))
  h_NxF = (jax.nn.silu(gate_NxF.astype(jnp.float32)) * up_NxF).astype(x_NxD.dtype)
  return dense(h_NxF, wo_FxD)


def embed(tokens_N, table_VxD, dtype):
  """table[tokens] in `dtype`."""
  return jnp.take(table_VxD, tokens_N, axis=0).astype(dtype)


def transposed(x_AxB):
  return x_AxB.T

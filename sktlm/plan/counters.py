"""Counters on the abstract state and the traced step: bytes per device of a sharded tree, matmul FLOPs and
all-to-all bytes of a jaxpr (dot_general and ragged_dot; scan bodies x length; conds: the costlier or the
cheaper branch; shard_map bodies x mesh size). Nothing is compiled or allocated.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def per_device_bytes(tree) -> int:
  """Bytes one device holds for a tree of ShapeDtypeStruct with NamedShardings (even shards)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def state_bytes(abstract_state) -> dict[str, int]:
  params = per_device_bytes(abstract_state.params)
  opt = per_device_bytes(abstract_state.opt_state)
  # jax.grad returns gradients with the params' dtypes; the step constrains them to the params' shardings.
  return dict(params=params, opt_state=opt, grads=params, step=per_device_bytes(abstract_state.step))


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for j in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(j, jax.extend.core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jax.extend.core.Jaxpr):
        yield j


def _jaxpr_sum(jaxpr, leaf, axis_sizes=None, branch=max) -> float:
  """Sums leaf(eqn, axis_sizes) over a jaxpr, summed over devices: scan bodies x length, branch (max or min)
  over a cond's branches, shard_map bodies (per-device shapes) x mesh size. leaf returns None for an eqn it
  does not count."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    value = leaf(eqn, axis_sizes)
    if value is not None:
      total += value
    elif name == 'cond':
      total += branch(_jaxpr_sum(b.jaxpr, leaf, axis_sizes, branch) for b in eqn.params['branches'])
    elif name == 'shard_map':
      mesh = eqn.params['mesh']
      total += _jaxpr_sum(eqn.params['jaxpr'], leaf, dict(mesh.shape), branch) * mesh.size
    else:
      inner = sum(_jaxpr_sum(j, leaf, axis_sizes, branch) for j in _sub_jaxprs(eqn))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def _matmul_flops(eqn, _):
  name = eqn.primitive.name
  if name == 'dot_general':
    (lc, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
  if name == 'ragged_dot_general':
    a, b, g = (v.aval.shape for v in eqn.invars[:3])
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.sqrt(math.prod(a) * math.prod(b) * math.prod(out) / g[0])
  if name == 'pallas_call':
    return 0.0  # a fused kernel's body runs once per grid cell: its matmuls are not counted (see fused_kernels)
  return None


def _all_to_all_bytes(eqn, axis_sizes):
  if eqn.primitive.name != 'all_to_all':
    return None
  axes = eqn.params['axis_name']
  n = math.prod(axis_sizes[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  aval = eqn.invars[0].aval
  return math.prod(aval.shape) * aval.dtype.itemsize * (n - 1) / n  # 1/n of the buffer stays on the device


def jaxpr_matmul_flops(jaxpr, branch=max) -> float:
  """Matmul FLOPs of a jaxpr (global, all devices): dot_general and ragged_dot; scan bodies x length; conds:
  the costlier branch (branch=min: the cheaper)."""
  return _jaxpr_sum(jaxpr, _matmul_flops, branch=branch)


def jaxpr_all_to_all_bytes(jaxpr, branch=max) -> float:
  """Bytes the explicit all_to_alls of a jaxpr (shard_map bodies: MoE dropless_ep) send off their devices,
  summed over devices; forward, rematerialised forward and backward. branch=min: conds take their cheaper
  branch (dropless_ep's overflow exchange not run). The all-to-alls XLA inserts for sharding constraints
  (capacity dispatch) are not in the jaxpr and not counted."""
  return _jaxpr_sum(jaxpr, _all_to_all_bytes, branch=branch)

"""Run a per-device attention kernel on each device's rows and heads (shard_map), as the model shards them.

Why: a Pallas kernel is a custom call that XLA's SPMD partitioner cannot split, so under jit with sharded
inputs it would gather q, k and v whole onto every device. shard_map hands each device its own batch rows and
heads, laid out by the model's logical names ('batch', 'act_heads', 'act_kv_heads' in config.sharding_rules);
the sequence axis is gathered, because the kernels need whole rows (no context parallelism here).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def _mesh_axes(mesh, logical: str, dim: int) -> tuple[str, ...]:
  """Mesh axes that `logical` maps to under the current rules, if they divide `dim` (else none: replicated)."""
  entry = nn.logical_to_mesh_axes((logical,))[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def specs(mesh, B: int, H: int, G: int):
  """PartitionSpecs of (q, k/v, segment ids): batch and heads sharded as the model does, sequence whole.

  Query head h reads kv head h // (H // G); both head axes must split over the same mesh axes for a shard's
  query heads to find their kv heads locally, otherwise heads stay whole."""
  batch = _mesh_axes(mesh, 'batch', B) or None
  heads, kv_heads = _mesh_axes(mesh, 'act_heads', H), _mesh_axes(mesh, 'act_kv_heads', G)
  if heads != kv_heads or set(heads) & set(batch or ()):
    heads = kv_heads = ()
  return P(batch, None, heads or None, None), P(batch, None, kv_heads or None, None), P(batch, None)


def per_shard(kernel, mesh, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT):
  """kernel(q, k, v, segment_ids) on each device's shard; directly when there is no mesh or one device."""
  if mesh is None or mesh.size == 1:
    return kernel(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)
  q_spec, kv_spec, seg_spec = specs(mesh, q_BxTxHxK.shape[0], q_BxTxHxK.shape[2], k_BxTxGxK.shape[2])
  # check_vma=False: Pallas calls carry no varying-manual-axes annotations (as MaxText does for splash).
  fn = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                     check_vma=False)
  return fn(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT)


def pad_rows(T: int, tile: int, *xs_BxTx_, segment_ids_BxT):
  """Pads the sequence axis to a multiple of `tile`: zeros, and segment id -1 (a document of its own, after
  every real token, so no real query sees a padded key and every padded query sees itself)."""
  pad = -T % tile
  if not pad:
    return (*xs_BxTx_, segment_ids_BxT)
  padded = [jax.numpy.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs_BxTx_]
  return (*padded, jax.numpy.pad(segment_ids_BxT, [(0, 0), (0, pad)], constant_values=-1))


def context_mesh():
  """The mesh of the step being traced (sharding.activation_context sets jax's abstract mesh), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh

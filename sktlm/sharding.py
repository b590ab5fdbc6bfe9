"""Device mesh from config.mesh, logical-axis -> mesh-axis sharding (rules live in the config), and the
activation sharding context the model's constraints bind to.

Model code names axes logically ('embed', 'mlp', 'heads', 'batch', ...); `config.sharding_rules` maps them
to the mesh axes ('data', 'fsdp', 'expert', 'context', 'tensor'); 'context' splits each sequence (the
logical 'length' axis, sktlm/model/context.py). Pure data parallelism (the old pmap) is a mesh with only `data` > 1.
The model never sees a mesh: `constrain` binds to the mesh of `activation_context`, which train.build enters
while tracing the step (outside it, e.g. a plain `model.init`, constraints are no-ops).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sktlm.errors import UserError

MESH_AXES = ('data', 'fsdp', 'expert', 'context', 'tensor')


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}  # an axis left out has size 1
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: at most one axis may be -1 (fill); got {', '.join(fill)}")
  bad = [f'{a}={s}' for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise UserError(f"mesh: axis sizes must be positive or -1, got {', '.join(bad)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % known:
      raise UserError(f'mesh: fixed axes {_fmt(sizes)} (product {known}) do not divide the {n_devices} devices')
    sizes[fill[0]] = n_devices // known
  elif known != n_devices:
    raise UserError(f'mesh: {_fmt(sizes)} has {known} devices but {n_devices} are available '
                    '(set one axis to -1 to fill)')
  return tuple(sizes[a] for a in MESH_AXES)


def _fmt(sizes):
  return ','.join(f'{a}={s}' for a, s in sizes.items())


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:  # topology-aware placement on TPU/GPU slices
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # noqa: BLE001 - CPU or unusual topologies: plain row-major order
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_rules(config) -> tuple[tuple[str, object], ...]:
  rules = []
  for name, axes in config.sharding_rules:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise UserError(f"sharding_rules: '{name}' maps to unknown mesh axis '{a}' (known: {MESH_AXES})")
    rules.append((name, axes))
  return tuple(rules)


def shardings_for(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings for a tree of (boxed) abstract values with logical axis metadata."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings_tree) -> None:
  """A clear error naming the parameter when a dimension does not divide its mesh axes."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  flat_s = jax.tree.leaves(shardings_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, x), s in zip(flat, flat_s, strict=True):
    mesh_sizes = dict(zip(s.mesh.axis_names, s.mesh.devices.shape, strict=True))
    for dim, axes in zip(x.shape, tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec)), strict=False):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      n = math.prod(mesh_sizes[a] for a in axes)
      if dim % n:
        name = jax.tree_util.keystr(path)
        raise UserError(f'{name}: dimension {dim} does not divide mesh axes {axes} of size {n}; '
                        'change the model dims, the mesh, or the sharding rules')


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] input arrays."""
  spec = nn.logical_to_mesh_axes(('batch', 'length'), rules)
  return NamedSharding(mesh, spec)


def batch_axis_size(mesh: Mesh, rules) -> int:
  spec = nn.logical_to_mesh_axes(('batch',), rules)[0]
  if spec is None:
    return 1
  axes = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules):
  """Binds `constrain` to `mesh` and `rules` while a step is traced: jax's abstract-mesh context (unlike
  jax.set_mesh it may be entered inside jit) and flax's logical axis rules. No module state of our own."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def constrain(x, names, rules=None):
  """Logical sharding constraint on an activation; a no-op outside `activation_context`."""
  return nn.with_logical_constraint(x, names, rules=rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

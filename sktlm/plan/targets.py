"""What `sktlm plan` plans for: 'cpu:N' (N simulated host devices; the process must have been started with at
least N, see sktlm/commands/plan.py) or a TPU topology name such as 'v5p:8x16x16' (compile-only devices from
libtpu, `pip install 'jax[tpu]==<jax version>'`; nothing runs on a TPU), with the chip whose memory and peak
the verdict uses (sktlm.chips).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

from sktlm import chips, sharding
from sktlm.chips import GiB  # noqa: F401 - sktlm.plan.planner.GiB
from sktlm.errors import UserError

TPU_KINDS = ('v4', 'v5e', 'v5p', 'v6e')

@dataclasses.dataclass
class Target:
  name: str
  platform: str             # 'cpu' | 'tpu'
  devices: list
  chip: chips.Chip | None   # memory/peak source for the verdict (None: no verdict)
  devices_per_chip: int = 1

  @property
  def hbm_per_device(self) -> float | None:
    return self.chip.hbm_bytes / self.devices_per_chip if self.chip else None

  @property
  def peak_per_device(self) -> float | None:
    return self.chip.peak_bf16_flops / self.devices_per_chip if self.chip else None


def parse_cpu(spec: str) -> int | None:
  """'cpu:8' -> 8; None if spec is not a cpu target."""
  m = re.fullmatch(r'cpu:(\d+)', spec.strip())
  if not m:
    return None
  n = int(m.group(1))
  if n < 1:
    raise UserError(f"device count in '{spec}' must be >= 1")
  return n


def get_target(spec: str, chip: str = '', hbm_gib: float = 0.0) -> Target:
  """'cpu:N' or '<v4|v5e|v5p|v6e>:AxB[xC]'. `chip` overrides the chip used for the verdict, `hbm_gib` its
  memory per chip (e.g. to keep headroom)."""
  target = _get_target(spec, chip)
  if hbm_gib > 0:
    if not target.chip:
      raise UserError('--hbm_gib needs a chip: use a TPU topology or --chip')
    target.chip = dataclasses.replace(target.chip, hbm_bytes=int(hbm_gib * GiB))
  return target


def _get_target(spec: str, chip: str) -> Target:
  override = None
  if chip:
    if chip not in chips.CHIPS:
      raise UserError(f"unknown chip '{chip}' (known: {', '.join(chips.CHIPS)})")
    override = chips.CHIPS[chip]
  n = parse_cpu(spec)
  if n is not None:
    have = jax.devices('cpu')
    if len(have) < n:
      raise UserError(f'{spec}: only {len(have)} CPU devices in this process (start it with '
                      f'XLA_FLAGS=--xla_force_host_platform_device_count={n}; `sktlm plan` requests them itself)')
    return Target(spec, 'cpu', have[:n], override)
  m = re.fullmatch(r'(v\w+):(\d+(?:x\d+){1,2})', spec.strip())
  if not m or m.group(1) not in TPU_KINDS:
    raise UserError(f"unknown target '{spec}': use cpu:N or a TPU topology <kind>:AxB[xC] with kind in "
                    f"{', '.join(TPU_KINDS)} (e.g. v5p:2x2x1, v5e:4x4, v6e:8x8)")
  kind, dims = m.group(1), m.group(2)
  try:
    import libtpu  # noqa: F401 - only to give a clear error; jax loads it itself
  except ImportError:
    raise UserError(f"TPU target '{spec}' needs libtpu for compile-only devices: "
                    f"pip install 'jax[tpu]=={jax.__version__}'") from None
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(spec.strip(), platform='tpu')
  except Exception as e:  # noqa: BLE001 - libtpu reports bad names as runtime errors
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"TPU topology '{spec}' is not valid: {first}") from None
  devices = list(topo.devices)
  n_chips = math.prod(int(d) for d in dims.split('x'))
  per_chip = max(1, len(devices) // n_chips)
  return Target(spec, 'tpu', devices, override or chips.CHIPS[kind], per_chip)


def make_mesh(config, target: Target):
  return sharding.make_mesh(config.mesh, target.devices)

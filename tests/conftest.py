"""Test setup: 8 simulated CPU devices (must be set before jax is imported anywhere)."""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

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


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir for the whole test session: the embedded corpus is prepared into it once."""
  return str(tmp_path_factory.mktemp('tfds'))


def run_cli(*args, timeout=600, env=None):
  """Runs `sktlm ...` as a real subprocess; returns CompletedProcess (text)."""
  import subprocess
  e = dict(os.environ)
  e.update(env or {})
  return subprocess.run([sys.executable, '-m', 'sktlm.cli', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=e)

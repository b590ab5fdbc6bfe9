"""Test setup: 8 simulated CPU devices (must be set before jax is imported anywhere)."""

import os
import pathlib
import re
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402

# SKTLM_CI=1 (set by .ci/run): nothing may skip. A missing test extra or a broken import of the project fails
# at `pytest.importorskip` (it becomes a plain import), and any other skip is reported as a failure, so a
# claim whose test cannot run on the CI machine (no libtpu, no tmpfs) never passes silently.
CI = os.environ.get('SKTLM_CI', '') not in ('', '0')
if CI:
  import importlib

  def _import_or_fail(modname, minversion=None, reason=None, **_):
    return importlib.import_module(modname)

  pytest.importorskip = _import_or_fail


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if CI and report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome, report.longrepr = 'failed', f'SKTLM_CI: skipping is a failure in CI ({reason})'


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


def train_config(data_dir, spec='experiments/lm.py:size=pico', **over):
  """A small, quiet training config on the test session's data dir (`over`: {'train.steps': 5, ...})."""
  from sktlm.config import load
  base = {'data.data_dir': data_dir, 'data.seq_len': 64, 'train.batch_size': 8, 'train.log_every': 5,
          'train.eval_every': 1000, 'train.eval_batches': 2, 'metrics.progress': False,
          'metrics.tensorboard': False, 'optim.warmup_steps': 5}
  base.update(over)
  return load.load_config(f'{ROOT}/{spec}', base)


def run_steps(config, mesh, steps):
  """`steps` train steps of `config` on `mesh`, fed by the real pipeline: (per-step metrics, state, setup)."""
  import jax
  import numpy as np

  from sktlm import data
  from sktlm.train import resolve, step
  resolve.resolve(config, mesh)
  setup = step.build(config, mesh)
  it = data.make_train_iter(config.data, batch_size=config.train.batch_size, seed=config.seed)
  state = setup.init_state(jax.random.PRNGKey(0))
  metrics = []
  for _ in range(steps):
    state, m = setup.train_step(state, step.device_batch(next(it), setup, config.train.batch_size))
    metrics.append({k: np.asarray(v) for k, v in m.items()})
  return metrics, state, setup


def dot_operand_dtypes(hlo_text):
  """Element types of the operands of every dot in compiled HLO (fused computations included)."""
  types, out = {}, []
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[', line)
    if not m:
      continue
    types[m.group(1)] = m.group(2)
    d = re.search(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', line)
    if d:
      out.append((types.get(d.group(1)), types.get(d.group(2)), m.group(2)))
  return out


def assert_documents_isolated(model, params, batch):
  """Changing document 2 of packed row 0 (rows 9..) leaves document 1's logits and row 1 bit-identical, and does
  change document 2's logits (so the check can fail)."""
  import jax
  import numpy as np
  changed = {k: v.copy() for k, v in batch.items()}
  changed['inputs'][0, 9:] = (changed['inputs'][0, 9:] + 7) % 256 + 3
  f = jax.jit(lambda b: model.apply({'params': params}, b['inputs'], b['positions'], b['segment_ids'])[0])
  a, b = np.asarray(f(batch)), np.asarray(f(changed))
  np.testing.assert_array_equal(a[0, :9], b[0, :9])
  assert np.abs(a[0, 9:] - b[0, 9:]).max() > 1e-3
  np.testing.assert_array_equal(a[1], b[1])

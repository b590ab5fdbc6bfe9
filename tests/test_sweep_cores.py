"""How a local sweep lays its runs on the cores (sktlm/sweep/cores.py), and that `sktlm train` pins itself to
the cores it is given (a real subprocess reads its own affinity back)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT

from sktlm.sweep import cores


def run(step_gflop):
  """A planned run whose train step costs `step_gflop` GFLOP (exact)."""
  return SimpleNamespace(flops_per_token={'exact': step_gflop * 1e9 / 1024}, batch_size=8, seq_len=128)


SMALL, BIG = run(cores.SMALL_STEP_FLOPS / 1e9 / 2), run(cores.SMALL_STEP_FLOPS / 1e9 * 2)


@pytest.mark.parametrize('runs, n, parallel, threads, want', [
    ([SMALL] * 7, 2, 0, 0, (2, [[0, 1], [0, 1]])),        # small runs: as many at once as cores, sharing them
    ([SMALL] * 3, 8, 0, 0, (3, [list(range(8))] * 3)),    # never more at once than runs
    ([SMALL, BIG], 2, 0, 0, (1, [[0, 1]])),               # a big run: one at a time on all the cores
    ([SMALL] * 7, 2, 0, 1, (2, [[0], [1]])),              # --threads=1: pinned, one core each
    ([SMALL] * 7, 4, 0, 2, (2, [[0, 1], [2, 3]])),        # --threads=2 of 4 cores
    ([BIG] * 3, 4, 2, 0, (2, [[0, 1, 2, 3]] * 2)),        # --parallel=2: both runs may use every core
    ([SMALL] * 3, 2, 1, 0, (1, [[0, 1]])),                # --parallel=1: the run gets every core
    ([SMALL] * 3, 2, 3, 1, (3, [[0], [1], [0]])),         # more than the cores: slots share them
    ([SMALL] * 3, 1, 0, 0, (1, [[0]])),
])
def test_plan(runs, n, parallel, threads, want):
  assert cores.plan(runs, list(range(n)), parallel, threads) == want


def test_parse_and_format():
  assert cores.parse('0-2,5') == {0, 1, 2, 5} and cores.fmt([0, 1, 2, 5]) == '0,1,2,5'


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs 2 cores')
def test_train_process_pins_itself_before_jax(tmp_path):
  # What commands/train.py does before it imports jax; jax then runs on the one core it was given.
  code = ('from sktlm.sweep import cores; import os; cores.pin_from_env(); import jax; '
          'jax.numpy.ones(1).block_until_ready(); print(sorted(os.sched_getaffinity(0)))')
  first = sorted(os.sched_getaffinity(0))[1]
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), SKTLM_CPUS=str(first))).stdout
  assert out.strip() == f'[{first}]'

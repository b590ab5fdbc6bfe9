"""`sktlm.hostmem.tune_malloc`: freed large buffers are reused without new page faults (real processes)."""

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent('''
    import resource, sys
    import numpy as np
    from sktlm import hostmem
    print(hostmem.tune_malloc() if sys.argv[1] == 'tune' else 'default')
    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(3):  # warm-up: the first allocation must fault its pages in either way
      np.ones(64 << 18, np.float32)
    before = faults()
    for i in range(20):  # 64 MiB allocated, written and freed, as XLA:CPU does with a step's temporaries
      np.ones(64 << 18, np.float32)
    print(faults() - before)
''')


def run(mode, **env):
  import os
  r = subprocess.run([sys.executable, '-c', CHILD, mode], capture_output=True, text=True, timeout=120,
                     env={**os.environ, **env})
  assert r.returncode == 0, r.stderr
  status, faults = r.stdout.strip().splitlines()
  return status, int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_tuned_malloc_reuses_freed_pages():
  status, tuned = run('tune')
  assert status.startswith('tuned')
  _, default = run('status')
  # Without tuning each 64 MiB buffer is a fresh mmap: at least one fault per 2 MiB huge page (16K per buffer
  # with 4 KiB pages); with it the heap keeps the pages.
  assert default >= 20 * 32 and tuned < default / 10, (tuned, default)


def test_opt_out_keeps_the_default():
  status, _ = run('tune', SKTLM_HOST_MALLOC='default')
  assert status == 'default (SKTLM_HOST_MALLOC=default)'

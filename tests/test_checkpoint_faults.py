"""A checkpoint that does not read back is reported in the user's words (sktlm/train/checkpoint_faults.py):
which file is unreadable, or how it does not match the model, and never an exception class name from Orbax,
TensorStore or Python (issue 31: `doctor --deep` printed "AttributeError: 'NoneType' object has no attribute
'tree'"). The checkpoints are real: a pico model's train state saved by sktlm's Checkpointer (Orbax), with
files cut to half their size, as a failing disk or a cut copy leaves them."""

import os
import re
import shutil

import jax
import pytest
from conftest import run_cli

from sktlm import sharding
from sktlm.config import schema
from sktlm.errors import UserError
from sktlm.train import checkpoint, resolve, step

INTERNAL = re.compile(r'\b\w*(Error|Exception)\b|NoneType|Traceback|OUT_OF_RANGE|DATA_LOSS')


def setup_of(d_ff=None):
  config = schema.get_config('pico')
  config.model.vocab_size = 384
  if d_ff:
    config.model.d_ff = d_ff
  mesh = sharding.make_mesh(config.mesh)
  resolve.resolve(config, mesh)
  return step.build(config, mesh)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A run folder holding checkpoint step 2 of a fresh train state (copied by each test)."""
  wd = str(tmp_path_factory.mktemp('saved') / 'w')
  ck = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), async_save=False)
  ck.save(2, setup_of().init_state(jax.random.PRNGKey(0)), {'position': 7})
  ck.close()
  return wd


def copy(saved, tmp_path):
  wd = str(tmp_path / 'w')
  shutil.copytree(saved, wd)
  return wd, os.path.join(wd, 'checkpoints', '2')


def cut(step_dir, rel):
  """Truncates `rel` (a file, or every file of a folder) of the step to half its size; returns what was cut."""
  path = os.path.join(step_dir, rel)
  files = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
  for p in files:
    os.truncate(p, os.path.getsize(p) // 2)
  return [os.path.relpath(p, step_dir) for p in files]


@pytest.mark.parametrize('rel', ['state/ocdbt.process_0/d', 'state/_METADATA'])
def test_doctor_deep_names_the_unreadable_file(saved, tmp_path, rel):
  """The array data files (what tests/test_storage_faults.py cuts), or the tree metadata."""
  wd, step_dir = copy(saved, tmp_path)
  r = run_cli('doctor', wd, '--deep')
  assert r.returncode == 0 and 'consistent' in r.stdout, r.stdout + r.stderr
  was_cut = cut(step_dir, rel)
  r = run_cli('doctor', wd, '--deep')
  assert r.returncode == 1, r.stdout + r.stderr
  [line] = [x for x in r.stdout.splitlines() if x.startswith(f'{step_dir}: corrupt checkpoint')]
  named = re.search(r': (\S+) is unreadable \((cut short|empty)', line)
  assert named and named.group(1) in was_cut, line
  assert not INTERNAL.search(line), line


def test_restore_says_which_file_is_unreadable_or_that_the_model_differs(saved, tmp_path):
  wd, step_dir = copy(saved, tmp_path)
  ck = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'), read_only=True)
  with pytest.raises(UserError, match=r'does not match the model: an array is stored with shape \([^)]*192[^)]*\), '
                                      r'the model has \([^)]*256[^)]*\)') as e:
    ck.restore(2, setup_of(d_ff=256).abstract_state)  # pico's d_ff is 192
  assert not INTERNAL.search(str(e.value)), e.value
  was_cut = cut(step_dir, 'state/ocdbt.process_0/d')
  with pytest.raises(UserError, match=r'cannot restore checkpoint step 2 .*: (\S+) is unreadable \(cut short') as e:
    ck.restore(2, setup_of().abstract_state)
  assert re.search(r': (\S+) is unreadable', str(e.value)).group(1) in was_cut
  assert not INTERNAL.search(str(e.value)), e.value

"""The run-files contract (sktlm/runfiles.py): the summary's fields against docs/run_files.md, the checks of a
summary, the readers' fallbacks for files older versions wrote, and that no other module spells a run file's
name. No jax."""

import ast
import json
import math
import os
import re

import pytest

from sktlm import runfiles
from tests.conftest import ROOT


def _documented_summary_fields() -> list[str]:
  """The first column of the summary.json table in docs/run_files.md ('step, steps' rows split)."""
  text = (ROOT / 'docs' / 'run_files.md').read_text()
  section = text.split('## `W/summary.json`', 1)[1].split('\n## ', 1)[0]
  out = []
  for line in section.splitlines():
    m = re.match(r'^\| ([a-z_0-9, ]+) \|', line)
    if m and m.group(1).strip() != 'field':
      out += [f.strip() for f in m.group(1).split(',')]
  return out


def test_summary_fields_are_the_documented_ones():
  documented = _documented_summary_fields()
  assert len(documented) == len(set(documented))
  assert set(documented) == set(runfiles.SUMMARY_FIELDS)
  assert set(runfiles.OPTIONAL) < set(runfiles.SUMMARY_FIELDS)


DONE = {'status': 'done', 'step': 10, 'steps': 10, 'eval_batches': 2, 'final_train_loss': 3.0,
        'final_eval_loss': 3.1, 'best_eval_loss': 3.05}


@pytest.mark.parametrize('change, problems, finished', [
    ({}, [], 'done'),
    ({'step': 8}, ['step 8 != steps 10'], ''),                                     # killed before the end
    ({'final_eval_loss': None}, ['final_eval_loss missing'], ''),
    ({'final_eval_loss': None, 'best_eval_loss': None, 'eval_batches': 0}, [], 'done'),  # no evals configured
    ({'final_train_loss': 'nan'}, ['final_train_loss missing'], ''),               # files.jsonable's NaN
    ({'final_train_loss': True}, ['final_train_loss missing'], ''),                # a bool is not a loss
    ({'status': 'diverged', 'final_train_loss': None}, [], 'diverged'),            # terminal without losses
    ({'status': 'failed'}, [], ''),
    ({'status': 'preempted', 'step': 4}, [], ''),
])
def test_summary_problems_and_finished(change, problems, finished):
  s = {k: v for k, v in {**DONE, **change}.items() if v is not None}
  assert runfiles.summary_problems(s) == problems
  assert runfiles.finished(s) == finished
  assert runfiles.finished(None) == '' and runfiles.summary_problems(None) == []


def test_summary_flops_reads_every_generation():
  now = {'flops': {'6N': 6.0, 'exact': 7.0, 'model': 7.0, 'executed': 9.0}}
  before_model = {'flops': {'6N': 6.0, 'exact': 7.0}}                    # 'exact' was the model count's name
  oldest = {'flops_6n': 6.0, 'flops_model': 7.0, 'flops_executed': 9.0}  # top-level keys, no flops dict
  assert runfiles.summary_flops(now) == {'6N': 6.0, 'model': 7.0, 'executed': 9.0}
  assert runfiles.summary_flops(before_model) == {'6N': 6.0, 'model': 7.0, 'executed': None}
  assert runfiles.summary_flops(oldest) == {'6N': 6.0, 'model': 7.0, 'executed': 9.0}
  assert runfiles.record_flops({'flops': 5.0, 'flops_model': 4.0}) == 4.0
  assert runfiles.record_flops({'flops': 5.0}) == 5.0


def test_metrics_readers_keep_the_last_record_per_step_and_skip_cut_lines(tmp_path):
  w = str(tmp_path)
  assert runfiles.last_records(w) is None and runfiles.latest_records(w) == {}
  recs = [{'kind': 'train', 'step': 5, 'loss': 4.0}, {'kind': 'eval', 'step': 5, 'eval_loss': 4.2},
          {'kind': 'train', 'step': 10, 'loss': 3.5},
          {'kind': 'train', 'step': 10, 'loss': 3.4},      # a resumed attempt repeats step 10
          {'kind': 'rollback', 'step': 10, 'to_step': 5}]
  text = ''.join(json.dumps(r) + '\n' for r in recs) + '{"kind": "train", "st'  # a kill mid-line
  (tmp_path / runfiles.METRICS).write_text(text)
  last = runfiles.last_records(w)
  assert sorted(last) == [('eval', 5), ('train', 5), ('train', 10)]
  assert last[('train', 10)]['loss'] == 3.4
  assert len(runfiles.read_metrics(w)) == 5
  latest = runfiles.latest_records(w)
  assert latest['train']['loss'] == 3.4 and latest['eval']['eval_loss'] == 4.2
  # The tail alone: the eval record lies before the last 120 bytes, the cut first line of the tail is skipped.
  assert set(runfiles.latest_records(w, max_bytes=120)) == {'train'}


def test_checkpoint_folder_names_and_quarantine(tmp_path):
  ck = tmp_path / runfiles.CHECKPOINTS
  for name in ('2', '4', f'6{runfiles.CHECKPOINT_TMP_MARK}-17', 'notes'):
    (ck / name).mkdir(parents=True)
  assert runfiles.steps_on_disk(str(ck)) == [2, 4] and runfiles.has_checkpoint(str(tmp_path), 4)
  tmp = f'6{runfiles.CHECKPOINT_TMP_MARK}-17'
  assert [os.path.basename(p) for p in runfiles.checkpoint_tmp_folders(str(ck))] == [tmp]
  first = runfiles.quarantine(str(ck), 4, 'corrupt')
  (ck / '4').mkdir()
  second = runfiles.quarantine(str(ck), 4, 'corrupt')  # never overwrites an earlier one
  assert first == str(tmp_path / runfiles.QUARANTINE / '4.corrupt') and second == first + '.1'
  assert runfiles.remove_checkpoint_tmp_folders(str(ck)) and runfiles.steps_on_disk(str(ck)) == [2]


# Hugging Face folders have their own config.json and tokenizer.json: not a run's files.
HF_FOLDERS = {'sktlm/interop/hf.py': {runfiles.CONFIG}, 'sktlm/data/hf_tokenizer.py': {runfiles.TOKENIZER}}
# Names that are also ordinary words elsewhere (a status is checked where it is compared, not everywhere).
FILE_NAMES = {runfiles.CONFIG, runfiles.TOKENIZER, runfiles.METRICS, runfiles.SUMMARY, runfiles.CHECKPOINTS,
              runfiles.QUARANTINE, runfiles.CHECKPOINT_TMP_MARK, runfiles.RESUMED_AT, runfiles.EVALS,
              runfiles.SWEEP_LOCK, runfiles.SWEEP_RECORD, runfiles.SWEEP_LOG}


def _string_constants(path):
  """(line, value) of every string constant that is not a docstring."""
  tree = ast.parse(path.read_text())
  docs = {id(n.body[0].value) for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  return [(n.lineno, n.value) for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_other_module_spells_a_run_file_name():
  found = []
  for path in sorted((ROOT / 'sktlm').rglob('*.py')):
    rel = str(path.relative_to(ROOT))
    if rel == 'sktlm/runfiles.py':
      continue
    allowed = HF_FOLDERS.get(rel, set())
    found += [f'{rel}:{line}: {v!r}' for line, v in _string_constants(path) if v in FILE_NAMES - allowed]
  assert found == [], 'spell these through sktlm.runfiles: ' + '; '.join(found)


def test_finite_is_the_summary_rule():
  assert runfiles.finite(1) and runfiles.finite(2.5)
  assert not any(runfiles.finite(v) for v in (math.nan, math.inf, 'nan', None, False))

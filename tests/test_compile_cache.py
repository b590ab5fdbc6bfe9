"""The persistent compilation cache of `sktlm train` (sktlm/train/compile_cache.py): a rerun loads its programs
instead of compiling them and gets bit-identical results; a change of config or code that changes a program
is a miss (never a stale program); deleting the cache, even in the middle of a run, is harmless.

Hits and misses are counted with jax's own monitoring events and the entries in the cache folder. Runs are
in-process (`loop.run`) with jax's in-memory caches cleared between them, so every program goes through the
persistent cache exactly as in a new process.
"""

import json
import os
import shutil

import jax
import pytest
from conftest import train_config

from sktlm import timeline
from sktlm.model import layers
from sktlm.train import compile_cache, loop

SMALL = {'train.steps': 2, 'data.seq_len': 32, 'train.batch_size': 8, 'train.eval_batches': 1,
         'train.log_every': 1, 'metrics.peak_flops': 1e11, 'model.n_layers': 1}  # quick to compile


class Events:
  """jax's persistent-cache hit/miss events while inside."""

  NAMES = {'/jax/compilation_cache/cache_hits': 'hits', '/jax/compilation_cache/cache_misses': 'misses'}

  def __enter__(self):
    self.counts = {'hits': 0, 'misses': 0}
    jax.monitoring.register_event_listener(self._on)
    return self

  def _on(self, name, **kw):
    if name in self.NAMES:
      self.counts[self.NAMES[name]] += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self._on)


def entries(cache) -> set[str]:
  return {n for n in os.listdir(cache) if n.endswith('-cache')} if os.path.isdir(cache) else set()


def run(data_dir, workdir, cache, **over):
  jax.clear_caches()  # in-memory executables: a new process would not have them
  config = train_config(data_dir, **{**SMALL, 'train.compile_cache': str(cache), **over})
  with Events() as ev:
    assert loop.run(config, str(workdir)) == 0
  s = json.load(open(os.path.join(workdir, 'summary.json')))
  losses = [(r['step'], r.get('loss'), r.get('eval_loss')) for r in map(json.loads, open(workdir / 'metrics.jsonl'))]
  return ev.counts, (s['final_train_loss'], s['final_eval_loss'], losses)


def test_reruns_hit_and_program_changes_miss(data_dir, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  _, ref = run(data_dir, tmp_path / 'ref', 'off')  # compiled without any cache: the reference results
  assert not cache.exists()
  cold, first = run(data_dir, tmp_path / 'a', cache)
  stored = entries(cache)
  assert cold['misses'] >= 3 and cold['hits'] == 0 and len(stored) >= 3  # init, train step, eval step, ...
  warm, again = run(data_dir, tmp_path / 'b', cache)
  assert warm == {'hits': cold['misses'], 'misses': 0} and entries(cache) == stored
  assert first == again == ref  # a loaded program gives bit-identical losses

  # A config change that changes the program (the loss gains a z-loss term): the train step misses.
  zl, zl_res = run(data_dir, tmp_path / 'c', cache, **{'model.z_loss': 1e-2})
  assert zl['misses'] >= 1 and len(entries(cache)) > len(stored) and zl_res != ref
  # The same config under different code (RMSNorm output scaled): the train and eval steps miss.
  n = len(entries(cache))
  orig = layers.RMSNorm.__call__
  monkeypatch.setattr(layers.RMSNorm, '__call__', lambda self, x: orig(self, x) * (1 + 1e-3))
  code, code_res = run(data_dir, tmp_path / 'd', cache)
  assert code['misses'] >= 2 and len(entries(cache)) >= n + 2 and code_res != ref


def test_deleting_the_cache_mid_run_and_between_runs_is_harmless(data_dir, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  _, ref = run(data_dir, tmp_path / 'a', cache)
  # Deleted while a run is between its programs: after the state init (stored) and after the train step
  # compile, before the eval step's; the run finishes with the same results.
  mark = timeline.mark
  deleted = []

  def delete_at(name):
    mark(name)
    if name in ('state', 'train compile'):
      shutil.rmtree(cache, ignore_errors=True)
      deleted.append(name)
  monkeypatch.setattr(timeline, 'mark', delete_at)
  with pytest.warns(UserWarning, match='persistent compilation cache'):  # a write into the gone folder
    counts, res = run(data_dir, tmp_path / 'b', cache)
  assert deleted == ['state', 'train compile'] and res == ref and counts['hits'] >= 1  # init was loaded
  monkeypatch.setattr(timeline, 'mark', mark)
  # The next run (the next of a sweep's runs) recreates the folder and fills it again.
  counts, res = run(data_dir, tmp_path / 'c', cache)
  assert res == ref and counts['hits'] == 0 and len(entries(cache)) >= 3


def test_cache_folder_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  assert compile_cache.resolve('') == os.path.expanduser('~/.cache/sktlm/jax')
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.resolve('') == str(tmp_path / 'env')
  assert compile_cache.resolve(str(tmp_path / 'cfg')) == str(tmp_path / 'cfg')  # the config key wins
  assert compile_cache.resolve('off') is None and compile_cache.resolve('none') is None
  before = jax.config.jax_compilation_cache_dir
  with compile_cache.enabled(str(tmp_path / 'x')) as path:
    assert jax.config.jax_compilation_cache_dir == path == str(tmp_path / 'x')
  assert jax.config.jax_compilation_cache_dir == before  # an in-process run leaves jax as it was

"""The JAX persistent compilation cache for `sktlm train` (config key train.compile_cache).

One folder shared by every run on the machine (a sweep's runs, reruns, resumed runs, other sweeps), so a
run whose programs were compiled before loads them instead of compiling (seconds per run on CPU, minutes
on a TPU pod). Safe to delete at any time: a missing folder is recreated, a missing entry compiles again,
and an entry that cannot be read or written is a warning and a compile, never an error.

Never stale: JAX keys each entry by a hash of the HLO module (the whole program, with its shardings and
donations), the compile options, XLA_FLAGS, the jax/jaxlib and backend versions and the
devices, so a change of model code, config or flags that changes the program is a new key. sktlm decides
nothing outside the program that a cached executable could carry stale: every platform choice (kernels,
attention, unrolling) is resolved (sktlm.train.resolve) before tracing, so it is in the HLO.
"""

from __future__ import annotations

import contextlib
import os

ENV = 'SKTLM_COMPILE_CACHE'
DEFAULT = '~/.cache/sktlm/jax'
OFF = ('off', 'none')


def resolve(value: str) -> str | None:
  """The cache folder for train.compile_cache `value` ('' -> $SKTLM_COMPILE_CACHE or the default), or None
  when the cache is off."""
  value = value or os.environ.get(ENV, '') or DEFAULT
  if value.lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


@contextlib.contextmanager
def enabled(value: str):
  """Compiles inside use the cache folder of `value` (None: off); the previous settings come back after,
  so an in-process run (tests, notebooks) leaves jax as it found it."""
  import jax
  from jax._src import compilation_cache

  path = resolve(value)
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes', 'jax_enable_compilation_cache')
  old = {n: getattr(jax.config, n) for n in names}
  new = {'jax_compilation_cache_dir': path, 'jax_enable_compilation_cache': path is not None,
         # every program, however quick to compile: a pico run's are all under jax's default 1 s
         'jax_persistent_cache_min_compile_time_secs': 0.0, 'jax_persistent_cache_min_entry_size_bytes': 0}
  _apply(new, compilation_cache)
  try:
    yield path
  finally:
    _apply(old, compilation_cache)


def _apply(settings: dict, compilation_cache) -> None:
  import jax
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # jax opens its cache once per process; reopen it at the new folder

"""Ray backend: each run is a Ray task (asking for the run's CPU/GPU/TPU resources) that executes the
same `execute.run_one` as the local backend, i.e. a `sktlm train` subprocess with its log, lock and
records in the run directory. The sweep directory must be on a filesystem all Ray nodes share.

`ray.init()` starts a local cluster bound to 127.0.0.1 (nothing listens on other interfaces: a Ray port
runs code for whoever reaches it), with usage-stats telemetry off; `address` joins an existing one
('auto' or 'ray://host:10001'), whose network exposure is its owner's choice. Ray decides "single node on
loopback" from variables it reads at `import ray` (no `ray.init` argument does it: `_node_ip_address` alone
leaves the driver looking for the node at the external address), so in a process that imported Ray before
them (a notebook) starting a local cluster is refused with one line that says how to do it.
Tasks are never retried by Ray (max_retries=0): a rerun of the sweep resumes them instead, under the lock.
"""

from __future__ import annotations

import os
import sys

from sktlm.errors import UserError

LOCAL_ENV = {
    'RAY_USAGE_STATS_ENABLED': '0',  # no telemetry (read when ray starts its processes)
    'RAY_USAGE_STATS_PROMPT_ENABLED': '0',
    'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0',  # single node: its address is the loopback one
}


def _cluster_mode(ray) -> bool:
  """Whether this process's Ray took the multi-node (external address) mode at import."""
  from ray._private import ray_constants
  return bool(getattr(ray_constants, 'ENABLE_RAY_CLUSTER', True))


def _run_task(task: dict) -> dict:
  from sktlm.sweep import execute
  return execute.run_one(task)


class RayBackend:
  name = 'ray'

  def __init__(self, address: str = '', parallel: int = 0, num_cpus: int | None = None, log=print):
    imported_before = 'ray' in sys.modules
    os.environ.update(LOCAL_ENV)  # before `import ray`: it reads them at import and in every process it starts
    try:
      import ray
    except ImportError as e:
      raise UserError('--backend=ray needs Ray: pip install "ray[default]==2.60.0" (or: pip install '
                      "'sktlm[ray]')") from e
    self.ray = ray
    if not address and imported_before and not ray.is_initialized() and _cluster_mode(ray):
      raise UserError('Ray was imported before sktlm could keep its local cluster on 127.0.0.1: set '
                      'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and RAY_USAGE_STATS_ENABLED=0 before `import ray`, '
                      'or start a cluster bound to loopback (`ray start --head --node-ip-address=127.0.0.1`) '
                      'and join it (--ray_address=auto)')
    self.parallel = parallel if parallel > 0 else 1 << 30
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    if address:
      kwargs['address'] = address
    else:
      kwargs.update(num_cpus=num_cpus, _node_ip_address='127.0.0.1')
    try:
      ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
      raise UserError(f'cannot start/join a Ray cluster{f" at {address}" if address else ""}: {e}') from e
    self._remote = ray.remote(max_retries=0)(_run_task)
    log(f'ray cluster: {ray.cluster_resources()}')

  @staticmethod
  def _options(resources: dict) -> dict:
    res = dict(resources)
    opts = dict(num_cpus=res.pop('CPU', 1), num_gpus=res.pop('GPU', 0))
    if res:
      opts['resources'] = res
    return opts

  def check(self, runs):
    """Before starting anything: a request no node of the cluster can satisfy would wait forever."""
    have = self.ray.cluster_resources()
    for r in runs:
      opts = self._options(r.resources)
      need = {'CPU': opts['num_cpus'], 'GPU': opts['num_gpus'], **opts.get('resources', {})}
      short = {k: v for k, v in need.items() if v and have.get(k, 0) < v}
      if short:
        raise UserError(f'run {r.name} asks for {short} but the Ray cluster has {have}')

  def submit(self, task: dict, resources: dict):
    return self._remote.options(**self._options(resources)).remote(task)

  def wait(self, handles: list, timeout: float) -> list:
    ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
    return ready

  def result(self, handle) -> dict:
    return self.ray.get(handle)

  def interrupt(self, handles: list):
    for h in handles:
      self.ray.cancel(h, force=False)  # raises KeyboardInterrupt in the task: it stops its train

  def close(self):
    pass

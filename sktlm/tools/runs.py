"""Opening a run's workdir after (or during) training: its stored config, tokenizer and the params of one
checkpoint, on a mesh chosen by the caller. Used by `sktlm export`, `sktlm sample` and `sktlm eval`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections

from sktlm import runfiles
from sktlm.config import schema
from sktlm.config.load import flatten
from sktlm.config.validate import validate
from sktlm.errors import UserError


@dataclasses.dataclass
class LoadedRun:
  workdir: str
  config: ml_collections.ConfigDict
  tokenizer: Any
  setup: Any      # sktlm.train.step.Setup on the chosen mesh
  params: Any     # restored params, laid out by setup.state_shardings.params
  step: int
  state: Any = None  # the whole restored TrainState (setup.eval_step takes it)


def _tuples(x):
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return x


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run stored in W/config.json (lists back to tuples, as the schema has them), over
  the schema's defaults: a key the run predates reads as its default, a key since removed is dropped."""
  path = runfiles.path(workdir, runfiles.CONFIG)
  try:
    raw = runfiles.load(workdir, runfiles.CONFIG)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{workdir} is not a run directory: cannot read {path} ({e})') from None
  config = schema.get_config()
  for key, value in flatten(_tuples(raw)).items():
    if key in schema.BY_KEY:
      *parents, leaf = key.split('.')
      node = config
      for p in parents:
        node = node[p]
      with node.ignore_type():
        node[leaf] = value
  validate(config)
  return config


def _reader(workdir: str):
  """A read-only Checkpointer; Orbax's warnings about read-only options are expected here, so hidden."""
  from absl import logging

  from sktlm.train.checkpoint import Checkpointer
  old = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return Checkpointer(runfiles.checkpoints_dir(workdir), read_only=True, async_save=False)
  finally:
    logging.set_verbosity(old)


def checkpoint_step(workdir: str, at_step: int | None) -> int:
  if not os.path.isdir(runfiles.checkpoints_dir(workdir)):
    raise UserError(f'{workdir}: no {runfiles.CHECKPOINTS}/ folder (train the run first)')
  ckpt = _reader(workdir)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps:
    raise UserError(f'{workdir}: no checkpoint saved yet')
  if at_step is None or at_step < 0:
    return steps[-1]
  if at_step not in steps:
    raise UserError(f'{workdir}: no checkpoint at step {at_step} (has {steps})')
  return at_step


def load(workdir: str, at_step: int | None = None, mesh_cfg: dict | None = None, devices=None,
         batch_size: int | None = None) -> LoadedRun:
  """Restores params of checkpoint `at_step` (None: latest) onto a mesh (default: the run's config.mesh);
  `batch_size` (default: the run's) is what setup.eval_step is fed."""
  import jax

  from sktlm import data, sharding
  from sktlm.train import resolve, step
  config = read_config(workdir)
  at_step = checkpoint_step(workdir, at_step)
  tokenizer = data.get_tokenizer(config.data)
  if mesh_cfg is not None:
    with config.unlocked():
      config.mesh = ml_collections.ConfigDict(mesh_cfg)
  if devices is None and all(int(v) > 0 for v in config.mesh.values()):  # fixed axes: the first devices
    devices = jax.devices()[:math.prod(int(v) for v in config.mesh.values())]
  mesh = sharding.make_mesh(config.mesh, devices)
  shards = sharding.batch_axis_size(mesh, sharding.logical_rules(config))
  with config.unlocked():  # only the eval step uses the batch size here (never the train step)
    if batch_size:
      if batch_size % shards:
        raise UserError(f'--batch_size={batch_size} does not divide the {shards} batch shards of the mesh')
      config.train.batch_size = batch_size
    elif config.train.batch_size % shards:
      config.train.batch_size = shards
    config.train.grad_accum = 1
    resolve.resolve(config, mesh, tokenizer)  # config.json records resolved values; older runs' 'auto' here
  setup = step.build(config, mesh)
  ckpt = _reader(workdir)
  state, _ = ckpt.restore(at_step, setup.abstract_state)
  ckpt.close()
  return LoadedRun(workdir=workdir, config=config, tokenizer=tokenizer, setup=setup, params=state.params,
                   step=at_step, state=state)


def single_device_mesh() -> dict:
  return {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}

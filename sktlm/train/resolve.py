"""Resolve once: the choices a config leaves open are made here, in place, for the run's tokenizer and the
devices of its mesh: model.vocab_size 0 (the tokenizer's vocabulary, padded), model.kernels, attention_impl
('auto') and scan_unroll (0) (sktlm/model/kernels). The config that config.json records says what ran, and
nothing below asks again: `build` only checks that it was resolved (`check`).

Called by `sktlm train` (train/start.py) and `sktlm plan` (plan/planner.py) right after `validate(config,
mesh)`: the resolvers read values the validator vouches for (vocab_multiple >= 1, the dtypes), and what they
choose comes from the schema's own choices.
"""

from __future__ import annotations

import logging

from sktlm.config import layout
from sktlm.errors import UserError
from sktlm.model import kernels


def resolve(config, mesh, tokenizer=None) -> None:
  """Both resolutions; idempotent (resolved values are explicit, and kept)."""
  vocab(config, tokenizer)
  platform(config, mesh)


def vocab(config, tokenizer=None) -> None:
  """model.vocab_size 0 -> the tokenizer's vocabulary padded to model.vocab_multiple; a configured one must
  hold the tokenizer's. Without a tokenizer (`sktlm plan`), a configured vocab_size is taken as it is."""
  if tokenizer is None:
    if config.model.vocab_size > 0:
      return
    from sktlm import data  # the input pipeline's modules: only when a tokenizer must be read
    tokenizer = data.get_tokenizer(config.data)
  size = layout.resolved_vocab_size(config.model, tokenizer.vocab_size)
  if size < tokenizer.vocab_size:
    raise UserError(f'model.vocab_size={size} is smaller than the tokenizer vocabulary ({tokenizer.vocab_size})')
  config.model.vocab_size = size


def platform_of(mesh) -> str:
  """The platform of the mesh's devices ('cpu', 'tpu', 'gpu'): not jax.default_backend(), because
  `sktlm plan` traces on a CPU host for TPU devices."""
  return mesh.devices.flat[0].platform


def platform(config, mesh) -> None:
  """The platform choices left `auto` in config.model (kernels, attention_impl, scan_unroll), for the mesh's
  devices (sktlm/model/kernels.resolve); its notes on fallbacks are logged."""
  for note in kernels.resolve(config.model, platform_of(mesh)):
    logging.warning('%s', note)


def check(config) -> None:
  """Raises unless `resolve` ran: the cheap check `build` makes instead of resolving again."""
  m = config.model
  if m.vocab_size <= 0:
    raise UserError('model.vocab_size is not resolved (set it, or let the tokenizer resolve it)')
  left = [k for k, v in (('kernels', m.kernels), ('attention_impl', m.attention_impl)) if v == 'auto']
  left += ['scan_unroll'] if m.scan_unroll == 0 else []
  if left:
    raise UserError(f'model.{", model.".join(left)} not resolved for a platform (sktlm.train.resolve runs before '
                    'build)')
